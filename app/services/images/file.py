"""Images as files under one directory: `file:///abs/dir`, for one host or a volume every host mounts.

Writes go to a temporary file beside the target, are flushed to disk and renamed into place, so a
reader sees a whole image or none. Disk work runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import BinaryIO

from app.services.images.base import (
    MARKER_KEY,
    READ_CHUNK_BYTES,
    ObjectMissing,
    ObjectStream,
    StoredObject,
    StoreUnavailable,
    check_key,
    check_prefix,
    content_type_of,
)

TMP_SUFFIX = ".tmp"


def _etag(st: os.stat_result) -> str:
    """Size and modification time, as web servers do for static files: objects never change in place."""
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


class FileStore:
    """Objects as files below `root`; keys are relative paths."""

    kind = "file"

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"the image directory must be an absolute path, not {str(root)!r}")
        self.root = root

    @property
    def location(self) -> str:
        return f"file://{self.root}"

    def path_of(self, key: str) -> Path:
        return self.root / check_key(key)

    # -- write ------------------------------------------------------------------------------
    async def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        path = self.path_of(key)
        try:
            st = await asyncio.to_thread(self._write, path, data)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {path}: {exc.strerror or exc}") from exc
        return StoredObject(key, st.st_size, content_type, _etag(st))

    @staticmethod
    def _write(path: Path, data: bytes) -> os.stat_result:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return path.stat()

    # -- read -------------------------------------------------------------------------------
    async def open(self, key: str, byte_range: tuple[int, int] | None = None) -> ObjectStream:
        path = self.path_of(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(f"no object {key!r} in {self.location}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
        st = os.fstat(f.fileno())
        start, stop = byte_range if byte_range is not None else (0, st.st_size)
        stop = min(stop, st.st_size)
        return ObjectStream(key, st.st_size, content_type_of(key), _etag(st), start, stop,
                            self._chunks(f, start, stop), f.close)

    @staticmethod
    async def _chunks(f: BinaryIO, start: int, stop: int) -> AsyncIterator[bytes]:
        try:  # the file is closed however the reader stops
            if start:
                await asyncio.to_thread(f.seek, start)
            left = stop - start
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(READ_CHUNK_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def get(self, key: str) -> bytes:
        path = self.path_of(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise ObjectMissing(f"no object {key!r} in {self.location}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc

    async def exists(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            st = await asyncio.to_thread(path.stat)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise StoreUnavailable(f"cannot look up {path}: {exc.strerror or exc}") from exc
        return stat.S_ISREG(st.st_mode)

    # -- delete -----------------------------------------------------------------------------
    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self.path_of(k) for k in keys]

        def remove() -> None:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

        await asyncio.to_thread(remove)

    async def delete_prefix(self, prefix: str) -> int:
        directory = self.root / check_prefix(prefix)[:-1]

        def remove() -> int:
            if not directory.is_dir():
                return 0
            count = sum(1 for p in directory.rglob("*") if p.is_file() and not p.name.endswith(TMP_SUFFIX))
            shutil.rmtree(directory, ignore_errors=True)
            return count

        try:
            return await asyncio.to_thread(remove)
        except OSError as exc:
            raise StoreUnavailable(f"cannot remove {directory}: {exc.strerror or exc}") from exc

    # -- the store as a whole ---------------------------------------------------------------
    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        return None

    async def identity(self) -> str:
        """A random id kept in a marker file at the root, written by the first process to start."""
        marker = self.root / MARKER_KEY

        def read_or_create() -> str:
            if not marker.exists():
                self.root.mkdir(parents=True, exist_ok=True)
                tmp = self.root / f"{MARKER_KEY}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
                tmp.write_text(uuid.uuid4().hex)
                try:
                    os.link(tmp, marker)  # atomic, and refuses to replace: the first writer's id wins
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
            return marker.read_text().strip()

        try:
            return await asyncio.to_thread(read_or_create)
        except OSError as exc:
            raise StoreUnavailable(f"cannot use {self.root}: {exc.strerror or exc}") from exc

    async def check(self) -> None:
        await self.identity()
        if not await asyncio.to_thread(os.access, self.root, os.W_OK):
            raise StoreUnavailable(f"{self.root} is not writable by this process")

    async def aclose(self) -> None:
        return None
