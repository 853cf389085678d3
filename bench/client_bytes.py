"""Benchmark: bytes the web client downloads to show a 48-image queue of 1024x1024 photo-like images,
with each grid tile loading the full image (before thumbnails) against its ~256 px WebP thumbnail.

python -m bench.client_bytes [--images 48]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import httpx

from bench.common import ROOT, auth, free_port, new_user, private_redis, report, stack, wait_done, wait_until
from bench.http_throughput import answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.openai_server", "--port", str(port), "--photo"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: answers(url), 20, what="OpenAI-protocol server")
        with private_redis() as redis_server, stack(redis_server.url, workers=1, concurrency=8,
                                                    IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=url,
                                                    IMAGE_MODEL="bench") as (base, _):
            headers = auth(new_user())
            with httpx.Client(base_url=base, timeout=120) as client:
                r = client.post("/create-queue", headers=headers, json={
                    "prompts": ["a photograph"], "count": args.images, "width": 1024, "height": 1024})
                r.raise_for_status()
                qid = r.json()["queue_id"]
                wait_done(client, headers, qid, interval=0.2)
                images = client.get(f"/queue-status/{qid}", headers=headers).json()["images"]
                full = sum(len(client.get(img["url"]).content) for img in images)
                thumbs = sum(len(client.get(img["thumbnail_url"]).content) for img in images)
        print(f"# web client: a {args.images}-image queue of 1024x1024 photo-like PNGs", flush=True)
        report("bytes downloaded for the grid, full images (before)", full / 1e6, "MB")
        report("bytes downloaded for the grid, thumbnails", thumbs / 1e6, "MB", "", full / 1e6, "full images")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
