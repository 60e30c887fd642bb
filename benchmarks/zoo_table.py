"""Run the architecture zoo (tests/test_zoo.py) and print its architectures × checks table.

    python -m benchmarks.zoo_table
"""

from __future__ import annotations

import re
import sys
import time

import pytest

from tests.zoo import ZOO

CHECKS = {
    "test_all_linear_selects_what_peft_selects": "all-linear = PEFT",
    "test_peft_adapter_loads_in_lorakit": "PEFT → lorakit",
    "test_lorakit_adapter_loads_in_peft": "lorakit → PEFT",
    "test_merge_unmerge_unload_keep_the_output": "merge/unmerge/unload",
    "test_mixed_batch_equals_each_adapter_alone": "mixed batch",
}


class Collector:
    def __init__(self):
        self.outcomes: dict[tuple[str, str], str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        found = re.match(r".*::(\w+)\[(.+)\]$", report.nodeid)
        if found:
            self.outcomes[(found.group(1), found.group(2))] = report.outcome


def main() -> int:
    collector = Collector()
    started = time.time()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_zoo.py"], plugins=[collector])
    seconds = time.time() - started
    print(f"\n| architecture | kind | {' | '.join(CHECKS.values())} | note |")
    print(f"|---|---|{'---|' * len(CHECKS)}---|")
    for arch in ZOO:
        marks = ["pass" if collector.outcomes.get((test, arch.name)) == "passed" else "**FAIL**" for test in CHECKS]
        print(f"| {arch.name} | {arch.kind} | {' | '.join(marks)} | {arch.note} |")
    passed = sum(v == "passed" for v in collector.outcomes.values())
    print(f"\n{passed} of {len(ZOO) * len(CHECKS)} checks passed in {seconds:.1f} s")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
