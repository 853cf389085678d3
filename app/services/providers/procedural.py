"""The built-in provider: deterministic PNGs from prompt, seed and size, with no network.

With a progress listener it reports `steps` values (params.steps, default 4) spread over its simulated
latency, each but the last with a small PNG preview of the final image, coarse first and sharper later,
so the default set-up shows live progress with no GPU. Previews come only where steps are at least
PREVIEW_MIN_STEP_SECONDS apart: faster than that nobody would see them (a worker records a running
image's progress every 0.5 s at most), and rendering them would only load the worker's CPU, which a
model server's previews never do.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
import time
import zlib

from PIL import Image, ImageDraw

from app.services.providers.base import GeneratedImage, ImageRequest, ProviderRejected
from app.services.providers.progress import ProgressFeed

MAX_PROCEDURAL_LATENCY_MS = 60_000
DEFAULT_STEPS = 4
MAX_STEPS = 50
PREVIEW_MAX_SIDE = 64  # pixels of the sharpest preview's long side
PREVIEW_MIN_STEP_SECONDS = 0.1


def render(prompt: str, seed: int, width: int, height: int) -> bytes:
    """The image as PNG."""
    return png(_draw(prompt, seed, width, height))


def render_with_previews(prompt: str, seed: int, width: int, height: int, steps: int) -> tuple[bytes, list[bytes]]:
    """The image as PNG, and a preview PNG for each step but the last, growing from a few pixels."""
    img = _draw(prompt, seed, width, height)
    previews = []
    for step in range(1, steps):
        scale = min(1.0, PREVIEW_MAX_SIDE * step / steps / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        previews.append(png(img.resize(size, Image.Resampling.BOX)))
    return png(img), previews


def _draw(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """A vertical two-colour gradient with a few discs, all chosen by a hash of prompt and seed."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    rng = random.Random(digest)
    ends = Image.new("RGB", (1, 2))
    ends.putpixel((0, 0), (digest[0], digest[1], digest[2]))
    ends.putpixel((0, 1), (digest[3], digest[4], digest[5]))
    img = ends.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(3 + digest[6] % 5):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(max(2, short // 10), max(3, short // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    return img


def png(img: Image.Image) -> bytes:
    """An RGB image as PNG. Pillow's own PNG writer spends ~0.2 ms of fixed cost per image, which
    dominates small images at hundreds per second; the format is simple enough to write directly:
    signature, IHDR, one zlib-compressed IDAT of filter-0 rows, IEND."""
    width, height = img.size
    raw = img.tobytes()
    stride = width * 3
    rows = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")


class ProceduralProvider:
    """Built in, no network: a deterministic PNG from prompt + seed + size. With a simulated latency,
    a call takes that long in all, rendering included, as a model server's answer would."""

    name = "procedural"

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        fail = request.params.get("fail")
        try:
            latency = float(request.params.get("latency_ms", self.latency_ms))
        except (TypeError, ValueError):
            raise ProviderRejected("params.latency_ms must be a number of milliseconds") from None
        try:
            steps = min(max(1, int(request.params.get("steps", DEFAULT_STEPS))), MAX_STEPS)
        except (TypeError, ValueError, OverflowError):
            steps = DEFAULT_STEPS  # only shapes the progress: not worth failing an image over
        # A demo knob, not a way to hold a worker's slot: bounded (NaN compares false, so it becomes 0).
        latency = min(latency, MAX_PROCEDURAL_LATENCY_MS) / 1000 if latency > 0 else 0.0
        started = time.monotonic()
        if fail:
            await asyncio.sleep(latency)
            raise ProviderRejected(str(fail))
        feed = ProgressFeed(request.on_progress)
        try:
            # Always in the executor: measured, even 64x64 renders (~0.2 ms) are better there at 32 slots,
            # since a burst of them on the loop delays every other slot's next claim.
            loop = asyncio.get_running_loop()
            if not feed.wanted or latency / steps < PREVIEW_MIN_STEP_SECONDS:
                data = await loop.run_in_executor(
                    None, render, request.prompt, request.seed, request.width, request.height
                )
                previews: list[bytes] = []
            else:
                data, previews = await loop.run_in_executor(
                    None, render_with_previews, request.prompt, request.seed, request.width, request.height, steps
                )
            for step in range(1, steps + 1 if feed.wanted else 0):
                await _sleep_until(started + latency * step / steps)
                feed.report(step, steps, *((previews[step - 1], "image/png") if step <= len(previews) else ()))
            await _sleep_until(started + latency)
            return GeneratedImage(data)
        finally:
            await feed.aclose()

    async def interrupt(self, request: ImageRequest) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def _sleep_until(when: float) -> None:
    remaining = when - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)
