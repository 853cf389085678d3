"""Conditional GET of statuses and lists: ETags change exactly when the answer does, If-None-Match
gets a 304 (in every form the standard allows) that reads no image record. Real API, worker, Redis."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from app.harness import RedisServer, Stack, start_stack, wait_until
from app.models.queue import HistoryPage, ImageResult, QueueList, QueueStatus
from tests.utils import LOG_DIR, MakeStack, auth, new_user, service_env, wait_status

PNG_64 = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def idle_stack(redis_server: RedisServer) -> Iterator[Stack]:
    """An API on a database of its own with no worker: its queues stay exactly as created until a
    test changes them (no ETA or position moves)."""
    idle = start_stack(service_env(redis_server.fresh_url()), workers=0, log_dir=LOG_DIR)
    yield idle
    idle.stop()


@pytest.fixture
def idle(idle_stack: Stack) -> Iterator[httpx.Client]:
    with idle_stack.client() as c:
        yield c


def _get(client: httpx.Client, path: str, headers: dict[str, str], tag: str | None = None) -> httpx.Response:
    return client.get(path, headers={**headers, **({"If-None-Match": tag} if tag is not None else {})})


def _assert_not_modified(r: httpx.Response, etag: str) -> None:
    assert r.status_code == 304, r.text
    assert r.content == b"" and r.headers["etag"] == etag and "private" in r.headers["cache-control"]


def test_status_is_304_in_every_if_none_match_form_while_nothing_changes(idle: httpx.Client) -> None:
    headers = auth(new_user())
    qid = idle.post("/create-queue", headers=headers, json={"prompts": ["a", "b"], "count": 2, **PNG_64}).json()[
        "queue_id"]
    path = f"/queue-status/{qid}"
    first = _get(idle, path, headers)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and first.json()["status"] == "pending"
    assert first.headers["cache-control"] == "private, no-cache"
    for tag in (etag, "W/" + etag, f'"other", {etag}', f'W/"x" ,{etag} , "y"', "*"):
        _assert_not_modified(_get(idle, path, headers, tag), etag)
    for tag in ('"other"', 'W/"other", "1-2"', etag[:-2] + '"', "not a tag"):
        again = _get(idle, path, headers, tag)
        assert again.status_code == 200 and again.headers["etag"] == etag and again.json() == first.json()
    # Another user's 304 is still a 404: the ETag never answers for someone else's queue.
    assert _get(idle, path, auth(new_user()), etag).status_code == 404


def test_status_tags_differ_by_page_and_each_holds_for_its_own(idle: httpx.Client) -> None:
    headers = auth(new_user())
    qid = idle.post("/create-queue", headers=headers, json={"prompts": ["p"], "count": 5, **PNG_64}).json()[
        "queue_id"]
    pages = ["", "?images_limit=0", "?images_limit=2", "?images_offset=2", "?images_offset=2&images_limit=2"]
    tags = {page: _get(idle, f"/queue-status/{qid}{page}", headers).headers["etag"] for page in pages}
    assert len(set(tags.values())) == len(pages), tags
    for page, tag in tags.items():
        _assert_not_modified(_get(idle, f"/queue-status/{qid}{page}", headers, tag), tag)
        for other in pages:
            if other != page:
                assert _get(idle, f"/queue-status/{qid}{other}", headers, tag).status_code == 200


def test_cancel_changes_the_status_tag(idle: httpx.Client) -> None:
    headers = auth(new_user())
    qid = idle.post("/create-queue", headers=headers, json={"prompts": ["p"], "count": 3, **PNG_64}).json()[
        "queue_id"]
    path = f"/queue-status/{qid}"
    before = _get(idle, path, headers).headers["etag"]
    assert idle.post(f"/cancel-queue/{qid}", headers=headers).status_code == 200
    after = _get(idle, path, headers, before)
    assert after.status_code == 200 and after.json()["status"] == "cancelled"
    assert after.headers["etag"] != before
    _assert_not_modified(_get(idle, path, headers, after.headers["etag"]), after.headers["etag"])


def test_lists_are_304_until_one_of_their_queues_changes(idle: httpx.Client) -> None:
    headers = auth(new_user())
    first = idle.post("/create-queue", headers=headers, json={"prompts": ["p"], **PNG_64}).json()["queue_id"]
    active = _get(idle, "/active-queues", headers)
    history = _get(idle, "/history", headers)
    assert [q["queue_id"] for q in active.json()["queues"]] == [first] and history.json()["total"] == 0
    a_tag, h_tag = active.headers["etag"], history.headers["etag"]
    _assert_not_modified(_get(idle, "/active-queues", headers, a_tag), a_tag)
    _assert_not_modified(_get(idle, "/history", headers, "W/" + h_tag), h_tag)
    # Another user's lists have their own tags.
    assert _get(idle, "/active-queues", auth(new_user()), a_tag).status_code == 200

    second = idle.post("/create-queue", headers=headers, json={"prompts": ["q"], **PNG_64}).json()["queue_id"]
    active = _get(idle, "/active-queues", headers, a_tag)
    assert active.status_code == 200 and [q["queue_id"] for q in active.json()["queues"]] == [second, first]
    a_tag = active.headers["etag"]

    idle.post(f"/cancel-queue/{first}", headers=headers)  # nothing of it runs: it finishes at once
    active = _get(idle, "/active-queues", headers, a_tag)
    assert active.status_code == 200 and [q["queue_id"] for q in active.json()["queues"]] == [second]
    history = _get(idle, "/history", headers, h_tag)
    assert history.status_code == 200 and history.json()["total"] == 1 and history.headers["etag"] != h_tag
    h_tag = history.headers["etag"]
    _assert_not_modified(_get(idle, "/history", headers, h_tag), h_tag)
    paged = _get(idle, "/history?images_limit=0", headers, h_tag)  # other query, other tag
    assert paged.status_code == 200 and paged.headers["etag"] != h_tag
    _assert_not_modified(_get(idle, "/history?images_limit=0", headers, paged.headers["etag"]),
                         paged.headers["etag"])

    assert idle.delete(f"/queue/{first}", headers=headers).status_code == 204
    history = _get(idle, "/history", headers, h_tag)
    assert history.status_code == 200 and history.json()["total"] == 0


def test_status_tag_changes_as_images_finish_and_then_holds(make_stack: MakeStack) -> None:
    stack = make_stack(workers=0)
    with stack.client() as client:
        headers = auth(new_user())
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["p"], "count": 4, "params": {"latency_ms": 150}, **PNG_64}).json()["queue_id"]
        path = f"/queue-status/{qid}"
        pending = _get(client, path, headers)
        _assert_not_modified(_get(client, path, headers, pending.headers["etag"]), pending.headers["etag"])
        history_tag = _get(client, "/history", headers).headers["etag"]

        stack.add_worker("--concurrency=1")
        # Every answer seen while the images run is tagged apart from every different answer.
        answers: dict[str, dict] = {pending.headers["etag"]: pending.json()}
        tag = pending.headers["etag"]

        def finished() -> bool:
            nonlocal tag
            r = _get(client, path, headers, tag)
            if r.status_code == 200:
                body = r.json()
                assert r.headers["etag"] != tag
                assert answers.get(r.headers["etag"], body) == body
                answers[r.headers["etag"]] = body
                tag = r.headers["etag"]
            return answers[tag]["finished_at"] is not None

        wait_until(finished, 60, 0.02, what="the queue to finish")
        done = answers[tag]
        assert done["succeeded"] == 4 and all(i["url"] for i in done["images"])
        assert {0, 4} <= {body["succeeded"] for body in answers.values()}
        for _ in range(3):  # finished: nothing moves any more
            _assert_not_modified(_get(client, path, headers, tag), tag)
        stale = _get(client, path, headers, pending.headers["etag"])
        assert stale.status_code == 200 and stale.headers["etag"] == tag
        history = _get(client, "/history", headers, history_tag)
        assert history.status_code == 200 and history.json()["total"] == 1


class _Monitor:
    """Redis's MONITOR on a raw socket: every command the server runs, scripts' own included."""

    def __init__(self, server: RedisServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock.sendall(b"MONITOR\r\n")
        self._buf = b""
        self._read_until(b"+OK\r\n")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            assert chunk, "MONITOR connection closed"
            self._buf += chunk
        seen, _, self._buf = self._buf.partition(marker)
        return seen

    def commands_until_mark(self, server: RedisServer, mark: str) -> str:
        client = server.client()
        try:
            client.echo(mark)
        finally:
            client.close()
        return self._read_until(mark.encode()).decode(errors="replace")

    def close(self) -> None:
        self.sock.close()


def test_304_reads_no_image_record(idle: httpx.Client, redis_server: RedisServer) -> None:
    headers = auth(new_user())
    qid = idle.post("/create-queue", headers=headers, json={"prompts": ["p"], "count": 3, **PNG_64}).json()[
        "queue_id"]
    idle.post(f"/cancel-queue/{qid}", headers=headers)
    path = f"/queue-status/{qid}"
    etag = _get(idle, path, headers).headers["etag"]
    monitor = _Monitor(redis_server)
    try:
        _assert_not_modified(_get(idle, path, headers, etag), etag)
        seen = monitor.commands_until_mark(redis_server, "after-304")
        assert f"{{{qid}}}" in seen and f"{{{qid}}}:img" not in seen and f"{{{qid}}}:spec" not in seen, seen
        assert _get(idle, path, headers).status_code == 200
        seen = monitor.commands_until_mark(redis_server, "after-200")
        assert f"{{{qid}}}:img" in seen, seen  # the control: a full answer does read them
    finally:
        monitor.close()


def test_answers_built_without_pydantic_follow_the_schema(client: httpx.Client) -> None:
    """Statuses and lists are serialised straight from the service's data: they must be exactly what
    the declared models (and so /openapi.json) say, field for field and in order."""
    headers = auth(new_user())
    qid = client.post("/create-queue", headers=headers, json={
        "prompts": ["p"], "count": 3, "name": "n", "tags": ["t"], **PNG_64}).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    status = client.get(f"/queue-status/{qid}", headers=headers).json()
    history = client.get("/history", headers=headers).json()
    active = client.get("/active-queues", headers=headers).json()
    for body, model in ((status, QueueStatus), (history, HistoryPage), (active, QueueList)):
        assert model.model_validate(body).model_dump(mode="json") == body
    assert list(status) == list(QueueStatus.model_fields)
    assert list(status["images"][0]) == list(ImageResult.model_fields)
    assert list(history["queues"][0]) == list(QueueStatus.model_fields)
