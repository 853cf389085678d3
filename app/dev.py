"""Run the whole service locally: Redis (embedded when none is configured or answering), API and a worker.

python -m app.dev [--port 8000] [--concurrency 8] [--workers 1]. Uses the local JWT secret (kept in
.data/) when JWT_SECRET is unset, and prints a ready-to-use token.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from app.core.config import Settings, get_settings
from app.core.local_auth import data_dir, token_for, with_local_secret
from app.harness import RedisServer, Stack, redis_answers, start_stack

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
STOP_GRACE_SECONDS = 40  # longer than WORKER_GRACE_SECONDS' default, so workers hand back, not die


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run imagequeue locally (API + worker + Redis).")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("WORKER_CONCURRENCY", "8")))
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--embedded-redis", action="store_true", help="always start a private Redis")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    embedded: RedisServer | None = None
    configured = get_settings().model_fields_set  # from the environment or .env
    if args.embedded_redis or not configured & {"redis_url", "redis_host"}:
        if not args.embedded_redis and redis_answers(DEFAULT_REDIS_URL):
            env["REDIS_URL"] = DEFAULT_REDIS_URL
            print(f"using the Redis answering at {DEFAULT_REDIS_URL}")
        else:
            # Its own session: the terminal's Ctrl+C does not reach it, and it stops last, after the workers.
            embedded = RedisServer(data_dir() / "redis", appendonly=True, fsync="everysec", own_session=True).start()
            env["REDIS_URL"] = embedded.url
            print(f"started an embedded Redis at {embedded.url} (data in {embedded.data_dir})")
    settings, local = with_local_secret(get_settings())
    if local is not None:
        env["JWT_SECRET"] = local.value
        print(f"{'generated a' if local.created else 'using the'} local JWT secret in {local.path}")
    env.setdefault("PROCEDURAL_LATENCY_MS", "1500")  # long enough for step progress and previews to show

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    stack: Stack | None = None
    try:
        stack = start_stack(env, workers=args.workers, worker_args=(f"--concurrency={args.concurrency}",),
                            host=args.host, port=args.port)
        _welcome(stack.base_url, settings)
        while not stopping and stack.api.alive and all(w.alive for w in stack.workers):
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as exc:
        print(f"imagequeue did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        # Workers and the API first (workers hand unfinished images back to Redis), Redis last.
        if stack is not None:
            stack.stop(STOP_GRACE_SECONDS)
        if embedded is not None:
            embedded.stop(STOP_GRACE_SECONDS)
    failed = [p.args for p in [stack.api, *stack.workers] if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed and not stopping else 0


def _welcome(base: str, settings: Settings) -> None:
    print(f"\nimagequeue is running at {base}  (web client: {base}/, API docs: {base}/docs)")
    try:
        token = token_for(settings, "local-user")
    except ValueError as exc:  # RS/ES keys: tokens come from the identity provider
        print(f"no token printed: {exc}")
    else:
        print(f"token for user 'local-user' (24 h):\n\n  export TOKEN={token}\n")
        print(f"web client, signed in as 'local-user':\n\n  {base}/#token={token}\n")
    print("Ctrl+C stops everything.")


if __name__ == "__main__":
    sys.exit(main())
