"""Benchmark 3: status polling under load, against a bare FastAPI endpoint in the same run.

python -m bench.polling [--pollers 200] [--seconds 10] [--interval 0.5]

Two measures, each for imagequeue's GET /queue-status (summary of a running 1,000-image queue,
one API process) and for a bare FastAPI endpoint (one uvicorn process):
- open loop: `pollers` clients each polling every `interval` seconds (browsers polling a status):
  latency p50/p99;
- closed loop: the same clients polling back to back: requests/s the server sustains.
The load generator runs on the same 2 cores, so both sides pay for it equally.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx

from app.harness import http_ok, start_server
from bench.common import LOG_DIR, ROOT, auth, free_port, new_user, pct, private_redis, report, service_env, start_api


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 GET on an open connection; returns the status code."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def load(url: str, headers: dict[str, str], pollers: int, seconds: float,
               interval: float) -> tuple[list[float], int, int]:
    """A minimal keep-alive load generator (raw asyncio streams: cheaper per request than an HTTP client
    library, so the generator is not what is measured)."""
    parts = httpx.URL(url)
    target = parts.raw_path.decode()
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.host}:{parts.port}"] + [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def poller(i: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.host, parts.port)
        await asyncio.sleep(interval * i / pollers)  # spread the start
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if await _get(reader, writer, request) != 200:
                    errors += 1
                took = time.perf_counter() - t0
                latencies.append(took)
                if interval:
                    await asyncio.sleep(max(0.0, interval - took))
        finally:
            writer.close()

    await asyncio.gather(*(poller(i) for i in range(pollers)))
    return latencies, len(latencies), errors


def measure(name: str, url: str, headers: dict[str, str], args: argparse.Namespace) -> float:
    lat, _n, errors = asyncio.run(load(url, headers, args.pollers, args.seconds, args.interval))
    report(f"{name}: open loop p50", pct(lat, 50) * 1000, "ms")
    report(f"{name}: open loop p99", pct(lat, 99) * 1000, "ms", "<= 20 ms" if "status" in name else "")
    _, n_closed, errors_closed = asyncio.run(load(url, headers, args.pollers, args.seconds, 0))
    rate = n_closed / args.seconds
    report(f"{name}: closed loop", rate, "req/s")
    assert errors == 0 and errors_closed == 0, (errors, errors_closed)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    print(f"# polling: {args.pollers} pollers, {args.seconds:g} s per measure, open-loop interval {args.interval:g} s")
    port = free_port()
    bare = start_server([sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port), "--no-access-log",
                         "--log-level", "warning"], name="bare", ready=http_ok(f"http://127.0.0.1:{port}/ping"),
                        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, log_dir=LOG_DIR)
    with private_redis() as server:
        api, base = start_api(service_env(server.url, LOG_LEVEL="WARNING"))
        try:
            headers = auth(new_user())
            with httpx.Client(base_url=base, timeout=60) as client:
                qid = client.post("/create-queue", headers=headers, json={
                    "prompts": ["p"], "count": 1000, "width": 64, "height": 64}).json()["queue_id"]
            bare_rate = measure("bare FastAPI GET /ping", f"http://127.0.0.1:{port}/ping", {}, args)
            status_rate = measure("GET /queue-status summary", f"{base}/queue-status/{qid}?images_limit=0",
                                  headers, args)
            report("status req/s vs bare", status_rate, "req/s", ">= 60% of bare", bare_rate, "bare")
        finally:
            api.stop()
            bare.stop()


if __name__ == "__main__":
    main()
