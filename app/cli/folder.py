"""The output folder: predictable image names, files written whole, the final status, and the state file
that lets the same `generate` run again resume its queue instead of making a second one.

State file `DIR/.imagequeue.json`: for each request sent from this folder (a fingerprint of the server
URL and the request body), the Idempotency-Key it was sent with and the queue it made. It is written
before the queue is created, so even a command killed during the create call resumes.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cli.errors import EXIT_FAILED, CliError
from app.client import EXTENSIONS, Downloaded, new_idempotency_key, write_atomic

STATE_FILE = ".imagequeue.json"
STATE_VERSION = 1
SLUG_LENGTH = 48


def slug(prompt: str) -> str:
    """`A Red Fox, at dawn!` -> `a-red-fox-at-dawn`: ASCII letters and digits, at most SLUG_LENGTH."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    words = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return words[:SLUG_LENGTH].rstrip("-") or "image"


def image_stem(index: int, seed: int, prompt: str) -> str:
    """`0003-45-a-red-fox`: the index first (zero-padded, so names sort in queue order), seed, prompt."""
    return f"{index:04d}-{seed}-{slug(prompt)}"


def fingerprint(server: str, request: dict[str, Any]) -> str:
    canonical = json.dumps({"server": server.rstrip("/"), "request": request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class Batch:
    """One request sent from this folder: its key, and the queue once known."""

    fingerprint: str
    idempotency_key: str
    queue_id: str | None = None
    resumed: bool = False


class OutputFolder:
    """Where a queue's images go."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: str | Path) -> OutputFolder:
        """The folder, created if need be; refused at once (exit 2) when it cannot be written."""
        folder = Path(path)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".imagequeue-probe-"):
                pass
        except OSError as exc:
            raise CliError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from exc
        return cls(folder)

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.path / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {"version": STATE_VERSION, "batches": {}}
        if not isinstance(state, dict) or not isinstance(state.get("batches"), dict):
            return {"version": STATE_VERSION, "batches": {}}
        return state

    def _save_state(self, batch: Batch) -> None:
        state = self._state()
        state["batches"][batch.fingerprint] = {"idempotency_key": batch.idempotency_key, "queue_id": batch.queue_id}
        self._write(self.path / STATE_FILE, json.dumps(state, indent=2).encode())

    def batch(self, server: str, request: dict[str, Any], *, new: bool = False) -> Batch:
        """The batch for this request: the one recorded here (resumed), or a new key, recorded first."""
        key = fingerprint(server, request)
        known = self._state()["batches"].get(key)
        if known and not new and isinstance(known.get("idempotency_key"), str):
            batch = Batch(key, known["idempotency_key"], known.get("queue_id"), resumed=True)
        else:
            batch = Batch(key, new_idempotency_key())
        self._save_state(batch)
        return batch

    def record(self, batch: Batch, queue_id: str) -> None:
        if batch.queue_id != queue_id:
            batch.queue_id = queue_id
            self._save_state(batch)

    # -- images -----------------------------------------------------------------------------
    def existing(self, stem: str) -> Path | None:
        """The image already on disk under this stem, whatever its format."""
        for extension in dict.fromkeys(EXTENSIONS.values()):
            candidate = self.path / f"{stem}.{extension}"
            if candidate.is_file():
                return candidate
        return None

    def save_image(self, stem: str, image: Downloaded) -> Path:
        path = self.path / f"{stem}.{image.extension}"
        self._write(path, image.content)
        return path

    def save_status(self, status: dict[str, Any]) -> Path:
        path = self.path / f"queue-{status['queue_id']}.json"
        self._write(path, json.dumps(status, indent=2).encode())
        return path

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}", EXIT_FAILED) from exc
