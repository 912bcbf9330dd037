"""Saved chats: one JSON file per conversation in a folder the user chooses (default `~/.cache/mllm/chats`, or under
$MLLM_CACHE), so `mllm ui` finds them again after a restart. Each file is replaced in one step (written aside,
fsynced, renamed: `mllm.atomic`), so a crash leaves the old version or the new one, never half a file.

The format (`FORMAT`, version 1), readable without mllm:
    {"format": "mllm-chat", "version": 1, "id": "<32 hex>", "title": "...", "created": <unix s>, "updated": <unix s>,
     "system": "..." or null,
     "turns": [{"text": "...", "images": ["<base64 PNG>", ...], "reply": "..." or null}, ...]}
Images are kept as the model saw them (its input size, e.g. 224 x 224), so a chat file stays small and a reopened
chat gives the model exactly what it had.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from app.scheduling import ChatError
from mllm.atomic import write_text_durably

FORMAT, VERSION = "mllm-chat", 1
CHAT_ID = re.compile(r"[0-9a-f]{32}")
MAX_TITLE = 80


@dataclass(frozen=True)
class SavedChat:
    id: str
    title: str
    created: float
    updated: float
    system: str | None
    turns: list[tuple[str, list[Image.Image], str | None]]
    """(user text, images as the model saw them, reply or None) per exchange."""


def title_of(turns: list) -> str:
    first = next((text for text, _, _ in turns if text.strip()), "")
    title = " ".join(first.split()) or "(images)"
    return title if len(title) <= MAX_TITLE else title[: MAX_TITLE - 1] + "…"


class ChatStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ChatError(f"cannot create the chats folder {self.folder} ({e.strerror}); choose another") from e

    def _path(self, chat_id: str) -> Path:
        if not isinstance(chat_id, str) or not CHAT_ID.fullmatch(chat_id):
            raise ChatError(f"{chat_id!r} is not a saved chat's id (32 hex digits)")
        return self.folder / f"{chat_id}.json"

    def save(self, chat_id: str, system: str | None, turns: list, title: str | None = None) -> None:
        """Write the chat (`turns`: (text, PIL images, reply) per exchange), keeping its creation time and title."""
        path = self._path(chat_id)
        old = self._read(path) if path.exists() else None
        now = time.time()
        body = {
            "format": FORMAT,
            "version": VERSION,
            "id": chat_id,
            "title": title or (old or {}).get("title") or title_of(turns),
            "created": (old or {}).get("created", now),
            "updated": now,
            "system": system,
            "turns": [{"text": t, "images": [_png(i) for i in images], "reply": r} for t, images, r in turns],
        }
        write_text_durably(path, json.dumps(body, ensure_ascii=False))

    def list(self) -> list[SavedChat]:
        """The saved chats, most recently updated first, without their images decoded; unreadable files skipped."""
        chats = []
        for path in self.folder.glob("*.json"):
            try:
                body = self._read(path)
            except ChatError:
                continue
            chats.append(SavedChat(body["id"], body["title"], body["created"], body["updated"], body["system"], []))
        return sorted(chats, key=lambda c: c.updated, reverse=True)

    def load(self, chat_id: str) -> SavedChat:
        body = self._read(self._path(chat_id))
        try:
            turns = [(t["text"], [_image(i) for i in t["images"]], t["reply"]) for t in body["turns"]]
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ChatError(f"the saved chat {chat_id} is damaged ({e}); delete it") from e
        return SavedChat(body["id"], body["title"], body["created"], body["updated"], body["system"], turns)

    def rename(self, chat_id: str, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise ChatError("type a name for the chat first")
        path = self._path(chat_id)
        body = self._read(path)
        body["title"] = title[:MAX_TITLE]
        write_text_durably(path, json.dumps(body, ensure_ascii=False))

    def delete(self, chat_id: str) -> None:
        self._path(chat_id).unlink(missing_ok=True)

    def _read(self, path: Path) -> dict:
        if not path.is_file():
            raise ChatError(f"there is no saved chat {path.stem}; it may have been deleted")
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChatError(f"the saved chat {path.name} cannot be read ({e}); delete it") from e
        if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
            raise ChatError(f"{path.name} is not an mllm chat file (format {FORMAT!r}, version {VERSION})")
        if body.get("id") != path.stem or not isinstance(body.get("turns"), list):
            raise ChatError(f"the saved chat {path.name} is damaged (its id or turns); delete it")
        return body


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(data: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
        return image.convert("RGB")
