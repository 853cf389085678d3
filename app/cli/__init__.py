"""The command-line client: `python -m app.cli generate|follow|status|cancel|history|token ...`.

Built on the Python client (`app.client`); exit codes in `app.cli.errors`, the output folder's layout and
state in `app.cli.folder`.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from app.cli import follow, tables
from app.cli.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, explain, waiting
from app.cli.parser import build_parser
from app.cli.progress import PlainView, RichView, View
from app.client import Client, ImageQueueError

__all__ = ["main"]


def _token(args: argparse.Namespace) -> int:
    """Mints a token with the server's own settings (JWT_SECRET, or a developer machine's local secret)."""
    from app.core.config import get_settings
    from app.core.local_auth import token_for

    try:
        print(token_for(get_settings(), args.user, args.ttl))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _client(args: argparse.Namespace, view: View) -> Client:
    if not args.url.startswith(("http://", "https://")):
        raise CliError(f"--url must start with http:// or https://, not {args.url!r}")
    if not args.token:
        raise CliError("no token: pass --token or set IMAGEQUEUE_TOKEN "
                       "(python -m app.cli token USER mints one for a local server)")
    return Client(args.url, args.token, on_wait=lambda error, seconds: view.notice(waiting(error, seconds)))


def _run(args: argparse.Namespace) -> int:
    console = Console()
    following = args.command in ("generate", "follow")
    view: View = RichView(console) if following and console.is_terminal else PlainView()
    with _client(args, view) as client:
        try:
            if args.command == "generate":
                return follow.generate(args, client, view)
            if args.command == "follow":
                return follow.follow(args, client, view)
            command = {"status": tables.status, "cancel": tables.cancel, "history": tables.history}[args.command]
            return command(args, client, console)
        except ImageQueueError as exc:
            raise explain(exc) from exc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "token":
        return _token(args)
    try:
        return _run(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
