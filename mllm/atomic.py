"""Crash-safe writes: whole directories swapped in, whole files replaced, lines appended durably.

A directory (a checkpoint, converted weights, an export, a training snapshot) is written in a temporary
sibling `.NAME.tmp-XXXX` and swapped in so that at every instant the target path holds either the complete
old directory or the complete new one:

1. Everything in the temporary directory is fsynced (files, then the folders holding them, deepest first):
   the swap must publish data that is on disk, not only in the page cache, or a power cut right after it
   could leave the new name pointing at empty files.
2. The swap. `os.replace` cannot put a directory over a non-empty one, and two renames (old aside, new in)
   leave a moment with nothing at the target. Linux's renameat2(RENAME_EXCHANGE) swaps two paths in one
   atomic step (ext4, xfs, btrfs, tmpfs, overlayfs); the temporary name then holds the old directory, which is
   deleted. Where the filesystem (or the OS) cannot exchange, the old directory is renamed to `.NAME.old`
   first and the new one in second: a kill between the two leaves `.NAME.old` complete and nothing at the
   target, and `recover` - run by the next write and by the readers of checkpoints - renames it back.
3. The parent directory is fsynced, so the renames themselves survive a power cut.

`.NAME.old` only ever holds a complete directory: a stale one is renamed to a trash name before it is
deleted, so a kill mid-delete never leaves half of it under the name `recover` trusts. What killed writes
leave behind (trash, temporary directories of processes that are gone) is deleted by the next write.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_AT_FDCWD = -100  # renameat2's "relative to the working directory" (linux/fcntl.h)
_RENAME_EXCHANGE = 2  # linux/fs.h
# renameat2's answers for "this kernel / filesystem / sandbox cannot exchange": fall back to two renames
# (a real permission problem then fails there, with its own error).
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)


def fsync_directory(path: str | Path) -> None:
    """Make the entries of directory `path` (creations, renames, deletions) durable."""
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals its metadata itself
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every directory (deepest first, `root` last)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue  # a link's target is not ours to flush
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(folder)


def write_text_durably(path: str | Path, text: str) -> None:
    """Replace the file `path` with `text` in one step: a kill leaves the old content or the new, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_directory(path.parent)


def append_durably(file: IO[str], line: str) -> None:
    """Append `line` to an open append-only file and wait until it is on disk: a kill loses at most the line
    being written (which the readers of such files then drop as torn)."""
    file.write(line)
    file.flush()
    os.fsync(file.fileno())


def _old(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def recover(directory: str | Path) -> None:
    """Put `.NAME.old` back at `directory` when a kill between a swap's two renames left nothing there.

    Run by readers too. Only where the swap takes two renames can a reader meet a live writer between them: it
    puts the old directory back and the writer's second rename then fails, loudly, leaving the old one whole."""
    directory = Path(directory)
    old = _old(directory)
    if directory.exists() or not old.is_dir():
        return
    try:
        os.replace(old, directory)
    except FileNotFoundError:  # another process recovered it first
        return
    fsync_directory(directory.parent)


def _discard(path: Path) -> None:
    """Delete the directory `path`, first renamed to a name nothing reads (so never half-deleted under its own)."""
    trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.trash-"))
    try:
        os.replace(path, trash)
    except FileNotFoundError:  # already gone: another writer discarded it
        pass
    shutil.rmtree(trash, ignore_errors=True)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl >= 1.2.2
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        renameat2.restype = ctypes.c_int
    return renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` atomically; False where this system cannot (nothing was changed then)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_in(finished: str | Path, directory: str | Path) -> None:
    """Put the fully written directory `finished` at `directory` (a sibling), replacing what was there, so that
    `directory` always holds the complete old or the complete new one (the module docstring says how)."""
    finished, directory = Path(finished), Path(directory)
    recover(directory)
    if _old(directory).exists():
        _discard(_old(directory))  # stale: the swap that left it had finished
    fsync_tree(finished)
    if not directory.exists():
        os.replace(finished, directory)
        fsync_directory(directory.parent)
    elif _exchange(finished, directory):
        fsync_directory(directory.parent)
        shutil.rmtree(finished)  # the old directory, under the temporary name now
    else:
        _swap_in_two_steps(finished, directory)
    _sweep(directory)


def _swap_in_two_steps(finished: Path, directory: Path) -> None:
    """The old directory aside as `.NAME.old`, then the new one in: where `_exchange` cannot be had."""
    old = _old(directory)
    os.replace(directory, old)
    fsync_directory(directory.parent)  # the old one is durable as .NAME.old before the target goes
    os.replace(finished, directory)
    fsync_directory(directory.parent)
    _discard(old)


def _sweep(directory: Path) -> None:
    """Delete what killed writes left beside `directory` (a whole checkpoint each, possibly): half-deleted old
    directories, and temporary directories whose writing process is gone."""
    for leftover in directory.parent.glob(f".{glob.escape(directory.name)}.*"):
        kind = leftover.name[len(directory.name) + 2 :]  # tmp-PID-XXXX, old.trash-XXXX or old
        if kind.startswith("old.trash-") or (kind.startswith("tmp-") and not _writer_alive(kind)):
            shutil.rmtree(leftover, ignore_errors=True)


def _writer_alive(kind: str) -> bool:
    """Whether the process that made `tmp-PID-XXXX` still runs (a name without a pid is never swept)."""
    pid = kind.split("-")[1]
    if os.name != "posix" or not pid.isdigit():  # os.kill(pid, 0) probes only on POSIX (on Windows it kills)
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_directory(directory: str | Path, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `directory`; when the block ends without an error it
    replaces `directory` (`swap_in`), otherwise it is removed and `directory` is left as it was.

    `may_replace(directory)` guards an existing `directory` (e.g. "only a previous output of ours"):
    when it says no, FileExistsError is raised before anything is written.
    """
    directory = Path(directory).expanduser().resolve()
    recover(directory)
    if directory.exists() and may_replace is not None and not may_replace(directory):
        raise FileExistsError(f"{directory} exists and is not a previous mllm output; choose another directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name tells a later write whether the process writing it is gone (`_sweep`).
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
