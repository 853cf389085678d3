"""Two models on two provider test servers: routing to the workers that serve them, caps, /models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.harness import Process
from tests.provider_servers import ProviderServer
from tests.utils import MakeStack, assert_counts_consistent, auth, new_user, wait_status, wait_until

CATALOG = """
[[models]]
name = "fast"
provider = "openai"
url = "{fast}"
api_key_env = "FAST_KEY"
provider_model = "fast-v1"
default = true

[[models]]
name = "slow"
provider = "automatic1111"
url = "{slow}"
provider_model = "sdxl-base"
max_concurrency = 2
params = {{ steps = 30 }}
"""


@pytest.fixture
def two_models(make_stack: MakeStack, tmp_path: Path) -> Iterator[dict]:
    with ProviderServer("openai", latency=0.02, api_key="fast-secret") as fast, \
            ProviderServer("automatic1111", latency=0.25) as slow:
        catalog = tmp_path / "models.toml"
        catalog.write_text(CATALOG.format(fast=fast.url, slow=slow.url))
        stack = make_stack(0, MODELS_FILE=str(catalog), FAST_KEY="fast-secret")
        workers: dict[str, Process] = {
            name: stack.add_worker("--concurrency=4", f"--models={name.removeprefix('only-')}", name=name)
            for name in ("only-fast", "only-slow")
        }
        stack.wait_for_workers(2)
        with stack.client() as client:
            yield {"client": client, "fast": fast, "slow": slow, "url": stack.redis_url, "stack": stack,
                   "workers": workers}
        stack.stop()  # before its providers go


def owners(redis_url: str, queue_id: str) -> set[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return {json.loads(v)["w"] for v in client.hgetall(f"iq:q:{{{queue_id}}}:img").values()}
    finally:
        client.close()


def test_images_go_only_to_workers_serving_their_model(two_models: dict) -> None:
    client, fast, slow = two_models["client"], two_models["fast"], two_models["slow"]
    user = auth(new_user())
    a = client.post("/create-queue", headers=user, json={"prompts": ["a"], "count": 8, "width": 64, "height": 64})
    b = client.post("/create-queue", headers=user, json={"prompts": ["b"], "count": 6, "width": 64, "height": 64,
                                                          "model": "slow"})
    assert a.json()["model"] == "fast" and b.json()["model"] == "slow"
    done_a = wait_status(client, user, a.json()["queue_id"], {"completed"})
    done_b = wait_status(client, user, b.json()["queue_id"], {"completed"}, timeout=60)
    assert done_a["succeeded"] == 8 and done_b["succeeded"] == 6
    assert_counts_consistent(done_b)
    assert owners(two_models["url"], a.json()["queue_id"]) == {"only-fast"}
    assert owners(two_models["url"], b.json()["queue_id"]) == {"only-slow"}
    assert len(fast.requests) == 8 and len(slow.requests) == 6
    assert {r["json"]["model"] for r in fast.requests} == {"fast-v1"}
    assert all(r["json"]["steps"] == 30 and r["json"]["override_settings"] == {"sd_model_checkpoint": "sdxl-base"}
               for r in slow.requests)
    assert slow.max_in_flight <= 2  # the model's cap across all workers, below the worker's 4 slots


def test_unknown_model_is_422_naming_the_known_ones(two_models: dict) -> None:
    r = two_models["client"].post("/create-queue", headers=auth(new_user()), json={"prompts": ["a"],
                                                                                   "model": "nope"})
    assert r.status_code == 422
    assert "fast" in r.json()["detail"][0]["msg"] and "slow" in r.json()["detail"][0]["msg"]


def test_models_endpoint_reports_live_figures(two_models: dict) -> None:
    client = two_models["client"]
    user = auth(new_user())
    qid = client.post("/create-queue", headers=user, json={"prompts": ["x"], "count": 4, "width": 64,
                                                           "height": 64, "model": "slow"}).json()["queue_id"]
    wait_status(client, user, qid, {"completed"}, timeout=30)
    body = client.get("/models", headers=user).json()
    assert body["default"] == "fast"
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["slow"]["provider"] == "automatic1111" and by_name["slow"]["max_concurrency"] == 2
    assert by_name["slow"]["workers"] == 1 and by_name["slow"]["concurrency"] == 4
    assert by_name["slow"]["healthy"] is True and by_name["slow"]["images_per_second"] > 0
    assert by_name["fast"]["workers"] == 1 and by_name["fast"]["pending"] == 0
    assert client.get("/models").status_code == 401


def test_queue_for_an_unserved_model_waits_and_says_so(two_models: dict) -> None:
    client, workers, stack = two_models["client"], two_models["workers"], two_models["stack"]
    workers.pop("only-slow").stop()
    wait_until(lambda: client.get("/health").json()["models"]["slow"]["workers"] == 0, 20)
    user = auth(new_user())
    r = client.post("/create-queue", headers=user, json={"prompts": ["x"], "count": 2, "width": 64, "height": 64,
                                                         "model": "slow"})
    assert r.status_code == 201
    status = client.get(f"/queue-status/{r.json()['queue_id']}", headers=user).json()
    assert status["status"] == "pending" and any("no live worker" in w for w in status["warnings"])
    assert any("slow" in w for w in client.get("/health").json()["warnings"])
    workers["both"] = stack.add_worker("--concurrency=2", name="both")
    done = wait_status(client, user, r.json()["queue_id"], {"completed"}, timeout=30)
    assert done["succeeded"] == 2 and done["warnings"] == []


def test_a_worker_serving_both_shares_each_model_within_its_cap(two_models: dict) -> None:
    client, workers, stack, slow = two_models["client"], two_models["workers"], two_models["stack"], two_models["slow"]
    workers["both"] = stack.add_worker("--concurrency=4", name="both")
    wait_until(lambda: client.get("/health").json()["models"]["slow"]["workers"] == 2, 20, what="both workers")
    user = auth(new_user())
    fast_q = client.post("/create-queue", headers=user, json={"prompts": ["f"], "count": 12, "width": 64,
                                                              "height": 64}).json()["queue_id"]
    slow_q = client.post("/create-queue", headers=user, json={"prompts": ["s"], "count": 10, "width": 64,
                                                              "height": 64, "model": "slow"}).json()["queue_id"]
    assert wait_status(client, user, slow_q, {"completed"}, timeout=60)["succeeded"] == 10
    assert wait_status(client, user, fast_q, {"completed"}, timeout=60)["succeeded"] == 12
    assert owners(two_models["url"], slow_q) <= {"only-slow", "both"}
    assert owners(two_models["url"], fast_q) <= {"only-fast", "both"}
    assert slow.max_in_flight <= 2  # the model's cap holds across the two workers serving it (8 slots)


def test_the_example_catalogue_in_the_readme_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.config import Settings
    from app.services.models import load_catalog

    monkeypatch.setenv("MODELS_FILE", str(Path(__file__).resolve().parent.parent / "examples" / "models.toml"))
    catalog = load_catalog(Settings(jwt_secret="s" * 32))
    assert catalog.default == "fast" and set(catalog.models) == {"fast", "quality"}
    assert catalog.models["fast"].urls == ("http://gpu-a:8000/v1", "http://gpu-b:8000/v1")
    assert catalog.caps() == {"fast": 16, "quality": 2}
    assert catalog.models["quality"].params["steps"] == 30


def test_unknown_provider_kind_is_refused_at_start_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.config import Settings
    from app.services.models import load_catalog

    monkeypatch.delenv("MODELS_FILE", raising=False)
    with pytest.raises(ValueError, match=r"IMAGE_PROVIDER: unknown provider kind 'dalle' \(known: procedural, openai"):
        load_catalog(Settings(jwt_secret="s" * 32, image_provider="dalle"))
    assert load_catalog(Settings(jwt_secret="s" * 32, image_provider="openai", image_provider_url="http://h:1/v1")
                        ).models["openai"].provider == "openai"
