"""Benchmark: the S3 client for the image store. Puts of 2.6 MB objects (a 1024x1024 photo-like PNG)
into a private SeaweedFS from one process, N at a time on one event loop: obstore (the one used),
and aiobotocore when it is installed (`pip install aiobotocore`), for the comparison that chose it.

python -m bench.s3_client [--objects 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.common import ROOT, report
from tests.seaweedfs import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedServer

SIZE = 2_600_000
BUCKET = "bench"


async def obstore_puts(endpoint: str, data: bytes, n: int, concurrency: int) -> float:
    from app.services.images.s3 import S3Store

    store = S3Store(f"s3://{BUCKET}/obstore", endpoint_url=endpoint, access_key_id=ACCESS_KEY_ID,
                    secret_access_key=SECRET_ACCESS_KEY)
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            await store.put(f"q/{i + 1}.png", data, "image/png")

    await one(-1)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def aiobotocore_puts(endpoint: str, data: bytes, n: int, concurrency: int) -> float:
    from aiobotocore.config import AioConfig  # type: ignore[import-not-found]
    from aiobotocore.session import get_session  # type: ignore[import-not-found]

    config = AioConfig(max_pool_connections=concurrency * 2, s3={"addressing_style": "path"},
                       request_checksum_calculation="when_required")
    async with get_session().create_client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY_ID,
                                           aws_secret_access_key=SECRET_ACCESS_KEY, region_name="us-east-1",
                                           config=config) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                await client.put_object(Bucket=BUCKET, Key=f"aiobotocore/q/{i + 1}.png", Body=data,
                                        ContentType="image/png")

        await one(-1)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)


RUNNERS = {"obstore": obstore_puts, "aiobotocore": aiobotocore_puts}


def child(client: str, endpoint: str, n: int, concurrency: int) -> None:
    """One client in a process of its own, so its CPU time and memory are its alone."""
    data = os.urandom(SIZE)
    cpu0 = time.process_time()
    rate = asyncio.run(RUNNERS[client](endpoint, data, n, concurrency))
    cpu_ms = (time.process_time() - cpu0) / (n + 1) * 1000
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rate": rate, "cpu_ms": cpu_ms, "rss_mb": rss_mb}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.endpoint, args.objects, args.concurrency)
        return
    clients = ["obstore"] + (["aiobotocore"] if importlib.util.find_spec("aiobotocore") else [])
    with TemporaryDirectory() as tmp:
        server = SeaweedServer(Path(tmp)).start()
        try:
            server.create_bucket(BUCKET)
            print(f"# S3 client: {args.objects} puts of {SIZE / 1e6:.1f} MB into a private SeaweedFS, "
                  f"N={args.concurrency}", flush=True)
            if len(clients) == 1:
                print("(aiobotocore not installed: pip install aiobotocore for the comparison)", flush=True)
            for client in clients:
                out = subprocess.run([sys.executable, "-m", "bench.s3_client", "--child", client, "--endpoint",
                                      server.endpoint, "--objects", str(args.objects), "--concurrency",
                                      str(args.concurrency)], capture_output=True, text=True, check=True, cwd=ROOT)
                figures = json.loads(out.stdout.strip().splitlines()[-1])
                report(f"{client}: puts/s", figures["rate"], "puts/s")
                report(f"{client}: client CPU per put", figures["cpu_ms"], "ms")
                report(f"{client}: peak RSS of the process", figures["rss_mb"], "MB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
