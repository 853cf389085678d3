"""One clock for the cluster: workers whose host clocks disagree (libfaketime) still agree on leases.

Each test runs real worker processes against a provider test server that counts its calls: an image
generated twice (a healthy lease taken for lapsed) shows as more calls than images.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.harness import Process, RedisServer, Stack
from tests.provider_servers import ProviderServer
from tests.utils import LOG_DIR, MakeStack, assert_counts_consistent, auth, new_user, wait_status, wait_until

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
IMAGES = 24

pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None and os.environ.get("CI") != "true",
    reason="libfaketime is not installed (Debian package faketime; ./test.sh installs it)",
)


def skewed_worker(
    stack: Stack, name: str, *, offset: str | None = None, offset_file: Path | None = None
) -> Process:
    """A worker of `stack` whose wall clock is `offset` (e.g. "-30s") from the host's, or read from
    `offset_file` at every call (so a test can step it); its monotonic clock is the real one."""
    assert LIBFAKETIME is not None, "libfaketime is required in CI"
    fake = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if offset_file is not None:
        fake.update(FAKETIME_TIMESTAMP_FILE=str(offset_file), FAKETIME_NO_CACHE="1")
    else:
        fake["FAKETIME"] = offset or "+0s"
    worker = Process([sys.executable, "tests/skewed_clock.py", "--concurrency=4", f"--name={name}"], name=name,
                     env={**stack.env, **fake}, log_dir=LOG_DIR)
    stack.workers.append(worker)  # stopped with the stack
    return worker


def run_batch(base: str, headers: dict[str, str]) -> dict:
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/create-queue", headers=headers, json={
            "prompts": [f"clock {i}" for i in range(IMAGES)], "width": 64, "height": 64})
        assert r.status_code == 201, r.text
        done = wait_status(client, headers, r.json()["queue_id"], {"completed", "failed"}, timeout=90)
    assert_counts_consistent(done)
    assert done["succeeded"] == IMAGES, [i["error"] for i in done["images"] if i["error"]]
    for image in done["images"]:  # an image never finishes before it started, whoever ran it
        assert image["started_at"] <= image["finished_at"], image
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    return done


def clock_env(provider_url: str) -> dict[str, object]:
    """Leases of 10 s (the default): well under the skews tested, and long enough that a loaded test
    machine never lets one lapse for want of CPU, which would re-run an image for another reason."""
    return {"IMAGE_PROVIDER": "openai", "IMAGE_PROVIDER_URL": provider_url, "IMAGE_MODEL": "m",
            "WORKER_LEASE_SECONDS": 10, "WORKER_HEARTBEAT_SECONDS": 1}


@pytest.mark.parametrize("offset", ["-30s", "+30s"])
def test_two_workers_with_skewed_clocks_generate_each_image_once(tmp_path: Path, offset: str,
                                                                 make_stack: MakeStack) -> None:
    server = RedisServer(tmp_path / "redis", log_dir=LOG_DIR).start()
    provider = ProviderServer("openai", latency=0.4).start()
    stack = make_stack(0, redis_url=server.url, **clock_env(provider.url))
    stack.add_worker("--concurrency=4", name="on-time")
    skewed_worker(stack, "skewed", offset=offset)
    try:
        stack.wait_for_workers(2)
        with stack.client(timeout=10) as client:
            done = run_batch(stack.base_url, auth(new_user()))
            assert len(provider.requests) == IMAGES, f"{len(provider.requests)} provider calls for {IMAGES} images"
            assert {i["attempts"] for i in done["images"]} == {1}
            health = client.get("/health").json()
        offsets = {w["name"]: w["clock_offset_ms"] for w in health["clocks"]}
        expected = 30_000 if offset.startswith("+") else -30_000
        assert abs(offsets["skewed"] - expected) < 2_000, offsets
        assert abs(offsets["on-time"]) < 2_000, offsets
        assert any("skewed" in w and "clock" in w for w in health["warnings"]), health["warnings"]
    finally:
        stack.stop()
        provider.stop()
        server.stop()


def test_worker_whose_clock_steps_mid_batch_keeps_its_leases(tmp_path: Path, make_stack: MakeStack) -> None:
    server = RedisServer(tmp_path / "redis", log_dir=LOG_DIR).start()
    provider = ProviderServer("openai", latency=0.5).start()
    stack = make_stack(0, redis_url=server.url, **clock_env(provider.url))
    clock = tmp_path / "faketime"
    clock.write_text("+0s\n")
    skewed_worker(stack, "stepping", offset_file=clock)
    try:
        stack.wait_for_workers(1)
        with stack.client(timeout=10) as client:
            headers = auth(new_user())
            r = client.post("/create-queue", headers=headers, json={
                "prompts": [f"step {i}" for i in range(IMAGES)], "width": 64, "height": 64})
            assert r.status_code == 201, r.text
            qid = r.json()["queue_id"]
            wait_until(lambda: client.get(f"/queue-status/{qid}", headers=headers).json()["succeeded"] >= 4, 30,
                       what="the batch to be under way")
            clock.write_text("+60s\n")  # NTP steps the host's clock a minute ahead, mid-batch
            time.sleep(0.5)
            done = wait_status(client, headers, qid, {"completed", "failed"}, timeout=90)
        assert_counts_consistent(done)
        assert done["succeeded"] == IMAGES
        assert len(provider.requests) == IMAGES, f"{len(provider.requests)} provider calls for {IMAGES} images"
        assert {i["attempts"] for i in done["images"]} == {1}
    finally:
        stack.stop()
        provider.stop()
        server.stop()
