"""Prometheus metrics move as a batch runs: the API's (with Redis-wide figures) and a worker's own."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.harness import free_port
from tests.utils import MakeStack, auth, new_user, wait_status


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_count_a_batch(make_stack: MakeStack) -> None:
    port = free_port()
    stack = make_stack(worker_args=[f"--metrics-port={port}"])
    headers = auth(new_user())
    with stack.client() as client:
        before = samples(client.get("/metrics").text)
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["a", "b"], "count": 3, "width": 64, "height": 64, "params": {"fail": ""}}).json()["queue_id"]
        failing = client.post("/create-queue", headers=headers, json={
            "prompts": ["c"], "width": 64, "height": 64, "params": {"fail": "nope"}}).json()["queue_id"]
        wait_status(client, headers, qid, {"completed"})
        wait_status(client, headers, failing, {"failed"})
        after = samples(client.get("/metrics").text)
        worker_text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    key = "imagequeue_images_finished_total{status=succeeded}"
    assert after[key] - before.get(key, 0) == 6
    assert after["imagequeue_images_finished_total{status=failed}"] - \
        before.get("imagequeue_images_finished_total{status=failed}", 0) == 1
    assert after["imagequeue_queues_created_total{model=procedural,priority=normal}"] == 2
    assert after["imagequeue_images_created_total{model=procedural}"] == 7
    assert after["imagequeue_workers{}"] == 1 and after["imagequeue_worker_concurrency{}"] == 4
    assert after["imagequeue_images_pending{model=procedural,priority=normal}"] == 0
    created = "imagequeue_http_request_duration_seconds_count{method=POST,route=/create-queue,status=201}"
    assert after[created] == 2
    worker_samples = samples(worker_text)
    assert worker_samples["imagequeue_worker_images_total{model=procedural,status=succeeded}"] == 6
    assert worker_samples["imagequeue_provider_errors_total{kind=rejected,model=procedural}"] == 1
    assert worker_samples["imagequeue_provider_request_duration_seconds_count{model=procedural,outcome=ok}"] == 6
    assert re.search(r"imagequeue_worker_images_in_flight 0", worker_text)


def test_metrics_token_guards_metrics_while_ready_stays_open(make_stack: MakeStack) -> None:
    with make_stack(0, METRICS_TOKEN="scrape-token-0123456789").client() as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2NyYXBlOng="},
                        auth(new_user())):  # a user's JWT is not the scrape token either
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer" and refused.json()["detail"]
            assert "imagequeue_" not in refused.text
        scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
        assert scraped.status_code == 200
        assert any(k.startswith("imagequeue_workers") for k in samples(scraped.text))
        assert client.get("/ready").json() == {"ready": True}  # orchestrators call it without a token
        assert client.get("/health").status_code == 200


def test_metrics_token_guards_a_workers_metrics_too(make_stack: MakeStack) -> None:
    port = free_port()
    make_stack(worker_args=[f"--metrics-port={port}"], METRICS_TOKEN="scrape-token-0123456789",
               WORKER_METRICS_HOST="127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    for headers in ({}, {"Authorization": "Bearer wrong"}, auth(new_user())):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"] == "Bearer" and "METRICS_TOKEN" in refused.json()["detail"]
        assert "imagequeue_" not in refused.text
    scraped = httpx.get(url, headers={"Authorization": "Bearer scrape-token-0123456789"})
    assert scraped.status_code == 200 and "imagequeue_worker_images_in_flight" in scraped.text
