"""`status`, `cancel` and `history`: tables for people, the server's JSON with --json."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.cli.errors import EXIT_OK
from app.client import Client

_STYLES = {"completed": "green", "succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


def _print_json(console: Console, body: Any) -> None:
    if console.is_terminal:
        console.print_json(json.dumps(body))
    else:
        print(json.dumps(body, indent=2))


def _styled(value: str) -> Text:
    return Text(value, style=_STYLES.get(value, ""))


def _queues_table(title: str, queues: Iterable[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("queue", "name", "status", "done", "failed", "created", "finished"):
        table.add_column(column, no_wrap=column in ("queue", "done"))
    for q in queues:
        done = f"{q['succeeded'] + q['failed'] + q['cancelled']}/{q['total']}"
        table.add_row(q["queue_id"], Text(q.get("name") or ""), _styled(q["status"]), done, str(q["failed"] or ""),
                      _when(q.get("created_at")), _when(q.get("finished_at")))
    return table


def _when(value: str | None) -> str:
    return (value or "").replace("T", " ")[:19]


def _queue_summary(status: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    counts = ", ".join(f"{status[k]} {k}" for k in ("succeeded", "failed", "cancelled", "running", "pending"))
    rows: list[tuple[str, str | Text]] = [
        ("queue", status["queue_id"]),
        ("name", Text(status.get("name") or "")),
        ("status", _styled(status["status"])),
        ("images", f"{status['total']}: {counts} ({status['progress']:.0f}% done)"),
        ("model", f"{status.get('model', '')}, priority {status.get('priority', '')}"),
        ("created", _when(status.get("created_at"))),
        ("finished", _when(status.get("finished_at"))),
    ]
    if status.get("position"):
        rows.append(("position", f"{status['position']} image(s) of other queues ahead"))
    if status.get("eta_seconds"):
        rows.append(("eta", f"{status['eta_seconds']:.0f} s"))
    for label, value in rows + [("warning", Text(w)) for w in status.get("warnings") or []]:
        table.add_row(label, value)
    return table


def _images_table(images: list[dict[str, Any]], total: int) -> Table:
    table = Table()
    for column in ("#", "status", "seed", "prompt", "error"):
        table.add_column(column, overflow="fold")
    for image in images:
        table.add_row(str(image["index"]), _styled(image["status"]), str(image["seed"]), Text(image["prompt"]),
                      Text(image.get("error") or ""))
    if total > len(images):
        table.caption = f"{total - len(images)} more image(s): --images N, or --json"
    return table


def status(args: argparse.Namespace, client: Client, console: Console) -> int:
    if args.queue_id is None:
        active = client.active()
        if args.json:
            _print_json(console, active)
        else:
            console.print(_queues_table("unfinished queues", active["queues"]))
        return EXIT_OK
    body = client.status(args.queue_id, images_limit=None if args.json else max(args.images, 0))
    if args.json:
        _print_json(console, body)
        return EXIT_OK
    console.print(_queue_summary(body))
    if body.get("images"):
        console.print(_images_table(body["images"], body["total"]))
    return EXIT_OK


def cancel(args: argparse.Namespace, client: Client, console: Console) -> int:
    body = client.cancel(args.queue_id)
    if args.json:
        _print_json(console, body)
    else:
        console.print(f"cancelled queue {body['queue_id']}: {body['cancelled']} image(s) cancelled, "
                      f"{body['succeeded']} had succeeded, {body['running']} still stopping")
    return EXIT_OK


def history(args: argparse.Namespace, client: Client, console: Console) -> int:
    body = client.history(limit=args.limit, offset=args.offset, status=args.status, tag=args.tag,
                          search=args.search, images_limit=None if args.json else 0)
    if args.json:
        _print_json(console, body)
    else:
        shown = len(body["queues"])
        console.print(_queues_table(f"history: {shown} of {body['total']}", body["queues"]))
    return EXIT_OK
