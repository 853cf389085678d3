"""The command-line client as a user runs it (a subprocess against the real service), and the Python client."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from app.cli.folder import STATE_FILE, OutputFolder, image_stem, slug
from app.cli.follow import Follower
from app.cli.progress import RichView
from app.client import AsyncClient, Client, Conflict, Event
from app.harness import ROOT, Process, RedisServer, Stack, free_port, start_stack
from tests.provider_servers import ProviderServer, ScriptedServer, png
from tests.utils import LOG_DIR, auth, new_user, service_env, token, wait_status, wait_until

ARTIFACTS = ROOT / "test-artifacts" / "cli"
IMAGE_NAME = re.compile(r"^(\d{4})-(\d+)-([a-z0-9-]+)\.(png|jpg|webp)$")

CATALOG = """
[[models]]
name = "procedural"
provider = "procedural"
latency_ms = 20
default = true

[[models]]
name = "scripted"
provider = "openai"
url = "{url}"
"""


# -- helpers ------------------------------------------------------------------------------------
def cli_env(base_url: str, user: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEQUEUE_", "FORCE_COLOR", "NO_COLOR"))}
    env.update({"IMAGEQUEUE_URL": base_url, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"})
    if user is not None:
        env["IMAGEQUEUE_TOKEN"] = token(user)
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(env: dict[str, str], *args: str) -> Process:
    """In the background, output (stdout and stderr together) to a log; killed at the end of the test."""
    return Process([sys.executable, "-m", "app.cli", *args], name="cli", env=env, log_dir=LOG_DIR)


def images_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if IMAGE_NAME.match(p.name))


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit code, a single `error: ...` line on stderr naming what went wrong, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def history_total(client: httpx.Client, user: str) -> int:
    active = client.get("/active-queues", headers=auth(user)).json()["queues"]
    return int(client.get("/history", headers=auth(user)).json()["total"]) + len(active)


# -- a stack with a scripted provider and admission limits --------------------------------------
@pytest.fixture(scope="module")
def limited(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """API + one worker serving `procedural` (default) and `scripted` (the OpenAI protocol, on a provider test
    server whose answers a test scripts); one active queue per user, so a second one gets a 429."""
    with ProviderServer("openai") as server:
        catalog = tmp_path_factory.mktemp("cli") / "models.toml"
        catalog.write_text(CATALOG.format(url=server.url))
        env = service_env(redis_server.fresh_url(), MODELS_FILE=str(catalog), MAX_ACTIVE_QUEUES_PER_USER="1")
        stack = start_stack(env, worker_args=("--concurrency=4",), log_dir=LOG_DIR)  # a module's: not make_stack
        with stack.client() as client:
            yield {"base": stack.base_url, "client": client, "server": server}
        stack.stop()


# -- generate, follow ---------------------------------------------------------------------------
def test_generate_writes_each_image_with_a_predictable_name_and_the_final_status(
        stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    out = tmp_path / "animals"
    result = cli(cli_env(stack.base_url, user), "generate", "a {colour} {animal}", "--var", "colour=red,blue",
                 "--var", "animal=fox,owl", "--count", "2", "--seed", "42", "--size", "64x64", "--name", "zoo",
                 "--tag", "cli", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = [f"{i:04d}-{42 + i}-a-{c}-{a}.png" for i, (c, a) in enumerate(
        (c, a) for c in ("red", "blue") for a in ("fox", "owl") for _ in range(2))]
    assert images_in(out) == sorted(expected)
    saved = [line for line in result.stdout.splitlines() if line.startswith("saved")]
    assert len(saved) == 8  # one line per finished image
    queue_id = json.loads((out / STATE_FILE).read_text())["batches"].popitem()[1]["queue_id"]
    final = json.loads((out / f"queue-{queue_id}.json").read_text())
    assert final["status"] == "completed" and final["succeeded"] == 8 and final["name"] == "zoo"
    assert final["tags"] == ["cli"]
    assert f"queue {queue_id} completed: 8 succeeded, 0 failed, 0 cancelled" in result.stdout
    for image in final["images"]:  # the very bytes the server holds, under the name its prompt and seed give
        name = image_stem(image["index"], image["seed"], image["prompt"]) + ".png"
        served = client.get(f"/images/{queue_id}/{image['index']}", headers=auth(user))
        assert (out / name).read_bytes() == served.content
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_rerunning_a_finished_generate_fetches_nothing_and_makes_no_new_queue(
        stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    env = cli_env(stack.base_url, user)
    args = ("generate", "a lighthouse", "--count", "3", "--size", "64x64", "--out", str(tmp_path))
    assert cli(env, *args).returncode == 0
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in images_in(tmp_path)}
    again = cli(env, *args)
    assert again.returncode == 0, again.stderr
    assert "resuming queue" in again.stderr
    assert again.stdout.count("exists") == 3 and "saved" not in again.stdout
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in images_in(tmp_path)} == before
    assert history_total(client, user) == 1
    fresh = cli(env, *args, "--new")  # asked for: a second batch of the same request
    assert fresh.returncode == 0 and "created queue" in fresh.stderr
    assert history_total(client, user) == 2


def test_killed_generate_resumes_its_queue_without_duplicates(
        stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    env = cli_env(stack.base_url, user)
    args = ("generate", "a slow {thing}", "--var", "thing=fox,owl", "--count", "12", "--seed", "7", "--size",
            "64x64", "--param", "latency_ms=250", "--out", str(tmp_path))
    first = start_cli(env, *args)
    wait_until(lambda: len(images_in(tmp_path)) >= 2, 60, what="the first images on disk")
    first.kill()  # SIGKILL: no chance to clean up or say anything
    had = set(images_in(tmp_path))
    assert 2 <= len(had) < 24
    again = cli(env, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    names = images_in(tmp_path)
    assert len(names) == 24 and len({IMAGE_NAME.match(n)[1] for n in names}) == 24  # type: ignore[index]
    assert had <= set(names)
    assert again.stdout.count("exists") >= len(had)
    assert history_total(client, user) == 1  # the same queue, replayed by its Idempotency-Key


def test_ctrl_c_leaves_the_queue_running_and_follow_resumes_it(
        stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    env = cli_env(stack.base_url, user)
    proc = start_cli(env, "generate", "a pier", "--count", "30", "--size", "64x64", "--param",
                     "latency_ms=300", "--out", str(tmp_path))
    wait_until(lambda: images_in(tmp_path), 60, what="a first image on disk")
    proc.signal(signal.SIGINT)
    assert proc.proc.wait(30) == 130
    said = proc.output()
    queue_id = json.loads((tmp_path / STATE_FILE).read_text())["batches"].popitem()[1]["queue_id"]
    assert f"follow {queue_id} --out {tmp_path}" in said and "keeps running" in said
    assert "Traceback" not in said
    status = client.get(f"/queue-status/{queue_id}?images_limit=0", headers=auth(user)).json()
    assert status["status"] in ("running", "completed") and status["cancelled"] == 0
    had = set(images_in(tmp_path))
    resumed = cli(env, "follow", queue_id, "--out", str(tmp_path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(images_in(tmp_path)) == 30 and had <= set(images_in(tmp_path))
    assert resumed.stdout.count("exists") >= len(had)
    assert (tmp_path / f"queue-{queue_id}.json").is_file()


class CuttingProxy:
    """A TCP proxy to the API on a free port whose open connections the test can cut, as a flaky network would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()  # what clients sent, to see the requests they made
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client:
                    with self._lock:
                        self.sent += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):  # the other direction's thread sees the end too
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            source.close()

    def cut(self) -> None:
        with self._lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self.connections.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_dropped_event_stream_resumes_from_the_last_event(
        stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    proxy = CuttingProxy(int(stack.base_url.rsplit(":", 1)[1]))
    try:
        user = new_user()
        proc = start_cli(cli_env(f"http://127.0.0.1:{proxy.port}", user), "generate", "a glacier", "--count",
                         "48", "--size", "64x64", "--param", "latency_ms=400", "--out", str(tmp_path))
        wait_until(lambda: images_in(tmp_path), 60, what="a first image on disk")
        proxy.cut()
        assert proc.proc.wait(90) == 0, proc.output()
    finally:
        proxy.close()
    said = proc.output()
    assert "lost the event stream" in said and "reconnecting" in said
    requests = bytes(proxy.sent).decode("latin-1").lower()
    assert requests.count("get /queue-events/") >= 2 and "last-event-id: " in requests
    assert len(images_in(tmp_path)) == 48
    assert said.count("saved ") == 48 and "exists" not in said  # no image fetched or reported twice
    assert history_total(client, user) == 1


def test_cancel_on_interrupt_cancels_the_queue(stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    proc = start_cli(cli_env(stack.base_url, user), "generate", "a dune", "--count", "40", "--size", "64x64",
                     "--param", "latency_ms=300", "--out", str(tmp_path), "--cancel-on-interrupt")
    wait_until(lambda: images_in(tmp_path), 60, what="a first image on disk")
    proc.signal(signal.SIGINT)
    assert proc.proc.wait(30) == 130
    assert "cancelled queue" in proc.output()
    queue_id = json.loads((tmp_path / STATE_FILE).read_text())["batches"].popitem()[1]["queue_id"]
    done = wait_status(client, auth(user), queue_id, {"cancelled"}, timeout=30)
    assert done["cancelled"] > 0


def test_a_failed_image_prints_its_error_and_exits_1(limited: dict[str, Any], tmp_path: Path) -> None:
    limited["server"].script("400:Your request was rejected as a result of our safety system")
    result = cli(cli_env(limited["base"], new_user()), "generate", "a harbour", "--count", "4", "--seed", "1",
                 "--size", "64x64", "--model", "scripted", "--out", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "safety system" in failed[0]
    assert len(images_in(tmp_path)) == 3
    assert "completed: 3 succeeded, 1 failed" in result.stdout
    assert "Traceback" not in result.stderr


def test_429_is_waited_out_as_retry_after_says(limited: dict[str, Any], tmp_path: Path) -> None:
    client, user = limited["client"], new_user()
    busy = client.post("/create-queue", headers=auth(user), json={
        "prompts": ["busy"], "count": 200, "width": 64, "height": 64, "params": {"latency_ms": 200}})
    assert busy.status_code == 201
    proc = start_cli(cli_env(limited["base"], user), "generate", "a cove", "--count", "2", "--size", "64x64",
                     "--out", str(tmp_path))
    wait_until(lambda: "429" in proc.output(), 60, what="the CLI to report the 429")
    said = proc.output()
    assert "Retry-After" in said and "waiting 30 s" in said and "active queues" in said
    client.post(f"/cancel-queue/{busy.json()['queue_id']}", headers=auth(user))
    assert proc.proc.wait(90) == 0, proc.output()
    assert len(images_in(tmp_path)) == 2
    assert history_total(client, user) == 2  # the busy queue and one from the CLI, though it asked twice


# -- bad input: one line, the right exit code, never a traceback ---------------------------------
def test_unreachable_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(cli_env(url, new_user()), "generate", "x", "--out", str(tmp_path))
    assert_one_line_error(result, 1, "cannot reach the server", url, "--url")


def test_bad_and_expired_tokens(stack: Stack, tmp_path: Path) -> None:
    env = cli_env(stack.base_url, IMAGEQUEUE_TOKEN="not-a-jwt")
    assert_one_line_error(cli(env, "generate", "x", "--out", str(tmp_path)), 2, "401", "--token")
    env["IMAGEQUEUE_TOKEN"] = token(new_user(), ttl=-60)
    assert_one_line_error(cli(env, "history"), 2, "401", "expired")
    del env["IMAGEQUEUE_TOKEN"]
    assert_one_line_error(cli(env, "status"), 2, "no token", "IMAGEQUEUE_TOKEN")


def test_server_validation_errors_name_the_field(stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    env = cli_env(stack.base_url, user)
    too_big = cli(env, "generate", "x", "--size", "99999x64", "--out", str(tmp_path))
    assert_one_line_error(too_big, 2, "422", "width")
    unknown = cli(env, "generate", "x", "--model", "no-such-model", "--out", str(tmp_path))
    assert_one_line_error(unknown, 2, "422", "model", "no-such-model")
    template = cli(env, "generate", "a {colour} fox", "--var", "size=big", "--out", str(tmp_path))
    assert_one_line_error(template, 2, "422", "colour")
    assert history_total(client, user) == 0


@pytest.mark.parametrize("args, words", [
    (["generate", "x", "--count", "0"], ["--count", "at least 1"]),
    (["generate", "x", "--size", "big"], ["--size", "WIDTHxHEIGHT"]),
    (["generate", "x", "--var", "colour"], ["--var", "NAME=value1,value2"]),
    (["generate", "a", "b", "--var", "c=1,2"], ["--var", "exactly one PROMPT"]),
    (["generate", "x", "--quality", "80"], ["--quality", "--format"]),
    (["generate", "x", "--format", "gif"], ["--format", "gif"]),
    (["generate"], ["PROMPT"]),
    (["frobnicate"], ["frobnicate"]),
    (["generate", "x", "--url", "localhost:8000"], ["--url", "http://"]),
])
def test_usage_errors(stack: Stack, args: list[str], words: list[str]) -> None:
    assert_one_line_error(cli(cli_env(stack.base_url, new_user()), *args), 2, *words)


def test_unwritable_output_folder_is_refused_before_any_queue(
        stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    user = new_user()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli(cli_env(stack.base_url, user), "generate", "x", "--out", str(blocker / "images"))
    assert_one_line_error(result, 2, "cannot write to the output folder", str(blocker / "images"))
    assert history_total(client, user) == 0


def test_unknown_queue(stack: Stack, tmp_path: Path) -> None:
    env = cli_env(stack.base_url, new_user())
    assert_one_line_error(cli(env, "follow", "0" * 32, "--out", str(tmp_path)), 2, "not found")
    assert_one_line_error(cli(env, "status", "0" * 32), 2, "not found")
    assert_one_line_error(cli(env, "cancel", "0" * 32), 2, "not found")


# -- status, cancel, history ---------------------------------------------------------------------
def test_status_cancel_and_history_print_tables_or_json(stack: Stack, client: httpx.Client) -> None:
    user = new_user()
    env = cli_env(stack.base_url, user)
    done = client.post("/create-queue", headers=auth(user), json={
        "prompts": ["a quiet lake"], "count": 2, "width": 64, "height": 64, "name": "lake", "tags": ["t1"]}).json()
    wait_status(client, auth(user), done["queue_id"], {"completed"})
    slow = client.post("/create-queue", headers=auth(user), json={
        "prompts": ["slow"], "count": 200, "width": 64, "height": 64, "params": {"latency_ms": 1000}}).json()

    table = cli(env, "status", done["queue_id"])
    assert table.returncode == 0 and "lake" in table.stdout and "completed" in table.stdout
    assert "a quiet lake" in table.stdout and "2 succeeded" in table.stdout
    as_json = json.loads(cli(env, "status", done["queue_id"], "--json").stdout)
    assert as_json["queue_id"] == done["queue_id"] and len(as_json["images"]) == 2
    active = cli(env, "status")
    assert active.returncode == 0 and slow["queue_id"] in active.stdout and done["queue_id"] not in active.stdout

    cancelled = cli(env, "cancel", slow["queue_id"], "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    again = cli(env, "cancel", slow["queue_id"])
    assert again.returncode == 0 and f"cancelled queue {slow['queue_id']}" in again.stdout
    assert_one_line_error(cli(env, "cancel", done["queue_id"]), 2, "409")

    wait_status(client, auth(user), slow["queue_id"], {"cancelled"})
    listed = cli(env, "history")
    assert listed.returncode == 0 and "history: 2 of 2" in listed.stdout
    assert done["queue_id"] in listed.stdout and slow["queue_id"] in listed.stdout
    tagged = json.loads(cli(env, "history", "--tag", "t1", "--json").stdout)
    assert [q["queue_id"] for q in tagged["queues"]] == [done["queue_id"]]


def test_token_command_still_mints_tokens(stack: Stack) -> None:
    env = {**cli_env(stack.base_url), "JWT_SECRET": stack.env["JWT_SECRET"]}
    minted = subprocess.run([sys.executable, "-m", "app.cli", "token", "alice"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert minted.returncode == 0, minted.stderr
    me = httpx.get(stack.base_url + "/active-queues", headers={"Authorization": f"Bearer {minted.stdout.strip()}"})
    assert me.status_code == 200


# -- the terminal: live progress through a pseudo-terminal ----------------------------------------
def run_in_terminal(argv: list[str], env: dict[str, str], *, interrupt_when: bytes | None = None,
                    columns: int = 110, rows: int = 32, timeout: float = 90) -> tuple[int, bytes]:
    """Runs `argv` with a pseudo-terminal as its controlling terminal; with `interrupt_when`, types Ctrl+C
    once the output shows those bytes. Returns the exit code and everything written to the terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    # The child takes the terminal as its controlling one (so Ctrl+C reaches it as SIGINT), then runs argv.
    take_tty = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", take_tty, *argv], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=ROOT, start_new_session=True)
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has gone
                    break
                if not chunk:
                    break
                output += chunk
                if interrupt_when is not None and interrupt_when in output:
                    os.write(master, b"\x03")
                    interrupt_when = None
        else:
            raise AssertionError(f"the terminal session did not end in {timeout}s: {bytes(output[-2000:])!r}")
        return proc.wait(30), bytes(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def terminal_env(base_url: str, user: str) -> dict[str, str]:
    env = cli_env(base_url, user, TERM="xterm-256color")
    env.pop("COLUMNS", None)  # the terminal's own size
    return env


def test_terminal_shows_a_live_bar_and_running_images(stack: Stack, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "app.cli", "generate", "a lighthouse at dusk", "a harbour at dawn", "--count",
            "12", "--seed", "3", "--size", "64x64", "--param", "latency_ms=400", "--out", str(tmp_path)]
    code, raw = run_in_terminal(argv, terminal_env(stack.base_url, new_user()))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "terminal-24-images.ansi").write_bytes(raw)  # `cat` it in a terminal to replay
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))
    assert code == 0, text[-3000:]
    assert "━" in text and "img/s" in text and "ETA" in text  # the bar, its rate and its ETA
    assert "#0000 a lighthouse at dusk" in text and "running" in text  # a row per running image
    assert re.search(r"\b(\d|1\d|2[0-3])/24\b", text) and "24/24" in text  # drawn while it filled up
    assert "\x1b[?25l" in raw.decode() and raw.decode().rstrip().count("\x1b[?25h")  # cursor hidden, then back
    assert len(images_in(tmp_path)) == 24
    assert "Traceback" not in text


def test_terminal_shows_each_running_images_steps_from_the_server(stack: Stack, tmp_path: Path) -> None:
    """Against the service: the provider's steps arrive as image.progress events and become per-image bars."""
    argv = [sys.executable, "-m", "app.cli", "generate", "a slow lighthouse", "--count", "2", "--size", "64x64",
            "--param", "latency_ms=4000", "--param", "steps=10", "--out", str(tmp_path)]
    code, raw = run_in_terminal(argv, terminal_env(stack.base_url, new_user()))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "terminal-steps.ansi").write_bytes(raw)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))
    assert code == 0, text[-3000:]
    steps = {int(m) for m in re.findall(r"step (\d+)/10", text)}
    assert len(steps) >= 3 and max(steps) >= 5, text[-3000:]  # drawn as the steps went on
    assert "#0000 a slow lighthouse" in text and len(images_in(tmp_path)) == 2
    assert "Traceback" not in text


def test_ctrl_c_in_a_terminal_stops_following_and_says_how_to_resume(stack: Stack, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "app.cli", "generate", "a fjord", "--count", "40", "--size", "64x64", "--param",
            "latency_ms=400", "--out", str(tmp_path)]
    code, raw = run_in_terminal(argv, terminal_env(stack.base_url, new_user()), interrupt_when=b"saved")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))
    assert code == 130, text[-3000:]
    queue_id = json.loads((tmp_path / STATE_FILE).read_text())["batches"].popitem()[1]["queue_id"]
    flat = re.sub(r"\s+", "", text)  # lines wrap at the terminal's width
    assert "keepsrunningontheserver" in flat and f"app.clifollow{queue_id}--out" in flat
    assert "Traceback" not in text


def test_recorded_terminal_session_of_a_24_image_run(stack: Stack, tmp_path: Path) -> None:
    """A real terminal (tmux), its screen captured while 24 images are made: test-artifacts/cli/session-24.txt."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    env = terminal_env(stack.base_url, new_user())
    done = tmp_path / "exit-code"
    script = tmp_path / "session.sh"
    command = [sys.executable, "-m", "app.cli", "generate", "a {colour} kite over the sea", "--var",
               "colour=red,blue,green", "--count", "8", "--seed", "100", "--size", "64x64", "--name", "kites",
               "--param", "latency_ms=1500", "--out", str(tmp_path / "kites")]
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if re.match(r"^[A-Z_][A-Z0-9_]*$", k))
    # The pane's own size, not COLUMNS/LINES that a tmux started without a terminal may hand its shell.
    script.write_text(f"{exports}unset COLUMNS LINES\ncd {shlex.quote(str(ROOT))}\n{shlex.join(command)}\n"
                      f"code=$?\necho \"exit code $code\"\n"
                      f"echo $code > {done}.tmp && mv {done}.tmp {done}\nsleep 600\n")
    socket = f"iq-cli-{os.getpid()}-{time.monotonic_ns()}"
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-x", "110", "-y", "36", f"bash {script}"], check=True, timeout=30)
    frames: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        while not done.exists() and time.monotonic() - started < 90:
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=10).stdout
            if not frames or frames[-1][1] != screen:
                frames.append((time.monotonic() - started, screen))
            time.sleep(0.25)
        time.sleep(0.3)
        final = subprocess.run([*tmux, "capture-pane", "-p", "-S", "-200"], capture_output=True, text=True,
                               timeout=10).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    record = [f"$ {' '.join(command[1:])}\n"]
    record += [f"\n----- screen at {at:.2f} s -----\n{screen.rstrip()}\n" for at, screen in frames]
    record.append(f"\n----- final screen, with scroll-back -----\n{final.rstrip()}\n")
    (ARTIFACTS / "session-24.txt").write_text("".join(record))
    assert done.exists(), final
    assert done.read_text().strip() == "0" and "exit code 0" in final
    bars = [screen for _, screen in frames if re.search(r"kites .*━.* (\d|1\d|2[0-3])/24", screen)]
    assert bars, "no frame caught the bar part-way"
    assert "24/24" in final and "completed: 24 succeeded" in final
    assert len(images_in(tmp_path / "kites")) == 24


def test_step_progress_is_shown_when_it_comes_and_odd_events_are_ignored(stack: Stack, tmp_path: Path) -> None:
    """`image.progress` events (from providers that report steps) become a per-image bar; late, malformed or
    unknown events change nothing."""
    view = RichView(Console(file=io.StringIO(), force_terminal=True, width=100))

    def screen() -> str:
        console = Console(file=io.StringIO(), width=100, record=True)
        console.print(view.progress.get_renderable())
        return console.export_text()

    status = {"queue_id": "q" * 32, "name": "steps", "total": 2, "succeeded": 0, "failed": 0, "cancelled": 0,
              "images": [{"index": 0, "prompt": "a red fox", "seed": 5},
                         {"index": 1, "prompt": "an owl [/sketch]", "seed": 6}]}
    with Client(stack.base_url, token(new_user())) as client:
        follower = Follower(client, OutputFolder(tmp_path), view, status)
        view.begin(status)
        try:
            follower.on_event(Event("image", {"type": "image", "index": 1, "status": "running"}))
            follower.on_event(Event("image.progress", {"type": "image.progress", "index": 0, "step": 12,
                                                        "steps": 30, "fraction": 0.4}))
            follower.on_event(Event("image.progress", {"type": "image.progress", "index": 0, "step": "?"}))
            follower.on_event(Event("image.progress", {"type": "image.progress"}))
            follower.on_event(Event("something.new", {"type": "something.new", "index": 0}))
            follower.on_event(Event("queue", {"type": "queue", "counts": {"total": 2, "succeeded": 1}}))
            during = screen()
            follower.on_event(Event("image", {"type": "image", "index": 0, "status": "failed", "error": "x"}))
            follower.on_event(Event("image.progress", {"type": "image.progress", "index": 0, "step": 13,
                                                        "steps": 30}))  # late: the image is over
            after = screen()
        finally:
            view.end()
    assert "#0000 a red fox" in during and "step 12/30" in during
    assert "#0001 an owl [/sketch]" in during and "running" in during and "1/2" in during  # text, not markup
    assert "#0000" not in after and "step 13/30" not in after and "#0001 an owl" in after


# -- the Python client ----------------------------------------------------------------------------
def test_python_client_creates_waits_downloads_and_resumes_events(stack: Stack, tmp_path: Path) -> None:
    with Client(stack.base_url, token(new_user())) as iq:
        queue = iq.create({"prompts": ["a red fox"], "count": 3, "seed": 9, "width": 64, "height": 64},
                          idempotency_key="fox-1")
        again = iq.create({"prompts": ["a red fox"], "count": 3, "seed": 9, "width": 64, "height": 64},
                          idempotency_key="fox-1")
        assert again["queue_id"] == queue["queue_id"]
        seen: list[Event] = []
        final = iq.wait(queue["queue_id"], on_event=seen.append)
        assert final["status"] == "completed" and final["succeeded"] == 3
        assert seen[-1].type == "queue" and seen[-1].data["final"] is True
        rest = list(iq.events(queue["queue_id"], last_event_id=seen[2].id))
        assert [e.id for e in rest] == [e.id for e in seen[3:]]
        paths = [iq.download(image["url"]).save(tmp_path / "out" / str(image["index"])) for image in final["images"]]
        assert [p.name for p in paths] == ["0.png", "1.png", "2.png"]
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_async_client_does_the_same(stack: Stack) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.base_url, token(new_user())) as iq:
            queue = await iq.create({"prompts": ["an owl"], "count": 2, "width": 64, "height": 64})
            types = [event.type async for event in iq.events(queue["queue_id"])]
            assert types[0] == "queue" and types.count("image") >= 4
            final = await iq.status(queue["queue_id"])
            assert final["succeeded"] == 2
            image = await iq.download(final["images"][0]["url"])
            assert image.extension == "png" and image.content.startswith(b"\x89PNG")
            with pytest.raises(Conflict):  # a completed queue cannot be cancelled
                await iq.cancel(queue["queue_id"])

    asyncio.run(scenario())


def test_downloads_follow_redirects_without_the_token_to_another_host() -> None:
    """An image URL that redirects to an object store: followed, and the bearer token stays home."""
    seen: dict[str, str | None] = {}

    async def blob(request: Request) -> Response:
        seen["store"] = request.headers.get("authorization")
        return Response(png(8, 8), media_type="image/png")

    with ScriptedServer([Route("/bucket/img.png", blob)], "object store") as store:
        async def image(request: Request) -> Response:
            seen["api"] = request.headers.get("authorization")
            return RedirectResponse(f"http://localhost:{store.port}/bucket/img.png", status_code=307)

        with ScriptedServer([Route("/images/q/0", image)], "api") as api, \
                Client(f"http://127.0.0.1:{api.port}", "secret-token") as iq:
            got = iq.download("/images/q/0")
    assert got.content.startswith(b"\x89PNG") and got.extension == "png"
    assert seen == {"api": "Bearer secret-token", "store": None}


def test_names_are_stable_slugs() -> None:
    assert slug("A Red Fox, at dawn!") == "a-red-fox-at-dawn"
    assert slug("Café crème — œuvre") == "cafe-creme-uvre"
    assert slug("!!!") == "image" and len(slug("x" * 500)) <= 48
    assert image_stem(3, 45, "a red fox") == "0003-45-a-red-fox"
