"""Command line helpers: python -m app.cli token USER [--ttl SECONDS]."""

from __future__ import annotations

import argparse
import sys

from app.core.config import get_settings
from app.core.local_auth import token_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="imagequeue helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser(
        "token", help="mint a JWT for USER with JWT_SECRET, or the local secret of a developer machine"
    )
    token.add_argument("user", help="the user id (becomes the token's 'sub')")
    token.add_argument("--ttl", type=int, default=86_400, help="lifetime in seconds (default 86400)")
    args = parser.parse_args(argv)
    if args.command == "token":
        try:
            print(token_for(get_settings(), args.user, args.ttl))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
