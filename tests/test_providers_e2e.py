"""Worker processes against provider test servers: protocol, failures, shared rate-limit back-off."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from PIL import Image

from app.services.queue.worker.gate import GATE_CHECK_SECONDS
from tests.provider_servers import ProviderServer
from tests.utils import MakeStack, assert_counts_consistent, auth, new_user, wait_status


@pytest.fixture
def provider_stack(request: pytest.FixtureRequest, make_stack: MakeStack) -> Iterator[tuple]:
    kind, workers, extra = request.param
    with ProviderServer(kind, api_key="sk-e2e") as server:
        stack = make_stack(workers, concurrency=2, IMAGE_PROVIDER=kind, IMAGE_PROVIDER_URL=server.url,
                           IMAGE_PROVIDER_API_KEY="sk-e2e", IMAGE_MODEL="test-model", **extra)
        with stack.client() as client:
            yield server, client
        stack.stop()  # before its provider goes


@pytest.mark.parametrize("provider_stack", [("openai", 1, {}), ("automatic1111", 1, {})], indirect=True)
def test_batch_through_real_provider_protocol(provider_stack: tuple) -> None:
    server, client = provider_stack
    headers = auth(new_user())
    server.script("ok", "400:Your request was rejected as a result of our safety system")
    r = client.post("/create-queue", headers=headers, json={"prompts": ["a", "b"], "count": 2, "width": 64,
                                                           "height": 64, "seed": 10})
    assert r.status_code == 201, r.text
    assert r.json()["model"] == "test-model"
    done = wait_status(client, headers, r.json()["queue_id"], {"completed"})
    assert done["succeeded"] == 3 and done["failed"] == 1
    assert_counts_consistent(done)
    (failed,) = [i for i in done["images"] if i["status"] == "failed"]
    assert "safety system" in failed["error"] and "400" in failed["error"]
    ok = next(i for i in done["images"] if i["status"] == "succeeded")
    got = client.get(ok["url"])
    assert got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    assert len(server.requests) == 4
    assert all(r["headers"]["authorization"] == "Bearer sk-e2e" for r in server.requests)
    if server.kind == "automatic1111":
        assert sorted(r["json"]["seed"] for r in server.requests) == [10, 11, 12, 13]
    reserved = "n" if server.kind == "openai" else "batch_size"
    refused = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "params": {reserved: 8}})
    assert refused.status_code == 422 and reserved in refused.json()["detail"][0]["msg"]
    assert refused.json()["detail"][0]["loc"] == ["body", "params"]


def test_a1111_params_that_get_around_the_limits_are_refused(make_stack: MakeStack) -> None:
    """Hires fix, refiner, scripts and infotext could change the size or the model: 422 naming them."""
    stack = make_stack(0, IMAGE_PROVIDER="automatic1111", IMAGE_PROVIDER_URL="http://127.0.0.1:9", IMAGE_MODEL="sd15")
    with stack.client() as client:
        headers = auth(new_user())
        for params in ({"enable_hr": True, "hr_scale": 4}, {"hr_resize_x": 8192, "hr_resize_y": 8192},
                       {"hr_checkpoint_name": "other.safetensors"}, {"refiner_checkpoint": "other"},
                       {"alwayson_scripts": {"controlnet": {"args": []}}}, {"infotext": "Size: 8192x8192"}):
            r = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "params": params})
            assert r.status_code == 422, (params, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "params"]
            assert all(name in r.json()["detail"][0]["msg"] for name in params), r.json()
        fine = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "params": {
            "steps": 20, "sampler_name": "Euler a", "cfg_scale": 7}})
        assert fine.status_code == 201, fine.text


@pytest.mark.parametrize("provider_stack", [("openai", 1, {"PROVIDER_MAX_RETRIES": 2})], indirect=True)
def test_provider_outage_fails_image_with_reason_after_budget(provider_stack: tuple) -> None:
    server, client = provider_stack
    headers = auth(new_user())
    server.script("500", "500", "500")
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "width": 64, "height": 64}).json()[
        "queue_id"]
    done = wait_status(client, headers, qid, {"failed"})
    error = done["images"][0]["error"]
    assert "after 3 attempts" in error and "500" in error
    again = client.post("/create-queue", headers=headers, json={"prompts": ["b"], "width": 64, "height": 64})
    assert wait_status(client, headers, again.json()["queue_id"], {"completed"})["succeeded"] == 1


@pytest.mark.parametrize("provider_stack", [("automatic1111", 2, {})], indirect=True)
def test_rate_limit_slows_every_worker(provider_stack: tuple) -> None:
    server, client = provider_stack
    headers = auth(new_user())
    server.latency = 0.05
    server.script("429:1.5")
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "count": 12, "width": 64,
                                                              "height": 64}).json()["queue_id"]
    done = wait_status(client, headers, qid, {"completed"})
    assert done["succeeded"] == 12
    first = server.requests[0]["at"]
    # After the 429 (answered ~0.05 s after the first request), nobody asked for 1.5 s: not the worker
    # that got it, nor the other one. A request already on its way as the 429 came back cannot be
    # called back, so the quiet begins once the other worker can have read the back-off.
    settled = first + server.latency + 2 * GATE_CHECK_SECONDS + 0.05
    late = [r for r in server.requests[1:] if settled < r["at"] < first + 1.4]
    assert not late, [round(r["at"] - first, 2) for r in server.requests]
    assert len([r for r in server.requests if r["at"] < first + 1.4]) <= 6  # the first round, a straggler each
