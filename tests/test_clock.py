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

from tests.provider_servers import ProviderServer
from tests.utils import (
    Proc,
    RedisServer,
    assert_counts_consistent,
    auth,
    new_user,
    service_env,
    start_api,
    start_worker,
    wait_status,
    wait_until,
)

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
IMAGES = 24

pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None and os.environ.get("CI") != "true",
    reason="libfaketime is not installed (Debian package faketime; ./test.sh installs it)",
)


def skewed_worker(
    env: dict[str, str], name: str, *, offset: str | None = None, offset_file: Path | None = None
) -> Proc:
    """A worker whose wall clock is `offset` (e.g. "-30s") from the host's, or read from `offset_file`
    at every call (so a test can step it); its monotonic clock is the real one."""
    assert LIBFAKETIME is not None, "libfaketime is required in CI"
    fake = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if offset_file is not None:
        fake.update(FAKETIME_TIMESTAMP_FILE=str(offset_file), FAKETIME_NO_CACHE="1")
    else:
        fake["FAKETIME"] = offset or "+0s"
    return Proc([sys.executable, "tests/skewed_clock.py", "--concurrency=4", f"--name={name}"],
                {**env, **fake}, name)


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


@pytest.mark.parametrize("offset", ["-30s", "+30s"])
def test_two_workers_with_skewed_clocks_generate_each_image_once(tmp_path: Path, offset: str) -> None:
    server = RedisServer(tmp_path / "redis").start()
    provider = ProviderServer("openai", latency=0.4).start()
    env = service_env(server.url, IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=provider.url, IMAGE_MODEL="m")
    api, base = start_api(env)
    workers = [start_worker(env, "--concurrency=4", name="on-time"), skewed_worker(env, "skewed", offset=offset)]
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            wait_until(lambda: client.get("/health").json()["workers"] == 2, 30, what="both workers")
            done = run_batch(base, auth(new_user()))
            assert len(provider.requests) == IMAGES, f"{len(provider.requests)} provider calls for {IMAGES} images"
            assert {i["attempts"] for i in done["images"]} == {1}
            health = client.get("/health").json()
        offsets = {w["name"]: w["clock_offset_ms"] for w in health["clocks"]}
        expected = 30_000 if offset.startswith("+") else -30_000
        assert abs(offsets["skewed"] - expected) < 2_000, offsets
        assert abs(offsets["on-time"]) < 2_000, offsets
        assert any("skewed" in w and "clock" in w for w in health["warnings"]), health["warnings"]
    finally:
        for w in workers:
            w.stop()
        api.stop()
        provider.stop()
        server.stop()


def test_worker_whose_clock_steps_mid_batch_keeps_its_leases(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    provider = ProviderServer("openai", latency=0.5).start()
    env = service_env(server.url, IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=provider.url, IMAGE_MODEL="m")
    clock = tmp_path / "faketime"
    clock.write_text("+0s\n")
    api, base = start_api(env)
    worker = skewed_worker(env, "stepping", offset_file=clock)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            wait_until(lambda: client.get("/health").json()["workers"] == 1, 30, what="the worker")
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
        worker.stop()
        api.stop()
        provider.stop()
        server.stop()
