"""One ChatEngine conversation's state, and reading it back: history, rollback, export to LLaVA JSON.

A conversation is a ChatSession (messages, images, KV cache) plus the caller's image sources
(paths for the UI), kept aligned with `session.images`. No locking and no model calls here: the
engine reserves a conversation (`active`) before anything below changes it. `Exports` keeps the UI's
exported files from piling up on disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from mllm.session import ChatSession, image_count, text_of

Exchange = tuple[str, list, list, str | None]  # (user text, PIL images, caller's sources, reply or None)


@dataclass(frozen=True)
class Turn:
    text: str
    """What the user typed."""
    images: list
    """The images of this turn as the caller gave them (paths for the UI)."""
    reply: str | None
    """The assistant's answer; None while it is being generated."""


@dataclass
class Conversation:
    session: ChatSession
    sources: list = field(default_factory=list)  # caller's image sources, aligned with session.images
    active: object = None  # the running Stream, RESERVED while a request is being set up, or None


RESERVED = object()


def rollback(conv: Conversation, n_messages: int) -> None:
    """Keep the first `n_messages` messages and their images; the KV cache is cropped on the next turn."""
    session = conv.session
    session.rollback(n_messages)
    conv.sources = conv.sources[: len(session.images)]


def exchanges(conv: Conversation) -> list[Exchange]:
    """(user text, PIL images, caller's sources, reply) per exchange."""
    out, n = [], 0
    for message in conv.session.messages:
        if message["role"] == "user":
            k = image_count(message)
            out.append((text_of(message), conv.session.images[n : n + k], conv.sources[n : n + k], None))
            n += k
        elif message["role"] == "assistant" and out:
            out[-1] = (*out[-1][:3], message["content"])
    return out


def write_llava(directory: str | Path, answered: list[Exchange], system: list[str], image_token: str) -> Path:
    """Write one LLaVA row (a JSON list of one) with its images as PNG beside it; returns the JSON file's path.

    Every exchange must have its answer (a training row needs them all); the engine filters first.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    row_id = f"chat-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    names, turns = [], [{"from": "system", "value": s} for s in system]
    for text, images, _, reply in answered:
        for image in images:
            names.append(f"{row_id}-{len(names) + 1}.png")
            image.save(directory / names[-1])
        # Same layout as the chat's image parts: one placeholder line per image, then the text.
        turns.append({"from": "human", "value": f"{image_token}\n" * len(images) + text})
        turns.append({"from": "gpt", "value": reply})
    path = directory / f"{row_id}.json"
    path.write_text(json.dumps([{"id": row_id, "image": names, "conversations": turns}], indent=2) + "\n")
    return path


class Exports:
    """Folders for downloadable exports, all inside one folder per process that is deleted at the end.

    Each export gets a fresh folder owned by a key (the UI's browser session). An owner keeps its last `keep`
    exports: a new one deletes the oldest, whose download the page no longer shows. At most `max_total` are kept
    in all, oldest first, so clients that never close their session cannot fill the disk either. `drop(owner)`
    deletes an owner's (its tab closed) and `close()` everything; an Exports garbage-collected or left open at
    interpreter exit deletes its folder too. Owners are opaque keys (a session id comes from the client), never
    part of a path.
    """

    def __init__(self, parent: str | Path | None = None, keep: int = 3, max_total: int = 256):
        if keep < 1 or max_total < 1:
            raise ValueError(f"need keep >= 1 and max_total >= 1, got {keep}, {max_total}")
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="mllm-exports-", dir=parent))
        self.keep, self.max_total = keep, max_total
        self._folders: deque[tuple[object, Path]] = deque()  # (owner, folder), oldest first
        self._lock = threading.Lock()
        self._delete_root = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def folder(self, owner: object) -> Path:
        """A new empty folder for one of `owner`'s exports; the oldest past the limits are deleted."""
        with self._lock:
            folder = Path(tempfile.mkdtemp(dir=self.root))
            self._folders.append((owner, folder))
            self._remove([entry for entry in self._folders if entry[0] == owner][: -self.keep])
            self._remove(list(self._folders)[: max(0, len(self._folders) - self.max_total)])
            return folder

    def owned(self, owner: object) -> list[Path]:
        """`owner`'s export folders, oldest first."""
        with self._lock:
            return [folder for key, folder in self._folders if key == owner]

    def discard(self, folder: Path) -> None:
        """Delete one folder (an export that failed)."""
        with self._lock:
            self._remove([entry for entry in self._folders if entry[1] == folder])

    def drop(self, owner: object) -> None:
        with self._lock:
            self._remove([entry for entry in self._folders if entry[0] == owner])

    def close(self) -> None:
        with self._lock:
            self._folders.clear()
            self._delete_root()

    def _remove(self, entries: list[tuple[object, Path]]) -> None:
        for entry in entries:
            self._folders.remove(entry)
            shutil.rmtree(entry[1], ignore_errors=True)
