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

The websocket `/ws?clientId=` sends a client the events of its prompts as they run: execution_start,
executing, then per step (`progress_steps` over the run) a binary preview frame (u32 1, u32 1 = JPEG,
the JPEG) followed by `progress` {value, max, prompt_id, node}, and at the end executing (node null)
and execution_success. `drop_socket_after = N` closes the socket once, after the N-th progress event
(later connections are served); `server.sockets_opened` counts connections.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import uuid
from typing import Any

from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.provider_servers import ScriptedServer, png

SLOW_SECONDS = 60.0
SOCKET_TICK_SECONDS = 0.01


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "JPEG")
    return buf.getvalue()


class ComfyUIServer(ScriptedServer):
    def __init__(self, *, run_seconds: float = 0.05, slots: int = 1, legacy_interrupt: bool = False) -> None:
        self.run_seconds = run_seconds
        self.slots = slots
        self.legacy_interrupt = legacy_interrupt
        self.fail_all = False
        self.progress_steps = 4
        self.drop_socket_after: int | None = None
        self.sockets_opened = 0
        self.progress_sent = 0
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
            WebSocketRoute("/ws", self._socket),
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
                p["started_at"] = now
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

    # -- the websocket ----------------------------------------------------------------------------
    async def _socket(self, websocket: WebSocket) -> None:
        client_id = websocket.query_params.get("clientId")
        await websocket.accept()
        self.sockets_opened += 1
        await websocket.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                              "sid": client_id}})
        try:
            while True:
                with self._lock:
                    self._advance()
                    messages = self._socket_messages(client_id)
                for message in messages:
                    if isinstance(message, bytes):
                        await websocket.send_bytes(message)
                        continue
                    await websocket.send_json(message)
                    if message["type"] == "progress":
                        self.progress_sent += 1
                        if self.drop_socket_after is not None and self.progress_sent >= self.drop_socket_after:
                            self.drop_socket_after = None
                            await websocket.close()
                            return
                await asyncio.sleep(SOCKET_TICK_SECONDS)
        except (WebSocketDisconnect, RuntimeError):
            return

    def _socket_messages(self, client_id: str | None) -> list[dict[str, Any] | bytes]:
        """What a client's socket has not been sent yet about its prompts that started."""
        out: list[dict[str, Any] | bytes] = []
        now = time.monotonic()
        for pid, p in self.prompts.items():
            if p["client_id"] != client_id or "started_at" not in p or p.get("ws_done"):
                continue
            if not p.get("ws_sent"):
                p["ws_sent"] = 0
                out += [{"type": "execution_start", "data": {"prompt_id": pid}},
                        {"type": "executing", "data": {"node": "3", "display_node": "3", "prompt_id": pid}}]
            steps, done = self.progress_steps, p["state"] != "running"
            due = steps if done else int(steps * (now - p["started_at"]) / max(1e-6, p["ends_at"] - p["started_at"]))
            for step in range(p["ws_sent"] + 1, min(due, steps) + 1):
                out.append(struct.pack(">II", 1, 1) + jpeg((30 * step % 256, 90, 160)))
                out.append({"type": "progress", "data": {"value": step, "max": steps, "prompt_id": pid, "node": "3"}})
                p["ws_sent"] = step
            if done:
                p["ws_done"] = True
                out += [{"type": "executing", "data": {"node": None, "prompt_id": pid}},
                        {"type": "execution_success", "data": {"prompt_id": pid}}]
        return out

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
