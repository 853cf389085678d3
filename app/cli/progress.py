"""What a follow shows: live bars on a terminal (rich), plain lines otherwise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

MAX_IMAGE_ROWS = 8  # running images shown under the queue's bar
LABEL_LENGTH = 36


def label(index: int, prompt: str) -> str:
    short = prompt if len(prompt) <= LABEL_LENGTH else prompt[: LABEL_LENGTH - 1] + "…"
    return f"#{index:04d} {short}"


class View(Protocol):
    """Told what happens while a queue is followed."""

    def begin(self, status: dict[str, Any]) -> None: ...
    def counts(self, counts: dict[str, Any]) -> None: ...
    def running(self, index: int, prompt: str) -> None: ...
    def step(self, index: int, prompt: str, step: int, steps: int) -> None: ...
    def settled(self, index: int) -> None: ...
    def saved(self, path: Path, existed: bool) -> None: ...
    def line(self, text: str, style: str = "") -> None: ...
    def notice(self, text: str) -> None: ...
    def end(self) -> None: ...


class PlainView:
    """No terminal: one line per finished image on stdout; notices on stderr."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def begin(self, status: dict[str, Any]) -> None:
        return None

    def counts(self, counts: dict[str, Any]) -> None:
        return None

    def running(self, index: int, prompt: str) -> None:
        return None

    def step(self, index: int, prompt: str, step: int, steps: int) -> None:
        return None

    def settled(self, index: int) -> None:
        return None

    def saved(self, path: Path, existed: bool) -> None:
        self.line(f"{'exists' if existed else 'saved '}  {path}")

    def line(self, text: str, style: str = "") -> None:
        print(text, file=self.out, flush=True)

    def notice(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def end(self) -> None:
        return None


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Detail(ProgressColumn):
    """Right of a bar: for the queue, done/total, rate, ETA and outcomes; for a running image, its steps."""

    def render(self, task: Task) -> Text:
        if task.fields.get("kind") != "queue":
            return Text(str(task.fields.get("detail", "")), style="cyan")
        done, total = int(task.completed), int(task.total or 0)
        text = Text(f"{done}/{total}", style="bold")
        # The rate of this run: images finished since it began following, over the time since.
        gained, elapsed = done - int(task.fields.get("initial", 0)), task.elapsed or 0.0
        if gained > 0 and elapsed > 0:
            rate = gained / elapsed
            text.append(f"  {rate:.1f} img/s")
            if done < total:
                text.append(f"  ETA {_clock((total - done) / rate)}")
        text.append(f"  ✓ {task.fields.get('succeeded', 0)}", style="green")
        if task.fields.get("failed"):
            text.append(f"  ✗ {task.fields['failed']}", style="red")
        if task.fields.get("cancelled"):
            text.append(f"  ⊘ {task.fields['cancelled']}", style="yellow")
        return text


class RichView:
    """A terminal: the queue's bar (done/total, rate, ETA) and a row per running image (its steps when the
    provider reports them), finished images printed above."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=32), _Detail(),
            console=self.console, refresh_per_second=8,
        )
        self.queue_task: TaskID | None = None
        self.rows: dict[int, TaskID] = {}
        self.hidden: set[int] = set()
        self.existed = 0

    def begin(self, status: dict[str, Any]) -> None:
        name = status.get("name") or status["queue_id"]
        self.progress.start()
        done = sum(int(status.get(k, 0)) for k in ("succeeded", "failed", "cancelled"))
        self.queue_task = self.progress.add_task(
            f"[bold]{escape(name)}", total=status["total"], kind="queue", initial=done
        )
        self.counts(status)

    def counts(self, counts: dict[str, Any]) -> None:
        if self.queue_task is None:
            return
        done = sum(int(counts.get(k, 0)) for k in ("succeeded", "failed", "cancelled"))
        self.progress.update(self.queue_task, total=counts.get("total"), completed=done,
                             succeeded=counts.get("succeeded", 0), failed=counts.get("failed", 0),
                             cancelled=counts.get("cancelled", 0))

    def running(self, index: int, prompt: str) -> None:
        if index in self.rows:
            return
        shown = len(self.rows) - len(self.hidden) < MAX_IMAGE_ROWS
        self.rows[index] = self.progress.add_task(
            f"  {escape(label(index, prompt))}", total=None, kind="image", detail="running", visible=shown
        )
        if not shown:
            self.hidden.add(index)

    def step(self, index: int, prompt: str, step: int, steps: int) -> None:
        self.running(index, prompt)
        self.progress.update(self.rows[index], total=max(steps, 1), completed=step, detail=f"step {step}/{steps}")

    def settled(self, index: int) -> None:
        task = self.rows.pop(index, None)
        if task is None:
            return
        self.hidden.discard(index)
        self.progress.remove_task(task)
        if self.hidden:  # the next running image takes the freed row
            shown = min(self.hidden)
            self.hidden.remove(shown)
            self.progress.update(self.rows[shown], visible=True)

    def saved(self, path: Path, existed: bool) -> None:
        if existed:  # a resumed run: counted, not listed
            self.existed += 1
        else:
            self._print(Text.assemble(("saved ", "green"), path.name))

    def line(self, text: str, style: str = "") -> None:
        self._print(Text(text, style=style))

    def _print(self, text: Text) -> None:
        # Printing redraws the bars as last rendered: render them first, so they agree with the line.
        if self.progress.live.is_started:
            self.progress.refresh()
        self.console.print(text)

    def notice(self, text: str) -> None:
        self._print(Text(text, style="yellow"))

    def end(self) -> None:
        for index in list(self.rows):
            self.settled(index)
        self.progress.stop()
        if self.existed:
            self.console.print(Text(f"{self.existed} image(s) were already on disk", style="dim"))
