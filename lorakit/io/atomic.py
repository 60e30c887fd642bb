"""Write-then-rename helpers: files and directories appear complete or not at all.

A directory that already exists is replaced by one atomic exchange (Linux ``renameat2`` with
``RENAME_EXCHANGE``): a kill at any point leaves either the old directory or the new one, never a
mix. Where the file system cannot exchange, the old directory is moved aside first and put back by
the next writer (or reader via ``recover_dir``) if a kill came between the two renames.
Temporary names carry the writer's process id, so the next write into a place removes what a
killed writer left there and keeps what a live one is writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import WriteFailedError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: Path) -> None:
    """Put back a directory a killed two-rename swap left aside (only where exchange is unsupported)."""
    old = _aside(target)
    if old.is_dir() and not target.exists():
        os.replace(old, target)


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written directory into place; the old one is removed only after the swap."""
    if not target.exists():
        os.replace(staging, target)  # one rename: the whole directory appears at once
        return
    if exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old directory
        return
    old = _aside(target)
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


def _prefix(target: Path, tag: str) -> str:
    return f".{target.name}.{tag}-"


def remove_stale_staging(target: Path, tag: str) -> None:
    """Delete temporary files or directories beside ``target`` that a killed writer left behind
    (their process id, part of the name, is no longer running); a live writer's are kept."""
    prefix = _prefix(target, tag)
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


def make_staging(target: Path, tag: str = "tmp") -> Path:
    """A fresh private-named directory beside ``target``, named ``.NAME.TAG-PID-XXXX`` so that a
    later writer can tell a dead writer's leftovers from a live one's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    remove_stale_staging(target, tag)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_prefix(target, tag)}{os.getpid()}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; what we write is meant to be shared
    return staging


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_DISK_WORDS = ("iostream error", "file write failed", "No space left on device", "File too large",
               "Disk quota exceeded", "os error 28", "os error 27", "os error 122",
               "inline_container.cc")


def write_failure(exc: BaseException, target: str | os.PathLike | None = None) -> str | None:
    """A user's message for an exception that means "this output could not be written" (a full disk,
    a quota or file size limit, a read-only place), or None for any other exception."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        why = os.strerror(exc.errno).lower()
        target = target or exc.filename
    elif any(s in str(exc) for s in _DISK_WORDS):  # torch.save's and safetensors' words for the same
        why = "the disk is full or the file size limit was reached"
    else:
        return None
    place = Path(target) if target else Path(".")
    try:
        free = f" ({shutil.disk_usage(place.parent if place.parent.exists() else '.').free / 2**20:.0f} MiB free there)"
    except OSError:
        free = ""
    return (f"could not write {place}: {why}{free}. Nothing was replaced; free some space or write "
            "somewhere else (e.g. another --output).")


@contextlib.contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Turn a failed write into one error that names the place and the fix (no traceback)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only write failures are translated, the rest re-raised
        message = write_failure(exc, target)
        if message is None:
            raise
        raise WriteFailedError(message) from None


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``target``; when the block ends without error it replaces
    ``target`` whole, otherwise it is deleted and ``target`` is left as it was."""
    target = Path(target)
    with write_errors(target):
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
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target, "part")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{_prefix(target, 'part')}{os.getpid()}-")
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
