"""Server-Sent Events: full story for late clients, exact resume with Last-Event-ID, stream tokens."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.utils import auth, new_user, wait_status


def read_sse(client: httpx.Client, path: str, headers: dict[str, str], stop_after: int | None = None,
             timeout: float = 30) -> list[dict[str, Any]]:
    """Reads events until the stream ends (or `stop_after` events); returns [{id, event, data}]."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream("GET", path, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if current:
                    if "data" in current:
                        current["data"] = json.loads(current["data"])
                    events.append(current)
                    current = {}
                    if stop_after is not None and len(events) >= stop_after:
                        break
                continue
            field, _, value = line.partition(":")
            current[field] = value.lstrip(" ")
    return events


def test_late_client_gets_the_full_story_and_the_end(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "count": 3, "width": 64,
                                                              "height": 64}).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    events = read_sse(client, f"/queue-events/{qid}", headers)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queue" and kinds[-1] == "end"
    final = events[-2]["data"]
    assert final["final"] is True and final["queue_status"] == "completed"
    assert final["counts"] == {"total": 3, "pending": 0, "running": 0, "succeeded": 3, "failed": 0, "cancelled": 0}
    done = [e["data"] for e in events if e["event"] == "image" and e["data"]["status"] == "succeeded"]
    assert sorted(d["index"] for d in done) == [0, 1, 2]
    assert all(client.get(d["url"]).status_code == 200 for d in done)  # signed URLs in events
    ids = [e["id"] for e in events if "id" in e and e["event"] != "end"]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)


def test_resume_with_last_event_id_returns_exactly_the_missed_events(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "count": 4, "width": 64,
                                                              "height": 64}).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    full = read_sse(client, f"/queue-events/{qid}", headers)
    first_part = full[:3]
    rest = read_sse(client, f"/queue-events/{qid}", {**headers, "Last-Event-ID": first_part[-1]["id"]})
    assert [e.get("id") for e in first_part + rest] == [e.get("id") for e in full]


def test_a_new_event_source_resumes_with_last_event_id_in_the_query(client: httpx.Client) -> None:
    """EventSource cannot set headers: a fresh one (say, after its stream token expired) resumes by query."""
    user = new_user()
    headers = auth(user)
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "count": 3, "width": 64,
                                                              "height": 64}).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    full = read_sse(client, f"/queue-events/{qid}", headers)
    token = client.post("/stream-token", headers=headers).json()["token"]
    rest = read_sse(client, f"/queue-events/{qid}?token={token}&last_event_id={full[1]['id']}", {})
    assert [e.get("id") for e in full[:2] + rest] == [e.get("id") for e in full]
    bad = client.get(f"/queue-events/{qid}?last_event_id={'9' * 80}", headers=headers)
    assert bad.status_code == 422


def test_live_stream_follows_a_running_queue(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "count": 6, "width": 64,
                                                              "height": 64, "params": {"latency_ms": 200}}).json()[
        "queue_id"]
    events = read_sse(client, f"/queue-events/{qid}", headers)
    assert events[-1]["event"] == "end"
    counts = [e["data"]["counts"] for e in events if "data" in e and "counts" in e["data"]]
    assert counts[-1]["succeeded"] == 6
    assert all(sum(c[k] for k in ("pending", "running", "succeeded", "failed", "cancelled")) == 6 for c in counts)


def test_stream_token_works_in_query_string_only_for_its_user(client: httpx.Client) -> None:
    owner, other = new_user(), new_user()
    qid = client.post("/create-queue", headers=auth(owner), json={"prompts": ["a"], "width": 64,
                                                                  "height": 64}).json()["queue_id"]
    wait_status(client, auth(owner), qid, {"completed"})
    token = client.post("/stream-token", headers=auth(owner)).json()["token"]
    events = read_sse(client, f"/queue-events/{qid}?token={token}", {})
    assert events[-1]["event"] == "end"
    other_token = client.post("/stream-token", headers=auth(other)).json()["token"]
    assert client.get(f"/queue-events/{qid}?token={other_token}").status_code == 404
    assert client.get(f"/queue-events/{qid}?token=garbage").status_code == 401
    assert client.get(f"/queue-events/{qid}").status_code == 401
    # The stream token is for the event streams only.
    assert client.get("/active-queues", params={"token": token}).status_code == 401


