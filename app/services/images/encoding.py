"""Output formats and thumbnails: what is stored for one generated image; and running images' previews.

CPU-bound (Pillow), so callers run `encode` in a thread (`encode_async`), never on the event loop.
The default keeps the provider's PNG byte for byte (no decode for the image itself); only the
thumbnail needs the pixels.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from app.models.queue import OutputFormat

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
DEFAULT_QUALITY = 90  # for webp and jpeg when the request names none
THUMBNAIL_PX = 256  # longest side
THUMBNAIL_QUALITY = 75
# libwebp's effort for thumbnails and previews: at 256 px, method 1 took a third of method 4's time
# (2.3 against 7.2 ms) for a slightly smaller file (9.9 against 10.7 kB of a photo-like image)
THUMBNAIL_METHOD = 1
PREVIEW_QUALITY = 60  # a running image's preview: seen for a moment, replaced at the next step
MAX_PIXELS = 64 * 1024 * 1024  # far past any configurable size: a provider's answer beyond it is refused


class ImageUnreadable(ValueError):
    """The provider's bytes are not an image Pillow can read."""


@dataclass(frozen=True, slots=True)
class EncodedImage:
    data: bytes
    content_type: str
    width: int
    height: int
    thumbnail: bytes | None  # a WebP of at most THUMBNAIL_PX on its longest side


def encode(
    data: bytes, output_format: OutputFormat = "png", quality: int | None = None, *, thumbnail: bool | None = True
) -> EncodedImage:
    """The image in `output_format` (the provider's bytes as they are when already in that format,
    unless a lossy quality was asked for), its size and, with `thumbnail`, a small WebP of it (None:
    only when the pixels had to be decoded anyway, to re-encode them)."""
    with _reading(data, "image") as im:
        width, height = im.size
        source = (im.format or "").lower()
        keep = source == output_format and (output_format == "png" or quality is None)
        out, content_type = data, CONTENT_TYPES[output_format]
        if not keep:
            im.load()
            out = _save(im, output_format, quality or DEFAULT_QUALITY)
        elif not thumbnail:
            _CHECKS[source](data)  # kept without decoding: at least whole, by its own structure
        thumb = _thumbnail(im) if thumbnail or (thumbnail is None and not keep) else None
    return EncodedImage(out, content_type, width, height, thumb)


def _check_png(data: bytes) -> None:
    """ImageUnreadable unless the PNG is whole: every chunk complete with its CRC right, up to IEND (a
    few ms for 2.6 MB, against 25 ms to decode it). An answer cut short fails here, not in a browser."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            break
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            kind = bytes(view[pos + 4 : pos + 8]).decode("latin-1")
            raise ImageUnreadable(f"the provider's image is damaged (the CRC of its {kind} chunk is wrong)")
        if view[pos + 4 : pos + 8] == b"IEND":
            return
        pos = end
    raise ImageUnreadable("the provider's image is cut short (its PNG ends before IEND)")


def _check_jpeg(data: bytes) -> None:
    """ImageUnreadable unless the JPEG's image data is closed by an end-of-image marker: its segments
    are walked to the first scan, after which entropy-coded data never holds one (an embedded
    thumbnail's lies in a segment before it). Bytes after the marker (padding, a trailer) are allowed."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            raise ImageUnreadable("the provider's image is damaged (its JPEG segments do not line up)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker == 0xDA:  # start of scan: the image data follows, to the end-of-image marker
            if data.find(b"\xff\xd9", pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")) < 0:
                break
            return
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise ImageUnreadable("the provider's image is cut short (its JPEG has no end-of-image marker)")


def _whole_when_opened(data: bytes) -> None:
    """Pillow's WebP reader demuxes the whole file to open it: a WebP cut short or damaged fails there."""


_CHECKS: dict[str, Callable[[bytes], None]] = {"png": _check_png, "jpeg": _check_jpeg, "webp": _whole_when_opened}


def thumbnail_webp(data: bytes) -> bytes:
    """A stored image's thumbnail, made when it is first asked for (the worker makes none for images
    it stores as the provider sent them: decoding a large PNG is most of a worker's CPU per image)."""
    with _reading(data, "image") as im:
        return _thumbnail(im)


def preview_webp(data: bytes) -> bytes:
    """A running image's preview (PNG, JPEG or WebP from the provider) as a small WebP, at most
    THUMBNAIL_PX on its longest side: what is kept of it and served, whatever the provider sent."""
    with _reading(data, "preview") as im:
        return _thumbnail(im, PREVIEW_QUALITY)


@contextlib.contextmanager
def _reading(data: bytes, what: str) -> Iterator[ImageFile.ImageFile]:
    """The provider's bytes opened (not yet decoded), with Pillow's failures and oversized images
    turned into ImageUnreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ImageUnreadable(f"the provider's {what} is too large ({width}x{height})")
            yield im
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise ImageUnreadable(f"the provider's {what} could not be read: {exc}") from exc


async def encode_async(
    data: bytes, output_format: OutputFormat = "png", quality: int | None = None, *, thumbnail: bool | None = True
) -> EncodedImage:
    return await asyncio.to_thread(encode, data, output_format, quality, thumbnail=thumbnail)


def _save(im: Image.Image, fmt: OutputFormat, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG", compress_level=6)
    elif fmt == "jpeg":
        im.convert("RGB").save(buf, "JPEG", quality=quality, optimize=False)
    else:
        im = im if im.mode in ("RGB", "RGBA") else im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def _thumbnail(im: ImageFile.ImageFile, quality: int = THUMBNAIL_QUALITY) -> bytes:
    small: Image.Image = im if im.tile else im.copy()  # unloaded: decode straight into the small copy
    # Before the pixels are loaded, thumbnail() can have the decoder scale down (JPEG draft mode).
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BICUBIC, reducing_gap=2.0)
    if small.mode not in ("RGB", "RGBA"):
        small = small.convert("RGBA" if "A" in small.getbands() else "RGB")
    buf = io.BytesIO()
    small.save(buf, "WEBP", quality=quality, method=THUMBNAIL_METHOD)
    return buf.getvalue()
