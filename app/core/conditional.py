"""Conditional GET: entity tags, If-None-Match, and the 200 and 304 answers that carry them (RFC 9110 13.1.2)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from starlette.responses import Response

# Answers are per user and change while a queue runs: caches may keep them, but only the user's
# own, and must ask again each time (a 304 costs one small Redis round trip).
CACHE_CONTROL = "private, no-cache"
MAX_HEADER_CHARS = 8192
_TAG = re.compile(r'(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_TAG_LIST = re.compile(r'^[\s,]*(?:(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"[ \t]*(?:,[\s,]*|$))+$')
_VERSIONED = re.compile(r"^(\d{1,18})-")


def make_etag(version: str | int, *parts: bytes | str | int | None) -> str:
    """A strong tag: the version it was made at, then a digest of everything else the answer depends on."""
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        digest.update(len(data).to_bytes(4, "big"))
        digest.update(data)
    return f'"{int(version)}-{digest.hexdigest()}"'


def if_none_match(header: str | None) -> list[str] | None:
    """The opaque tags of an If-None-Match header (weakness dropped: the comparison is weak),
    ["*"] for `*`, or None when absent or malformed (a malformed header is ignored)."""
    if header is None:
        return None
    if header.strip() == "*":
        return ["*"]
    if len(header) > MAX_HEADER_CHARS or not _TAG_LIST.match(header):
        return None
    return _TAG.findall(header)


def matches(tags: Iterable[str] | None, etag: str) -> bool:
    """Whether If-None-Match's tags name this representation (weak comparison; `*` matches any)."""
    if tags is None:
        return False
    opaque = etag.removeprefix("W/").strip('"')
    return any(tag == "*" or tag == opaque for tag in tags)


def known_versions(tags: Iterable[str] | None) -> list[str]:
    """The versions named by tags of make_etag's form: the reader may skip what did not change since."""
    return [m[1] for t in tags or () if (m := _VERSIONED.match(t))]


def tagged(body: bytes, etag: str, media_type: str = "application/json") -> Response:
    """The 200 answer with its ETag."""
    return Response(body, media_type=media_type, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})


def not_modified(etag: str) -> Response:
    """304: the client's copy is current (no body; the same ETag and caching headers as the 200)."""
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})
