"""README.md's library example runs as written (on the embedded MiniLM that command one installs)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / real models: `pytest -m "not slow"` skips them

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    section = README.read_text().split("## Library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes out/a
    namespace: dict = {}
    exec(compile(library_example(), "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "a" / "adapter_model.safetensors").is_file()
    assert namespace["out"].logits.shape == (4, 2)
    assert not any("lora" in name for name, _ in namespace["plain"].named_modules())
