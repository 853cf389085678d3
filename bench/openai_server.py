"""A minimal OpenAI Images protocol server for benchmarks, run as its own process.

python -m bench.openai_server --port P [--latency-ms 50] [--photo]

Answers `POST /v1/images/generations` after the latency with one `b64_json` image of the requested
size: a flat PNG by default, or with `--photo` one with photo-like detail (noise and gradients,
which PNG cannot compress much: about 2.6 MB at 1024x1024). Images are made once per size and
cached, so the server's own cost per request is the JSON answer, as a real model server's is.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import time
from functools import cache

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def photo_like_png(width: int, height: int) -> bytes:
    """A PNG with detail everywhere (noise over gradients): as large as a photograph's PNG."""
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 64)
    rgb = Image.merge("RGB", (gradient, noise, Image.blend(gradient, noise, 0.5)))
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return buf.getvalue()


def flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buf, "PNG")
    return buf.getvalue()


def build_app(latency_s: float, photo: bool) -> Starlette:
    @cache
    def answer(size: str) -> bytes:
        width, height = (int(v) for v in size.split("x"))
        data = photo_like_png(width, height) if photo else flat_png(width, height)
        b64 = base64.b64encode(data).decode()
        return b'{"created": %d, "data": [{"b64_json": "%s"}]}' % (int(time.time()), b64.encode())

    async def generations(request: Request) -> Response:
        body = await request.json()
        if latency_s:
            await asyncio.sleep(latency_s)
        return Response(answer(str(body.get("size", "64x64"))), media_type="application/json")

    return Starlette(routes=[Route("/v1/images/generations", generations, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--photo", action="store_true")
    args = parser.parse_args()
    uvicorn.run(build_app(args.latency_ms / 1000, args.photo), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
