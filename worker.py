"""imagequeue worker: python worker.py --concurrency=N [--models a,b] [--queues ...] [--burst] [--name NAME]."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import Settings

log = logging.getLogger("imagequeue.worker")
RQ_WORKER_TTL_SECONDS = 35  # RQ dequeues block for ttl - 15 s, so it heartbeats every 20 s when idle
RESTART_PAUSE_SECONDS = 1.0


def parse_args(argv: list[str] | None = None, settings: Settings | None = None) -> argparse.Namespace:
    from app.core.config import get_settings

    settings = settings or get_settings()
    parser = argparse.ArgumentParser(description="Run an imagequeue worker (RQ + N concurrent generations).")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=settings.worker_concurrency,
        help="generations at once in this process (default: WORKER_CONCURRENCY or 8)",
    )
    parser.add_argument(
        "--models",
        default=os.environ.get("WORKER_MODELS", ""),
        help="comma-separated models to serve (default: all configured)",
    )
    parser.add_argument(
        "--queues", default="", help="comma-separated RQ queue names to listen on (default: those of --models)"
    )
    parser.add_argument("--burst", action="store_true", help="run until no work is left, then exit")
    parser.add_argument("--name", default=None, help="worker name (default: host.pid.random)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("WORKER_METRICS_PORT", "0")),
        help="serve this worker's Prometheus metrics on this port (0: off)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=settings.worker_grace_seconds,
        help="seconds to let running images finish on SIGTERM before handing them back",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    # A stop that arrives while the worker is still starting (imports, catalogue) is remembered and
    # honoured once the runtime exists: a stop is always a clean stop, never a death by signal.
    early_stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: early_stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: early_stop.append(signum))

    import redis

    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.core.metrics import serve_worker_metrics
    from app.services.models import load_catalog
    from app.services.queue.worker import ImageWorker, WorkerRuntime, queue_names

    settings = get_settings()
    args = parse_args(argv, settings)
    configure_logging(settings.log_level, "worker")
    catalog = load_catalog(settings)
    models = [m.strip() for m in args.models.split(",") if m.strip()] or list(catalog.models)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] or queue_names(models)
    name = args.name or f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"
    connection = redis.Redis.from_url(
        settings.effective_redis_url, socket_connect_timeout=settings.redis_connect_timeout
    )
    runtime = WorkerRuntime(settings, catalog, name=name, concurrency=args.concurrency, models=models)
    runtime.start(connection)
    if args.metrics_port:
        serve_worker_metrics(runtime.metrics.registry, args.metrics_port, settings.worker_metrics_host,
                             settings.metrics_token)
    log.info(
        "worker %s serving %s on %s, concurrency %d",
        name,
        ",".join(models),
        ",".join(queues),
        args.concurrency,
        extra={"worker": name},
    )
    grace = args.grace

    def stop(signum: int, _frame: object) -> None:
        runtime.request_stop()  # until RQ's worker runs and installs its own handlers (which do the same)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if early_stop:
        runtime.request_stop()
    try:
        while not runtime.stopping:
            try:
                # RQ's Worker talks to Redis as it is built: inside the try, so a worker started
                # before Redis (or during an outage) waits for it instead of exiting.
                worker = ImageWorker(
                    queues, connection=connection, name=name, runtime=runtime, worker_ttl=RQ_WORKER_TTL_SECONDS
                )
                connection.delete(worker.key)  # a previous run of ours that died with Redis
                worker.work(burst=args.burst, logging_level="WARNING")
            except redis.RedisError as exc:
                log.warning("lost Redis (%s); reconnecting", exc, extra={"worker": name})
            if runtime.stopping:
                break
            if args.burst:
                runtime.drain()
                if runtime.in_flight == 0 and runtime.claimable() == 0:
                    break
            time.sleep(RESTART_PAUSE_SECONDS if not args.burst else 0.05)
    except SystemExit:
        grace = 0.0  # a second signal: hand back at once
    finally:
        if args.burst and not runtime.stopping:
            while runtime.in_flight:
                time.sleep(0.05)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        runtime.shutdown(grace)
        connection.close()
        log.info("worker %s stopped", name, extra={"worker": name})
    return 0


if __name__ == "__main__":
    sys.exit(main())
