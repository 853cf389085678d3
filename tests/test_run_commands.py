"""The ways to start the service: ./run.sh (app.dev), and the original manual steps on a fresh copy of
the code (`uvicorn app.main:app --reload`, a token from `python -m app.cli token`, `python worker.py
--concurrency=3`); importing app.main does nothing else."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from app.harness import ROOT, Process, RedisServer, free_port, http_ok, redis_answers, start_server, wait_until
from tests.utils import LOG_DIR, new_user, wait_status

# What a developer's shell may carry that would change the outcome: cleared for these runs.
_CONFIG_PREFIXES = ("JWT_", "URL_SIGNING", "REDIS_", "IMAGE_", "MODELS_", "REQUIRE_AUTH", "IMAGEQUEUE_", "PROCEDURAL_")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CONFIG_PREFIXES)}
    # IMAGEQUEUE_ENV_FILE empty: not even a developer's .env in the checkout configures these runs.
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", IMAGEQUEUE_ENV_FILE="", **extra)
    return env


def fresh_copy(where: Path) -> Path:
    """The files a clone has that the service runs from (no .env, no .data)."""
    where.mkdir()
    shutil.copytree(ROOT / "app", where / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "worker.py", where / "worker.py")
    return where


def test_run_command_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = clean_env(PYTHONPATH=str(ROOT), IMAGEQUEUE_DATA_DIR=str(data), PROCEDURAL_LATENCY_MS="0")
    run = Process([sys.executable, "-m", "app.dev", "--embedded-redis", "--port", str(port), "--concurrency", "2"],
                  name="run", env=env, cwd=tmp_path, log_dir=LOG_DIR, own_session=True)  # a terminal of its own
    wait_until(lambda: "Ctrl+C stops everything." in run.output() or not run.alive, 90, what="./run.sh to start")
    out = run.output()
    assert run.alive, out
    redis_url = re.search(r"started an embedded Redis at (\S+)", out)
    token = re.search(r"export TOKEN=(\S+)", out)
    assert redis_url and token and f"generated a local JWT secret in {data / 'jwt-secret'}" in out, out
    assert f"http://127.0.0.1:{port}/#token={token[1]}" in out
    headers = {"Authorization": f"Bearer {token[1]}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        created = client.post("/create-queue", headers=headers, json={"prompts": ["x"], "count": 4, "width": 64,
                                                                     "height": 64})
        assert created.status_code == 201, created.text
        assert wait_status(client, headers, created.json()["queue_id"], {"completed"})["succeeded"] == 4
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl+C: to the command, its API and its worker, not its Redis
    assert run.wait(60) == 0, run.output()
    assert not redis_answers(redis_url[1])  # stopped last, by the command
    assert (data / "redis" / "appendonlydir").is_dir()


def test_original_manual_steps_run_a_queue(tmp_path: Path, redis_server: RedisServer) -> None:
    clone = fresh_copy(tmp_path / "clone")
    env = clean_env(REDIS_URL=redis_server.fresh_url(), WORKER_HEARTBEAT_SECONDS="0.5")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    api = start_server([uvicorn, "app.main:app", "--reload", "--port", str(port)], name="manual-api",
                       ready=http_ok(base + "/health"), timeout=60, env=env, cwd=clone, log_dir=LOG_DIR)
    worker = None
    try:
        secret = clone / ".data" / "jwt-secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert "get a token with:  python -m app.cli token USER" in api.output()

        user = new_user()
        minted = subprocess.run([sys.executable, "-m", "app.cli", "token", user], cwd=clone, env=env,
                                capture_output=True, text=True, timeout=60, check=True)
        headers = {"Authorization": f"Bearer {minted.stdout.strip()}"}
        worker = Process([sys.executable, "worker.py", "--concurrency=3"], name="manual-worker", env=env, cwd=clone,
                         log_dir=LOG_DIR)
        with httpx.Client(base_url=base, timeout=30) as client:
            created = client.post("/create-queue", headers=headers,
                                  json={"prompts": ["a red fox", "a blue owl"], "count": 3, "width": 64, "height": 64})
            assert created.status_code == 201, created.text
            done = wait_status(client, headers, created.json()["queue_id"], {"completed"})
            assert done["succeeded"] == 6
            assert client.get("/active-queues", headers={"Authorization": "Bearer forged"}).status_code == 401
        assert worker.stop() == 0, worker.output()
    finally:
        if worker is not None:
            worker.kill()
        api.stop()
    assert sorted(p.name for p in (clone / ".data").iterdir()) == ["images", "jwt-secret"]
    # With no IMAGE_STORE the images go next to the app, where API and worker both find them.
    assert len(list((clone / ".data" / "images").rglob("*-1.png"))) == 6


def test_importing_app_main_reads_no_settings_writes_nothing_and_connects_nowhere(tmp_path: Path) -> None:
    probe = """
import os, sys
seen = []
def audit(event, args):
    if event == "socket.connect":
        seen.append(f"connect {args[1]}")
    elif event == "open":
        path, flags = str(args[0]), args[2]
        if path.endswith(".env") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            seen.append(f"open {path}")
sys.addaudithook(audit)
import app.main
assert "app" not in vars(app.main)  # built on first access, as uvicorn loads it
print(seen)
"""
    env = clean_env(PYTHONPATH=str(ROOT), REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    assert list(tmp_path.iterdir()) == []


def test_containers_refuse_to_start_without_a_secret(tmp_path: Path) -> None:
    for dockerfile in ("Dockerfile", "Dockerfile.worker"):
        assert "REQUIRE_AUTH_CONFIG=true" in (ROOT / dockerfile).read_text(), dockerfile
    env = clean_env(REQUIRE_AUTH_CONFIG="true", PYTHONPATH=str(ROOT))
    api = subprocess.run([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert api.returncode != 0 and "imagequeue: JWT_SECRET is required" in api.stderr, api.stderr
    minted = subprocess.run([sys.executable, "-m", "app.cli", "token", "alice"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert minted.returncode == 2 and "JWT_SECRET" in minted.stderr, minted.stderr
    assert list(tmp_path.iterdir()) == []  # no local secret made
