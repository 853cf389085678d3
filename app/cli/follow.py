"""`generate` and `follow`: a queue's events drive the view, and each image lands in the folder as it finishes."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from app.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, explain
from app.cli.folder import STATE_FILE, OutputFolder, image_stem
from app.cli.parser import request_body
from app.cli.progress import View
from app.client import EXTENSIONS, Client, Event, ImageQueueError, NotFound

_FORMAT_EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


class Follower:
    """Follows one queue to its end: events update the view; succeeded images are fetched unless on disk."""

    def __init__(self, client: Client, folder: OutputFolder, view: View, status: dict[str, Any],
                 wanted_format: str | None = None) -> None:
        self.client = client
        self.folder = folder
        self.view = view
        self.queue_id: str = status["queue_id"]
        self.images: dict[int, dict[str, Any]] = {int(i["index"]): i for i in status.get("images") or []}
        self.wanted_format = wanted_format
        self.kept: set[int] = set()
        self.lost: set[int] = set()  # succeeded, but could not be fetched
        self.settled: set[int] = set()  # not running (any more): late step reports are ignored
        self._format_noted = False
        self.status_file: Path | None = None

    def run(self) -> dict[str, Any]:
        """Follows to the end; returns the final status (also written into the folder)."""
        for event in self.client.events(self.queue_id):
            self.on_event(event)
        final = self.client.status(self.queue_id)
        for image in final.get("images") or []:  # anything the events did not bring (or could not fetch)
            if image["status"] == "succeeded" and image["index"] not in self.kept:
                self.images[int(image["index"])] = image
                self.keep(int(image["index"]), image.get("url"))
        self.status_file = self.folder.save_status(final)
        return final

    def on_event(self, event: Event) -> None:
        data = event.data
        if "counts" in data:
            self.view.counts(data["counts"])
        kind = data.get("type", event.type)
        if kind == "image.progress" and isinstance(data.get("index"), int):
            self._step(data)
        elif kind == "image" and isinstance(data.get("index"), int):
            self._image(data)
        # Anything else (queue status changes, event types added later) only carries counts.

    def _step(self, data: dict[str, Any]) -> None:
        try:
            step, steps = int(data["step"]), int(data["steps"])
        except (KeyError, TypeError, ValueError):
            return
        if data["index"] not in self.settled:
            self.view.step(data["index"], self._info(data["index"])["prompt"], step, steps)

    def _image(self, data: dict[str, Any]) -> None:
        index, status = data["index"], data.get("status")
        if status == "running":
            self.settled.discard(index)
            self.view.running(index, self._info(index)["prompt"])
            return
        self.settled.add(index)
        self.view.settled(index)
        if status == "succeeded":
            self.keep(index, data.get("url"))
        elif status == "failed":
            self.view.line(f"failed  {self._describe(index)}: {data.get('error') or 'no reason given'}", "red")
        elif status == "cancelled":
            self.view.line(f"cancelled  {self._describe(index)}", "yellow")

    def _info(self, index: int) -> dict[str, Any]:
        """An image's prompt and seed, from the status (fetched for images that came after it)."""
        if index not in self.images:
            page = self.client.status(self.queue_id, images_offset=index, images_limit=1)
            for image in page.get("images") or []:
                self.images[int(image["index"])] = image
        return self.images.get(index) or {"index": index, "prompt": "", "seed": 0}

    def _describe(self, index: int) -> str:
        info = self._info(index)
        return f"#{index} (seed {info['seed']}, {info['prompt']!r})"

    def keep(self, index: int, url: str | None) -> None:
        """The image on disk: already there (kept as it is), or fetched now."""
        info = self._info(index)
        stem = image_stem(index, int(info["seed"]), str(info["prompt"]))
        existing = self.folder.existing(stem)
        if existing is not None:
            self.kept.add(index)
            self.view.saved(existing, existed=True)
            return
        try:
            image = self.client.download(url or f"/images/{self.queue_id}/{index}")
        except NotFound as exc:
            self.lost.add(index)
            self.view.line(f"failed  {self._describe(index)}: could not fetch the image ({exc.detail})", "red")
            return
        self._check_format(image.content_type)
        path = self.folder.save_image(stem, image)
        self.kept.add(index)
        self.lost.discard(index)
        self.view.saved(path, existed=False)

    def _check_format(self, content_type: str) -> None:
        if self.wanted_format is None or self._format_noted:
            return
        got = EXTENSIONS.get(content_type.split(";")[0].strip(), content_type)
        if got != _FORMAT_EXTENSIONS[self.wanted_format]:
            self._format_noted = True
            self.view.notice(f"asked for {self.wanted_format}, the server sent {content_type}: "
                             "it does not convert formats; files are named by what it sent")


