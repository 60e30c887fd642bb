"""Write-then-rename helpers: files and directories appear complete or not at all."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written directory into place; the old one is removed only after the swap."""
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(target: Path, tag: str) -> None:
    """Delete staging directories beside ``target`` that a killed writer left behind (their
    process id, part of the name, is no longer running); a live writer's staging is kept."""
    prefix = f".{target.name}.{tag}-"
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if leftover.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def make_staging(target: Path, tag: str = "tmp") -> Path:
    """A fresh private-named directory beside ``target``, named ``.NAME.TAG-PID-XXXX`` so that a
    later writer can tell a dead writer's leftovers from a live one's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target, tag)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{tag}-{os.getpid()}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; what we write is meant to be shared
    return staging


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``target``; when the block ends without error it replaces
    ``target`` whole, otherwise it is deleted and ``target`` is left as it was."""
    target = Path(target)
    staging = make_staging(target)
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[str]:
    """A temporary file path beside ``target``, renamed over it when the block succeeds."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