def test_user_stream_carries_events_of_all_queues(client: httpx.Client) -> None:
    headers = auth(new_user())
    body = {"prompts": ["a"], "width": 64, "height": 64, "params": {"latency_ms": 300}}
    with client.stream("GET", "/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200
        first = client.post("/create-queue", headers=headers, json=body).json()["queue_id"]
        second = client.post("/create-queue", headers=headers, json=body).json()["queue_id"]
        finals: set[str] = set()
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
                if data.get("final"):
                    finals.add(data["queue_id"])
                if finals == {first, second}:
                    break
    assert finals == {first, second}


def test_event_ids_beyond_64_bits_are_refused_before_the_stream_starts(client: httpx.Client) -> None:
    """Stream ids are two unsigned 64-bit numbers: a larger one is a 422 up front, never a broken stream."""
    headers = auth(new_user())
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "width": 64,
                                                              "height": 64}).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    too_big = [f"{2**64}-0", f"0-{2**64}", "99999999999999999999-1", "not-an-id", "1-2-3"]
    for path in (f"/queue-events/{qid}", "/events"):
        for bad in too_big:
            for how in ({"headers": {**headers, "Last-Event-ID": bad}},
                        {"headers": headers, "params": {"last_event_id": bad}}):
                r = client.get(path, timeout=10, **how)  # type: ignore[arg-type]
                assert r.status_code == 422, (path, bad, r.status_code, r.text[:200])
                assert "event id" in r.json()["detail"][0]["msg"]
    # The largest id there is still works: nothing comes after it, so the stream waits (read one ping's worth).
    top = f"{2**64 - 1}-{2**64 - 1}"
    with client.stream("GET", "/events", headers={**headers, "Last-Event-ID": top}, timeout=10) as response:
        assert response.status_code == 200
    events = read_sse(client, f"/queue-events/{qid}", {**headers, "Last-Event-ID": "0"})
    assert events[-1]["event"] == "end"


def test_resuming_at_or_after_the_final_event_gets_the_end_at_once(client: httpx.Client) -> None:
    """A client that resumes after a finished queue's final event has missed nothing but the `end`: it
    gets that promptly (the read timeout is well under a ping's interval), for a cancelled queue too."""
    headers = auth(new_user())
    done = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "count": 2, "width": 64,
                                                               "height": 64}).json()["queue_id"]
    cancelled = client.post("/create-queue", headers=headers, json={
        "prompts": ["a"], "count": 20, "width": 64, "height": 64, "params": {"latency_ms": 200}}).json()["queue_id"]
    assert client.post(f"/cancel-queue/{cancelled}", headers=headers).status_code == 200
    wait_status(client, headers, done, {"completed"})
    wait_status(client, headers, cancelled, {"cancelled"})
    for qid in (done, cancelled):
        full = read_sse(client, f"/queue-events/{qid}", headers)
        assert full[-1]["event"] == "end" and full[-2]["data"]["final"] is True
        final_id = full[-2]["id"]
        ms, _, seq = final_id.partition("-")
        for resume in (final_id, f"{ms}-{int(seq) + 1}", f"{int(ms) + 1000}-0"):
            rest = read_sse(client, f"/queue-events/{qid}", {**headers, "Last-Event-ID": resume}, timeout=5)
            assert rest == [{"event": "end", "data": {"queue_id": qid}}], (qid, resume, rest)
        # Resuming one event earlier still replays the final event exactly once, then the end.
        rest = read_sse(client, f"/queue-events/{qid}?last_event_id={full[-3]['id']}", headers, timeout=5)
        assert [e.get("id") for e in rest] == [final_id, None] and rest[-1]["event"] == "end"


def test_a_stream_sends_its_first_bytes_at_once_before_any_event(client: httpx.Client) -> None:
    """A quiet user's stream has no event for a while and the first ping comes after 15 s: a comment goes
    first, so a client or proxy waiting for the body's first bytes sees the stream open."""
    headers = auth(new_user())
    with client.stream("GET", "/events", headers=headers, timeout=3) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith(":"), first
