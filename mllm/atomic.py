"""Atomic directory writes: a directory is written in a temporary sibling and renamed into place.

A crash (or a kill) mid-write leaves either the old directory or the new one, never half of one.
Checkpoints, converted weights, exports and training snapshots are all written this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def swap_in(finished: Path, directory: Path) -> None:
    """Put a fully written `finished` directory at `directory`, replacing what was there.

    Two renames on one filesystem: a crash leaves either the old directory or the new one, never half.
    """
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(finished, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, directory)


@contextmanager
def atomic_directory(directory: str | Path, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `directory`; when the block ends without an error it
    replaces `directory`, otherwise it is removed and `directory` is left as it was.

    `may_replace(directory)` guards an existing `directory` (e.g. "only a previous output of ours"):
    when it says no, FileExistsError is raised before anything is written.
    """
    directory = Path(directory).expanduser().resolve()
    if directory.exists() and may_replace is not None and not may_replace(directory):
        raise FileExistsError(f"{directory} exists and is not a previous mllm output; choose another directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        yield tmp
        swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
