"""A local server speaking ComfyUI's HTTP protocol (/prompt, /history, /view, /queue, /interrupt), scripted.

    with ComfyUIServer(run_seconds=0.05) as server:
        server.script("ok", "invalid", "exec_error", "slow", "lag:3", "500")
        ... point the provider at server.url ...
        server.prompts        # prompt_id -> {"prompt", "client_id", "state", ...} of queued prompts
        server.posted         # every POST /prompt body, rejected ones too
        server.deleted        # prompt ids named in POST /queue {"delete": [...]}
        server.interrupted    # prompt ids actually stopped by POST /interrupt
        server.requests       # [(method, path), ...]

Script steps, one per POST /prompt, "ok" once used up: "ok" (runs `run_seconds`), "slow" (runs 60 s),
"invalid" (400 with node_errors, like a missing checkpoint), "exec_error" (runs, then an
execution_error in history), "lag:N" (completion shows in /history only after N more polls),
"lose" (the prompt vanishes, as after a server restart), "500" (POST /prompt answers 500).
`fail_all = True` makes every request answer 500. Prompts run one at a time (`slots`) in the order
queued, like ComfyUI; time advances whenever a request arrives. `legacy_interrupt=True` behaves like
servers before mid-2025, which ignore prompt_id and stop whatever is running.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.provider_servers import ScriptedServer, png

SLOW_SECONDS = 60.0


class ComfyUIServer(ScriptedServer):
    def __init__(self, *, run_seconds: float = 0.05, slots: int = 1, legacy_interrupt: bool = False) -> None:
        self.run_seconds = run_seconds
        self.slots = slots
        self.legacy_interrupt = legacy_interrupt
        self.fail_all = False
        self.prompts: dict[str, dict[str, Any]] = {}
        self.posted: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.interrupted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.files: dict[str, bytes] = {}
        self._order: list[str] = []  # queued prompt ids, oldest first
        self._number = 0
        super().__init__([
            Route("/prompt", self._post_prompt, methods=["POST"]),
            Route("/history/{prompt_id}", self._history, methods=["GET"]),
            Route("/view", self._view, methods=["GET"]),
            Route("/queue", self._get_queue, methods=["GET"]),
            Route("/queue", self._post_queue, methods=["POST"]),
            Route("/interrupt", self._interrupt, methods=["POST"]),
        ], "ComfyUI test server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self, prompt_id: str) -> str | None:
        with self._lock:
            self._advance()
            p = self.prompts.get(prompt_id)
            return p["state"] if p else None

    # -- the simulated executor -------------------------------------------------------------------
    def _advance(self) -> None:
        """Finish running prompts whose time is up, then start queued ones into free slots."""
        now = time.monotonic()
        for pid in list(self._order):
            p = self.prompts[pid]
            if p["state"] == "running" and now >= p["ends_at"]:
                self._finish(p, "error" if p["step"] == "exec_error" else "success")
        running = sum(1 for pid in self._order if self.prompts[pid]["state"] == "running")
        for pid in list(self._order):
            p = self.prompts[pid]
            if p["state"] == "pending" and running < self.slots:
                p["state"], running = "running", running + 1
                p["ends_at"] = now + (SLOW_SECONDS if p["step"] == "slow" else self.run_seconds)

    def _finish(self, p: dict[str, Any], outcome: str) -> None:
        self._order.remove(p["id"])
        if p["step"] == "lose":
            p["state"] = "lost"
            return
        p["state"] = "done"
        start = ["execution_start", {"prompt_id": p["id"], "timestamp": int(time.time() * 1000)}]
        if outcome == "success":
            name = f"imagequeue_{len(self.files) + 1:05d}_.png"
            self.files[name] = png(*p["size"])
            p["history"] = {
                "prompt": [p["number"], p["id"], p["prompt"], {"client_id": p["client_id"]}, ["9"]],
                "outputs": {"9": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}},
                "status": {"status_str": "success", "completed": True,
                           "messages": [start, ["execution_success", {"prompt_id": p["id"]}]]},
                "meta": {"9": {"node_id": "9", "display_node": "9"}},
            }
        elif outcome == "interrupted":
            p["history"] = {
                "prompt": [p["number"], p["id"], p["prompt"], {}, ["9"]], "outputs": {},
                "status": {"status_str": "error", "completed": False, "messages": [start, [
                    "execution_interrupted",
                    {"prompt_id": p["id"], "node_id": "3", "node_type": "KSampler", "executed": ["4", "5"]},
                ]]},
            }
        else:
            p["history"] = {
                "prompt": [p["number"], p["id"], p["prompt"], {}, ["9"]], "outputs": {},
                "status": {"status_str": "error", "completed": False, "messages": [start, [
                    "execution_error",
                    {"prompt_id": p["id"], "node_id": "3", "node_type": "KSampler", "executed": ["4"],
                     "exception_message": "Allocation on device 0 would exceed allowed memory.",
                     "exception_type": "torch.OutOfMemoryError", "traceback": ["..."]},
                ]]},
            }

    # -- routes -----------------------------------------------------------------------------------
    def _note(self, request: Request) -> Response | None:
        self.requests.append((request.method, request.url.path))
        if self.fail_all:
            return JSONResponse({"error": "server error"}, status_code=500)
        return None

    async def _post_prompt(self, request: Request) -> Response:
        failed = self._note(request)
        if failed:
            return failed
        body = await request.json()
        with self._lock:
            self.posted.append(body)
            step = self._script.popleft() if self._script else "ok"
            if step == "500":
                return JSONResponse({"error": "server error"}, status_code=500)
            graph = body["prompt"]
            if step == "invalid":
                return JSONResponse({
                    "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                              "details": "", "extra_info": {}},
                    "node_errors": {"4": {
                        "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                    "details": "ckpt_name: 'missing.safetensors' not in ['v1-5.safetensors']",
                                    "extra_info": {"input_name": "ckpt_name"}}],
                        "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}},
                }, status_code=400)
            latent = next((n["inputs"] for n in graph.values() if n.get("class_type") == "EmptyLatentImage"), {})
            pid = str(body.get("prompt_id") or uuid.uuid4())
            self._number += 1
            lag = int(step.partition(":")[2]) if step.startswith("lag:") else 0
            self.prompts[pid] = {"id": pid, "number": self._number, "prompt": graph, "client_id": body.get("client_id"),
                                 "state": "pending", "step": step, "lag": lag, "polls": 0, "history": None,
                                 "size": (int(latent.get("width", 64)), int(latent.get("height", 64)))}
            self._order.append(pid)
            self._advance()
            return JSONResponse({"prompt_id": pid, "number": self._number, "node_errors": {}})

    async def _history(self, request: Request) -> Response:
        failed = self._note(request)
        if failed:
            return failed
        pid = request.path_params["prompt_id"]
        with self._lock:
            self._advance()
            p = self.prompts.get(pid)
            if p is None or p["history"] is None:
                return JSONResponse({})
            p["polls"] += 1
            if p["polls"] <= p["lag"]:
                return JSONResponse({})
            return JSONResponse({pid: p["history"]})

    async def _view(self, request: Request) -> Response:
        failed = self._note(request)
        if failed:
            return failed
        q = request.query_params
        data = self.files.get(q.get("filename", ""))
        if data is None or q.get("type") != "output":
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    async def _get_queue(self, request: Request) -> Response:
        failed = self._note(request)
        if failed:
            return failed
        with self._lock:
            self._advance()
            items: dict[str, list[Any]] = {"running": [], "pending": []}
            for pid in self._order:
                p = self.prompts[pid]
                items[p["state"]].append([p["number"], pid, p["prompt"], {"client_id": p["client_id"]}, ["9"]])
            return JSONResponse({"queue_running": items["running"], "queue_pending": items["pending"]})

    async def _post_queue(self, request: Request) -> Response:
        failed = self._note(request)
        if failed:
            return failed
        body = await request.json()
        with self._lock:
            for pid in body.get("delete", []):
                self.deleted.append(pid)
                p = self.prompts.get(pid)
                if p is not None and p["state"] == "pending":
                    self._order.remove(pid)
                    p["state"] = "deleted"
        return Response(status_code=200)

    async def _interrupt(self, request: Request) -> Response:
        failed = self._note(request)
        if failed:
            return failed
        try:
            body = await request.json()
        except ValueError:
            body = {}
        with self._lock:
            self._advance()
            running = [pid for pid in self._order if self.prompts[pid]["state"] == "running"]
            wanted = body.get("prompt_id")
            targets = running if self.legacy_interrupt or not wanted else [pid for pid in running if pid == wanted]
            for pid in targets:
                self.interrupted.append(pid)
                self._finish(self.prompts[pid], "interrupted")
            self._advance()
        return Response(status_code=200)
