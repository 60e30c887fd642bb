"""lorakit's C++ kernels: compiled at first use with the machine's C++ compiler, loaded through ctypes.

A kernel is one ``.cpp`` file here (plus the shared headers in ``HEADERS``) with ``extern "C"``
functions: no Python or torch headers, so a build takes about a second. It is compiled for the CPU
it runs on (``-march=native``), into a cache folder, under a name that carries a digest of the
sources, the flags and the CPU's flags: a new CPU or a changed source builds anew. It is built in a
scratch folder and renamed, so a crash never leaves half a library. A machine without a compiler
(or not Linux) gets None and the reason, and the caller keeps torch's path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .cpu import cpuinfo_value

HERE = Path(__file__).parent
HEADERS = (HERE / "bf16.h",)
DTYPES = (torch.float32, torch.bfloat16)  # the element types every kernel takes (bf16 through bf16.h)
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC")


def library_name(source: Path) -> str:
    """The cached library's file name: the sources, the flags and the CPU it is built for."""
    digest = hashlib.sha256(source.read_bytes())
    for header in HEADERS:
        digest.update(header.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(f"{platform.machine()} {cpu_flags()}".encode())
    return f"{source.stem}-{digest.hexdigest()[:16]}.so"


def build(source: Path, folder: str) -> tuple[ctypes.CDLL | None, Path | None, str]:
    """(library, its path, how) for ``source``, built into ``folder`` if it is not there yet; or
    (None, None, why not)."""
    if platform.system() != "Linux":
        return None, None, f"not built on {platform.system()} (Linux only)"
    path = Path(folder) / library_name(source)
    if not path.exists():
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not compiler:
            return None, None, "no C++ compiler found (set CXX, or install g++)"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # built aside, then renamed: never half a file
            built = Path(scratch) / path.name
            try:
                result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True,
                                        text=True)
            except OSError as exc:  # CXX names no program
                return None, None, f"its compiler did not run ({exc})"
            if result.returncode != 0:
                return None, None, f"its build failed ({compiler}: {result.stderr.strip().splitlines()[-1:]})"
            os.replace(built, path)
    try:
        return ctypes.CDLL(str(path)), path, f"built in {path}"
    except OSError as exc:
        return None, None, f"its library did not load ({exc})"


def cpu_flags() -> str:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or '' where /proc/cpuinfo has none."""
    return cpuinfo_value("flags") or cpuinfo_value("Features") or ""


def refusal(model) -> str | None:
    """Why a model's kernels cannot run here (a dtype other than ``DTYPES``, or not on CPU), or None."""
    reference = next(model.parameters())
    if reference.dtype in DTYPES and reference.device.type == "cpu":
        return None
    return f"the kernel is for fp32 or bf16 on CPU; this model is {reference.dtype} on {reference.device.type}"
