"""Step progress from outside: a running image's `progress` and `preview_url` in its status, the
preview route, image.progress events merged live into the event streams (never replayed), and the
step-based ETA, against a server speaking ComfyUI's protocol and with the built-in provider."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.services.queue.states import Priority
from app.services.queue.status_view import eta, preview_url, step_progress
from app.services.queue.store import Schedule
from tests.comfyui_server import ComfyUIServer
from tests.utils import MakeStack, auth, new_user, wait_status

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "comfyui" / "txt2img-api.json"


class SSEReader(threading.Thread):
    """Reads an event stream in the background into `events`: (event, id or None, data), until its
    `end` event or `stop()`."""

    def __init__(self, base_url: str, path: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.path, self.headers = path, headers
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []
        self.status = 0
        self.stopping = False

    def run(self) -> None:
        try:
            self._read()
        except httpx.TransportError:
            if not self.stopping:
                raise
        finally:
            self.client.close()

    def stop(self) -> None:
        self.stopping = True
        self.client.close()
        self.join(10)

    def _read(self) -> None:
        with self.client.stream("GET", self.path, headers=self.headers) as r:
            self.status = r.status_code
            event, event_id, data = "message", None, ""
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    self.events.append((event, event_id, json.loads(data)))
                    if event == "end":
                        return
                    event, event_id, data = "message", None, ""


def test_comfyui_progress_reaches_status_preview_route_and_events(make_stack: MakeStack) -> None:
    with ComfyUIServer(run_seconds=4.0) as server:
        server.progress_steps = 8
        stack = make_stack(IMAGE_PROVIDER="comfyui", IMAGE_MODEL="sd15", COMFYUI_WORKFLOW=str(EXAMPLE),
                           IMAGE_PROVIDER_URL=server.url, COMFYUI_POLL_SECONDS="0.05")
        owner, stranger = auth(new_user()), auth(new_user())
        with stack.client() as client:
            qid = client.post("/create-queue", headers=owner, json={
                "prompts": ["a lighthouse"], "count": 1, "width": 64, "height": 64}).json()["queue_id"]
            reader = SSEReader(stack.base_url, f"/queue-events/{qid}", owner)
            reader.start()
            fractions: list[float] = []
            etas: list[float | None] = []
            preview: httpx.Response | None = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = client.get(f"/queue-status/{qid}", headers=owner).json()
                image = status["images"][0]
                if status["finished_at"]:
                    break
                if image["status"] == "running" and image["progress"]:
                    p = image["progress"]
                    assert 0 <= p["step"] <= p["steps"] == 8 and p["fraction"] == round(p["step"] / 8, 4)
                    if not fractions or p["fraction"] != fractions[-1]:
                        fractions.append(p["fraction"])
                        etas.append(status["eta_seconds"])
                    if image["preview_url"] and preview is None:
                        assert f"/images/{qid}/0/preview?v=" in image["preview_url"]
                        preview = httpx.get(stack.base_url + image["preview_url"])  # signed: no token
                        # Someone else's token gets nothing, and says nothing of the image.
                        other = client.get(f"/images/{qid}/0/preview", headers=stranger)
                        assert other.status_code == 404 and other.json()["detail"] == "image not found"
                        mine = client.get(f"/images/{qid}/0/preview", headers=owner)
                        assert mine.status_code == 200 and mine.headers["content-type"] == "image/webp"
                time.sleep(0.1)
            reader.join(30)
            done = wait_status(client, owner, qid, {"completed"})
            gone = client.get(f"/images/{qid}/0/preview", headers=owner)
            replay = SSEReader(stack.base_url, f"/queue-events/{qid}", owner)
            replay.run()
        stack.stop()

    # Status: the fraction moved (at least three distinct values, rising), with an ETA from the step rate.
    assert len(fractions) >= 3 and fractions == sorted(fractions), fractions
    known = [e for e in etas[1:] if e is not None]  # the step rate needs two writes
    assert len(known) >= 2 and all(0 <= e < 30 for e in known) and known[-1] < known[0], etas
    # The preview: a small WebP, fetched by its signed URL.
    assert preview is not None and preview.status_code == 200, preview
    assert preview.headers["content-type"] == "image/webp"
    assert max(Image.open(io.BytesIO(preview.content)).size) <= 256
    # Once the image has finished: no progress, no preview, a clear 404.
    assert done["images"][0]["status"] == "succeeded"
    assert done["images"][0]["progress"] is None and done["images"][0]["preview_url"] is None
    assert gone.status_code == 404 and "not running" in gone.json()["detail"]
    # Events: image.progress without ids, throttled (at most a few a second), steps rising, all
    # before the image's own event; replaying the stream later has none of them.
    assert reader.status == 200
    progress = [(i, d) for e, i, d in reader.events if e == "image.progress"]
    assert len(progress) >= 3, reader.events
    assert all(i is None for i, _ in progress)
    steps = [d["step"] for _, d in progress]
    assert steps == sorted(steps) and len(progress) <= 4.0 * 2 + 2, steps
    first = progress[0][1]
    assert first["queue_id"] == qid and first["index"] == 0 and first["steps"] == 8 and first["attempt"] == 1
    assert any(d["preview_url"] for _, d in progress)
    kinds = [e if e != "image" else d["status"] for e, _, d in reader.events]
    assert kinds.index("running") < kinds.index("image.progress")
    assert kinds.index("succeeded") > max(k for k, e in enumerate(kinds) if e == "image.progress")
    assert all(i is not None for e, i, _ in reader.events if e not in ("image.progress", "end"))
    assert replay.events and not [e for e, _, _ in replay.events if e == "image.progress"]


def test_built_in_provider_progress_on_the_users_stream(make_stack: MakeStack) -> None:
    """The user's stream (/events) carries image.progress of all their queues; another user's sees none."""
    stack = make_stack(concurrency=4)
    owner, other = auth(new_user()), auth(new_user())
    with stack.client() as client:
        mine = SSEReader(stack.base_url, "/events", owner)
        theirs = SSEReader(stack.base_url, "/events", other)
        mine.start()
        theirs.start()
        time.sleep(0.5)
        qid = client.post("/create-queue", headers=owner, json={
            "prompts": ["a fox", "an owl"], "count": 1, "width": 64, "height": 64,
            "params": {"latency_ms": 2500, "steps": 10}}).json()["queue_id"]
        done = wait_status(client, owner, qid, {"completed"})
        time.sleep(0.5)
    mine.stop()
    theirs.stop()
    stack.stop()
    assert done["succeeded"] == 2
    progress = [d for e, _, d in mine.events if e == "image.progress"]
    assert {d["index"] for d in progress} == {0, 1} and all(d["queue_id"] == qid for d in progress)
    for index in (0, 1):
        steps = [d["step"] for d in progress if d["index"] == index]
        assert len(steps) >= 2 and steps == sorted(steps), progress
    assert not [e for e, _, _ in theirs.events if e == "image.progress"]


def test_step_based_eta_and_progress_shapes() -> None:
    schedule = Schedule({p: 0 for p in Priority}, None, 1, None, 0.0, 1_000_000)
    meta = {"started_at": "990000", "attempt": "1"}
    counts = {"pending": 4, "running": 2, "succeeded": 0, "failed": 0, "cancelled": 0}
    # No finished image, no steps, no throughput: no estimate.
    assert eta(meta, counts, 0, schedule) is None
    # Two running images at 10 s each by their step rate, half done: 1 + 4 images left, two at a time.
    assert eta({**meta, "pe": "10000", "pf": "1.0"}, counts, 0, schedule) == 25.0
    # Further along, less left.
    assert eta({**meta, "pe": "10000", "pf": "1.8"}, counts, 0, schedule) == 21.0
    # Once images finish, the queue's own pace (elapsed / done), with the steps' share of the running.
    done = {**counts, "succeeded": 2}
    assert eta({**meta, "pe": "10000", "pf": "1.0"}, done, 0, schedule) == 25.0
    assert step_progress(3, 8) == {"step": 3, "steps": 8, "fraction": 0.375}
    assert step_progress(9, 8)["fraction"] == 1.0 and step_progress(0, 0)["fraction"] == 0.0
    assert preview_url("/images/q/0?exp=1&sig=s", 3) == "/images/q/0/preview?v=3&exp=1&sig=s"
