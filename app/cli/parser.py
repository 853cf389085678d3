"""The command line: commands, options, and the create-queue body a `generate` sends."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from typing import Any, NoReturn

from app.cli.errors import CliError

DEFAULT_URL = "http://localhost:8000"
PRIORITIES = ("low", "normal", "high")
FORMATS = ("png", "webp", "jpeg")
QUEUE_STATES = ("pending", "running", "completed", "failed", "cancelled")

_SIZE = re.compile(r"^(\d{1,5})[xX](\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

EPILOG = """\
exit codes: 0 every image succeeded; 1 some image failed or was cancelled, or the server could not be
reached; 2 a usage error (options, token, a request the server refused, an unwritable folder); 130 Ctrl+C.
Ctrl+C leaves the queue running; `follow QUEUE_ID --out DIR` (or the same generate again) resumes."""


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum}-{maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}: {text}")
        return value

    return parse


_positive, _seed, _quality = _whole(1), _whole(0), _whole(1, 100)


def _size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, like 512x512: {text!r}")
    return int(match[1]), int(match[2])


def _variable(text: str) -> tuple[str, list[str]]:
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not _NAME.match(name):
        raise argparse.ArgumentTypeError(f"expected NAME=value1,value2: {text!r}")
    items = [v.strip() for v in values.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty value in {text!r}")
    return name, items


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE: {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # not JSON: a plain string
    return key.strip(), value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), pointing at --help rather than printing the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _connection_options() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--url", default=os.environ.get("IMAGEQUEUE_URL") or DEFAULT_URL,
                        help=f"the server (default: IMAGEQUEUE_URL, else {DEFAULT_URL})")
    common.add_argument("--token", default=os.environ.get("IMAGEQUEUE_TOKEN"),
                        help="bearer token (default: IMAGEQUEUE_TOKEN)")
    return common


def _following_options(command: argparse.ArgumentParser, out_help: str) -> None:
    command.add_argument("--out", default=".", metavar="DIR", help=out_help)
    command.add_argument("--cancel-on-interrupt", action="store_true",
                         help="on Ctrl+C cancel the queue (by default it keeps running and can be resumed)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m app.cli", description="imagequeue from the terminal: batches, live progress, images on disk",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _connection_options()

    gen = sub.add_parser("generate", parents=[common], epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="create a queue, show its progress, write its images into DIR")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompts; with --var, one template")
    gen.add_argument("--var", action="append", type=_variable, default=[], metavar="NAME=a,b",
                     help="template variable and its values (repeatable); the template's {NAME} takes each")
    gen.add_argument("--count", type=_positive, default=1, help="images per prompt (default 1)")
    gen.add_argument("--size", type=_size, metavar="WxH", help="image size, e.g. 512x512 (default: the server's)")
    gen.add_argument("--seed", type=_seed, help="base seed: image i gets seed + i (default: random)")
    gen.add_argument("--model", help="one of the server's models (default: its default)")
    gen.add_argument("--priority", choices=PRIORITIES)
    gen.add_argument("--name", help="a name for the queue")
    gen.add_argument("--tag", action="append", default=[], help="a tag for the queue (repeatable)")
    gen.add_argument("--negative", metavar="TEXT", help="negative prompt")
    gen.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                     help="a provider parameter (repeatable); VALUE is read as JSON when it is JSON")
    gen.add_argument("--format", choices=FORMATS, help="output format (sent as output_format)")
    gen.add_argument("--quality", type=_quality, help="1-100, for webp and jpeg (sent as output_quality)")
    gen.add_argument("--new", action="store_true",
                     help="make a new queue even if DIR records one for this same request")
    _following_options(gen, "where images go (default: the current folder)")

    follow = sub.add_parser("follow", parents=[common], help="follow a queue and fetch its images into DIR; "
                            "files already there are kept")
    follow.add_argument("queue_id", metavar="QUEUE_ID")
    _following_options(follow, "where images go (default: the current folder)")

    status = sub.add_parser("status", parents=[common], help="a queue's status, or your unfinished queues")
    status.add_argument("queue_id", nargs="?", metavar="QUEUE_ID")
    status.add_argument("--images", type=int, default=50, metavar="N", help="image rows to show (default 50)")
    status.add_argument("--json", action="store_true", help="print the server's JSON")

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queue")
    cancel.add_argument("queue_id", metavar="QUEUE_ID")
    cancel.add_argument("--json", action="store_true", help="print the server's JSON")

    history = sub.add_parser("history", parents=[common], help="your finished queues, newest first")
    history.add_argument("--limit", type=_positive, default=20, help="how many (default 20, at most 100)")
    history.add_argument("--offset", type=int, default=0)
    history.add_argument("--status", choices=QUEUE_STATES)
    history.add_argument("--tag")
    history.add_argument("--search", help="in names and prompts")
    history.add_argument("--json", action="store_true", help="print the server's JSON")

    token = sub.add_parser(
        "token", help="mint a JWT for USER with JWT_SECRET, or the local secret of a developer machine"
    )
    token.add_argument("user", help="the user id (becomes the token's 'sub')")
    token.add_argument("--ttl", type=int, default=86_400, help="lifetime in seconds (default 86400)")
    return parser


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The create-queue body: only what was given, so the server's defaults apply to the rest."""
    body: dict[str, Any]
    if args.var:
        if len(args.prompts) != 1:
            raise CliError("with --var, give exactly one PROMPT: the template")
        variables: dict[str, list[str]] = {}
        for name, values in args.var:
            variables.setdefault(name, []).extend(values)
        body = {"prompt": args.prompts[0], "variables": variables}
    else:
        body = {"prompts": list(args.prompts)}
    body["count"] = args.count
    if args.size:
        body["width"], body["height"] = args.size
    optional = {"seed": args.seed, "model": args.model, "priority": args.priority, "name": args.name,
                "negative_prompt": args.negative}
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.tag:
        body["tags"] = list(args.tag)
    if args.param:
        body["params"] = dict(args.param)
    if args.quality is not None and args.format not in ("webp", "jpeg"):
        raise CliError("--quality goes with --format webp or jpeg")
    # Sent only when asked for: a server without output formats ignores the fields, and the files are
    # named by the type the server actually returns.
    if args.format:
        body["output_format"] = args.format
    if args.quality is not None:
        body["output_quality"] = args.quality
    return body
