"""Container health checks without HTTP: python -m app.healthcheck worker."""

from __future__ import annotations

import socket
import sys

import redis

from app.core.config import get_settings
from app.services.queue.store import worker_key


def worker_alive(name: str) -> bool:
    """True while the worker named `name` (the container's hostname) keeps its presence fresh."""
    settings = get_settings()
    client = redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return client.exists(worker_key(name)) == 1
    except redis.RedisError:
        return False
    finally:
        client.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return 0 if worker_alive(argv[1] if len(argv) > 1 else socket.gethostname()) else 1
    print("usage: python -m app.healthcheck worker [NAME]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