def _summary(final: dict[str, Any], status_file: Path | None, seconds: float, lost: int) -> str:
    parts = [f"{final['succeeded']} succeeded", f"{final['failed']} failed", f"{final['cancelled']} cancelled"]
    if lost:
        parts.append(f"{lost} could not be fetched")
    counts = ", ".join(parts)
    return f"queue {final['queue_id']} {final['status']}: {counts} in {seconds:.1f} s; status in {status_file}"


def _resume_hint(queue_id: str, folder: OutputFolder) -> str:
    return f"resume with: python -m app.cli follow {queue_id} --out {shlex.quote(str(folder.path))}"


def follow_queue(client: Client, folder: OutputFolder, view: View, status: dict[str, Any], *,
                 cancel_on_interrupt: bool, wanted_format: str | None = None) -> int:
    """Follows the queue into the folder; the exit code: 0 when every image succeeded and is on disk."""
    queue_id = status["queue_id"]
    follower = Follower(client, folder, view, status, wanted_format)
    started = time.monotonic()
    try:
        view.begin(status)
        try:
            final = follower.run()
        finally:
            view.end()
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            return _cancel_after_interrupt(client, view, queue_id)
        view.notice(f"interrupted: queue {queue_id} keeps running on the server; {_resume_hint(queue_id, folder)}")
        return EXIT_INTERRUPTED
    except ImageQueueError as exc:
        error = explain(exc)
        raise CliError(f"{error}; the queue may still be running: {_resume_hint(queue_id, folder)}",
                       max(error.code, EXIT_FAILED)) from exc
    seconds = time.monotonic() - started
    view.line(_summary(final, follower.status_file, seconds, len(follower.lost)), "bold")
    everything = final["succeeded"] == final["total"] and not follower.lost
    return EXIT_OK if everything else EXIT_FAILED


def _cancel_after_interrupt(client: Client, view: View, queue_id: str) -> int:
    try:
        cancelled = client.cancel(queue_id)
    except ImageQueueError as exc:
        view.notice(f"interrupted; cancelling queue {queue_id} failed: {explain(exc)}")
    else:
        view.notice(f"interrupted: cancelled queue {queue_id} ({cancelled['succeeded']} image(s) had succeeded, "
                    f"{cancelled['cancelled']} cancelled)")
    return EXIT_INTERRUPTED


def generate(args: argparse.Namespace, client: Client, view: View) -> int:
    """Creates the queue (or finds the one this folder already made for the same request) and follows it."""
    body = request_body(args)
    folder = OutputFolder.open(args.out)
    batch = folder.batch(str(client.url), body, new=args.new)
    try:
        status = client.create(body, idempotency_key=batch.idempotency_key)
    except KeyboardInterrupt:
        view.notice(f"interrupted before the queue was confirmed; the same command resumes it "
                    f"(its Idempotency-Key is kept in {folder.path / STATE_FILE})")
        return EXIT_INTERRUPTED
    except ImageQueueError as exc:
        raise explain(exc) from exc
    folder.record(batch, status["queue_id"])
    again = "resuming" if batch.resumed else "created"
    view.notice(f"{again} queue {status['queue_id']}: {status['total']} image(s) of model {status.get('model')} "
                f"into {folder.path}/")
    return follow_queue(client, folder, view, status, cancel_on_interrupt=args.cancel_on_interrupt,
                        wanted_format=args.format)


def follow(args: argparse.Namespace, client: Client, view: View) -> int:
    """Follows an existing queue into the folder, keeping the files already there."""
    folder = OutputFolder.open(args.out)
    try:
        status = client.status(args.queue_id)
    except ImageQueueError as exc:
        raise explain(exc) from exc
    view.notice(f"following queue {args.queue_id}: {status['total']} image(s) into {folder.path}/")
    return follow_queue(client, folder, view, status, cancel_on_interrupt=args.cancel_on_interrupt)
