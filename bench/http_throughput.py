"""Benchmark: images/s through the service against an OpenAI-protocol server over HTTP, against
that server driven alone by one plain async httpx client in the same run.

python -m bench.http_throughput [--latency-ms 50] [--concurrency 32] [--images 1000] [--size 64] [--rounds 3]

The server (bench.openai_server) runs in its own process on loopback. The baseline sends the same
requests with N in flight and decodes each answer (JSON, base64) with the standard library, as a
plain client does; a second baseline decodes as the worker does (orjson, pybase64), to show what
the service adds beyond its faster decoding. The service runs one worker with --concurrency=N and
the `openai` provider pointed at the same server. The two take turns, `rounds` times, and the
figure is the median of each round's ratio: on a shared machine the load of the moment moves both
sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import orjson
import pybase64

from app.harness import start_server
from bench.common import IMAGE_TMP_DIR, LOG_DIR, auth, free_port, new_user, private_redis, report, stack, wait_done
from tests.seaweedfs import SEAWEEDFS_BUCKET, SeaweedServer


def provider_alone(url: str, images: int, concurrency: int, size: int, *, fast: bool = False) -> float:
    """The server driven by one async httpx client; `fast` decodes as the worker does (orjson, pybase64)
    instead of as a plain client does (json, base64)."""
    parse, b64decode = (orjson.loads, pybase64.b64decode) if fast else (json.loads, base64.b64decode)

    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=concurrency,
                                                         max_keepalive_connections=concurrency)) as client:
            slots = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with slots:
                    r = await client.post("/images/generations", json={
                        "prompt": f"benchmark {i}", "n": 1, "size": f"{size}x{size}", "response_format": "b64_json"})
                    r.raise_for_status()
                    b64decode(parse(r.content)["data"][0]["b64_json"])

            await asyncio.gather(*(one(i) for i in range(min(images, 4 * concurrency))))  # warm-up
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(images)))
            return images / (time.perf_counter() - t0)

    return asyncio.run(run())


def through_service(base: str, images: int, size: int, per_prompt: int = 100) -> float:
    headers = auth(new_user())
    with httpx.Client(base_url=base, timeout=120) as client:
        t0 = time.perf_counter()
        r = client.post("/create-queue", headers=headers, json={
            "prompts": [f"benchmark {i}" for i in range(max(1, images // per_prompt))],
            "count": min(images, per_prompt), "width": size, "height": size})
        r.raise_for_status()
        done = wait_done(client, headers, r.json()["queue_id"])
        elapsed = time.perf_counter() - t0
    assert done["succeeded"] == done["total"], done
    return int(done["total"]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--photo", action="store_true", help="photo-like images (large PNGs)")
    parser.add_argument("--store", choices=("file", "s3", "redis"), default="file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-dir", default=IMAGE_TMP_DIR,
                        help="where the file store's temporary directory goes (default: tmpfs, so the figure "
                             "measures the service rather than the disk; give a disk path to include it)")
    args = parser.parse_args()
    with contextlib.ExitStack() as resources:
        tmp = Path(resources.enter_context(TemporaryDirectory(dir=args.image_dir)))
        store_env: dict[str, str] = {"IMAGE_STORE": "redis" if args.store == "redis" else f"file://{tmp}/images"}
        if args.store == "s3":
            seaweed = SeaweedServer(tmp / "seaweedfs").start()
            resources.callback(seaweed.stop)
            seaweed.create_bucket(SEAWEEDFS_BUCKET)
            store_env = seaweed.env("bench")
        run(args, store_env)


def run(args: argparse.Namespace, store_env: dict[str, str]) -> None:
    n, lat = args.concurrency, args.latency_ms
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = start_server([sys.executable, "-m", "bench.openai_server", "--port", str(port), "--latency-ms", str(lat),
                           *(["--photo"] if args.photo else [])], name="openai-server", ready=lambda: answers(url),
                          log_dir=LOG_DIR)
    try:
        kind = "photo-like" if args.photo else "flat"
        print(f"# http throughput: openai protocol over loopback, {args.size}x{args.size} {kind} PNGs, "
              f"L={lat:g} ms, N={n}, {args.images} images, {args.store} image store "
              f"(in {args.image_dir or 'the temp dir'}), {args.rounds} rounds (provider alone, then the service)",
              flush=True)
        alone: list[float] = []
        alone_fast: list[float] = []
        service: list[float] = []
        with private_redis() as redis_server, stack(
            redis_server.url, workers=1, concurrency=n, IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=url,
            IMAGE_MODEL="bench", MAX_IMAGES_PER_QUEUE=100_000, **store_env,
        ) as (base, _):
            through_service(base, min(4 * n, args.images), args.size)  # warm-up
            for _ in range(args.rounds):
                alone.append(provider_alone(url, args.images, n, args.size))
                alone_fast.append(provider_alone(url, args.images, n, args.size, fast=True))
                service.append(through_service(base, args.images, args.size))
                print(f"  round {len(service)}: alone {alone[-1]:.1f}, alone with the worker's decoder "
                      f"{alone_fast[-1]:.1f}, the service {service[-1]:.1f} img/s", flush=True)
        ideal = n / (lat / 1000)
        report("provider alone (one async httpx client, N in flight)", statistics.median(alone), "img/s", "",
               ideal, "ideal N/L")
        report("  same, decoding as the worker does (orjson, pybase64)", statistics.median(alone_fast), "img/s", "",
               ideal, "ideal N/L")
        for label, baseline, target in (("vs the provider alone", alone, "  [target >= 0.95]"),
                                        ("vs the alone, same decoder", alone_fast, "")):
            ratios = [s / a for s, a in zip(service, baseline, strict=True)]
            print(f"{'imagequeue W=1':<58} {statistics.median(service):>10.2f} img/s    ratio "
                  f"{statistics.median(ratios):6.3f} {label} (median of {args.rounds} rounds, "
                  f"{min(ratios):.2f}-{max(ratios):.2f}){target}", flush=True)
    finally:
        server.stop(10)


def answers(url: str) -> bool:
    try:
        return httpx.post(url + "/images/generations", json={"size": "8x8"}, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
