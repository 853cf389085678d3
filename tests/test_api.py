"""The HTTP contract end to end: real API process, real worker process, real Redis."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
from jose import jwt
from PIL import Image

from app.harness import Stack
from tests.utils import TEST_SECRET, assert_counts_consistent, auth, new_user, token, wait_status

TERMINAL = {"completed", "failed", "cancelled"}


def create(client: httpx.Client, headers: dict[str, str], **body: object) -> httpx.Response:
    return client.post("/create-queue", json=body, headers=headers)


# -- auth ---------------------------------------------------------------------------------------
def test_missing_token_is_401_with_bearer_challenge(client: httpx.Client) -> None:
    r = client.get("/active-queues")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "detail" in r.json()


def test_bad_tokens_are_401(client: httpx.Client) -> None:
    now = int(time.time())
    bad = {
        "malformed": "not-a-jwt",
        "expired": token("u", ttl=-120),  # past the 30 s clock-skew leeway
        "wrong signature": token("u", secret="another-secret-of-enough-length"),
        "no sub": jwt.encode({"exp": now + 60}, TEST_SECRET, algorithm="HS256"),
        "no exp": jwt.encode({"sub": "u"}, TEST_SECRET, algorithm="HS256"),
        "alg none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ.",
        "other alg": jwt.encode({"sub": "u", "exp": now + 60}, TEST_SECRET, algorithm="HS512"),
    }
    for what, tok in bad.items():
        r = client.get("/active-queues", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 401, what
        assert r.headers.get("www-authenticate") == "Bearer", what
        assert r.json()["detail"], what


def test_health_and_openapi_need_no_token(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["redis"] is True and body["workers"] >= 1
    spec = client.get("/openapi.json").json()
    for path in ("/create-queue", "/queue-status/{queue_id}", "/cancel-queue/{queue_id}", "/active-queues",
                 "/history", "/queue/{queue_id}", "/generate", "/health", "/retry-queue/{queue_id}"):
        assert path in spec["paths"], path
    assert client.get("/ready").json() == {"ready": True}
    page = client.head("/")
    assert page.status_code == 200 and page.content == b"" and page.headers["content-type"].startswith("text/html")


# -- create and run -------------------------------------------------------------------------------
def test_batch_completes_with_fetchable_pngs_and_seeds(client: httpx.Client) -> None:
    headers = auth(new_user())
    r = create(client, headers, prompts=["a red fox", "a blue owl"], count=3, seed=100, width=64, height=64,
               name="animals", tags=["t1"])
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["total"] == 6 and created["name"] == "animals" and created["tags"] == ["t1"]
    assert_counts_consistent(created)
    done = wait_status(client, headers, created["queue_id"], {"completed"})
    assert done["succeeded"] == 6 and done["progress"] == 100.0 and done["position"] is None
    assert_counts_consistent(done)
    images = done["images"]
    assert [i["seed"] for i in images] == [100, 101, 102, 103, 104, 105]
    assert [i["prompt"] for i in images] == ["a red fox"] * 3 + ["a blue owl"] * 3
    blobs = set()
    for image in images:
        assert image["status"] == "succeeded" and image["started_at"] and image["finished_at"]
        got = httpx.get(client.base_url.join(image["url"]))  # signed: no token needed
        assert got.status_code == 200
        assert got.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)
        blobs.add(got.content)
    assert len(blobs) == 6  # different prompt or seed, different picture


def test_image_url_access_rules(client: httpx.Client) -> None:
    owner, other = auth(new_user()), auth(new_user())
    qid = create(client, owner, prompts=["x"], width=64, height=64).json()["queue_id"]
    image = wait_status(client, owner, qid, {"completed"})["images"][0]
    plain = f"/images/{qid}/0"
    assert client.get(plain, headers=owner).status_code == 200
    assert client.get(plain, headers=other).status_code == 404
    assert client.get(plain).status_code == 401
    tampered = image["url"].replace("sig=", "sig=A")
    assert client.get(tampered).status_code == 404
    expired = f"{plain}?exp={int(time.time()) - 5}&sig=" + "A" * 43
    assert client.get(expired).status_code == 404
    assert client.get(f"/images/{qid}/1", headers=owner).status_code == 404
    # A signed URL names the attempt it binds (checked before anything is read); another attempt's
    # number with this signature is refused, and a URL made before URLs named it still works.
    assert "?a=1&" in image["url"]
    assert client.get(image["url"].replace("?a=1&", "?a=2&")).status_code == 404
    assert client.get(image["url"].replace("?a=1&", "?")).status_code == 200
    # An expired or broken signed URL (from an old status) still serves its owner's bearer token, and
    # only theirs; a bad token beside a good signature changes nothing.
    stale = f"{plain}?a=1&exp={int(time.time()) - 5}&sig=" + "A" * 43
    assert client.get(stale, headers=owner).status_code == 200
    assert client.get(stale, headers=other).status_code == 404
    assert client.get(tampered, headers=owner).status_code == 200
    assert client.get(image["url"], headers={"Authorization": "Bearer nonsense"}).status_code == 200
    assert client.get(stale, headers={"Authorization": "Bearer nonsense"}).status_code == 404


def test_image_route_authorises_before_telling_whether_an_image_exists(client: httpx.Client) -> None:
    owner = auth(new_user())
    qid = create(client, owner, prompts=["x"], width=64, height=64).json()["queue_id"]
    signed = wait_status(client, owner, qid, {"completed"})["images"][0]["url"]
    unknown = "0123456789abcdef0123456789abcdef"
    places = [f"/images/{qid}/0", f"/images/{qid}/1", f"/images/{unknown}/0", "/images/not-a-queue/0"]
    for path in places:  # no credentials: the same 401, whether the image exists or not
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
    # A signature that does not fit answers alike for the image that exists and for those that do not.
    query = signed.split("?", 1)[1]
    forged = f"exp={int(time.time()) + 600}&sig=" + "A" * 43
    answers = {(r.status_code, r.text) for r in (
        *(client.get(f"{path}?{forged}") for path in places),
        *(client.get(f"{path}?{query}") for path in places[1:]),  # image 0's signature elsewhere
    )}
    assert answers == {(404, '{"detail":"image not found (or the link expired)"}')}
    assert client.get(signed).status_code == 200


def test_template_expands_as_cartesian_product(client: httpx.Client) -> None:
    headers = auth(new_user())
    r = create(client, headers, prompt="a {colour} {animal}", variables={"colour": ["red", "blue"],
               "animal": ["fox", "owl", "cat"]}, width=64, height=64)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["total"] == 6
    prompts = [i["prompt"] for i in body["images"]]
    assert prompts == ["a red fox", "a red owl", "a red cat", "a blue fox", "a blue owl", "a blue cat"]
    wait_status(client, headers, body["queue_id"], {"completed"})


def test_bad_input_gets_clear_422(client: httpx.Client) -> None:
    headers = auth(new_user())
    cases = {
        "neither": {},
        "both": {"prompts": ["a"], "prompt": "b"},
        "missing variable": {"prompt": "a {colour} fox"},
        "unused variable": {"prompt": "a fox", "variables": {"colour": ["red"]}},
        "empty values": {"prompt": "a {c}", "variables": {"c": []}},
        "empty prompt": {"prompts": ["  "]},
        "count zero": {"prompts": ["a"], "count": 0},
        "too many images": {"prompts": ["a"] * 100, "count": 1000},
        "too wide": {"prompts": ["a"], "width": 100_000},
        "too small": {"prompts": ["a"], "width": 8},
        "long prompt": {"prompts": ["a" * 10_000]},
        "unknown model": {"prompts": ["a"], "model": "no-such-model"},
        "bad priority": {"prompts": ["a"], "priority": "urgent"},
        "negative seed": {"prompts": ["a"], "seed": -1},
        "huge params": {"prompts": ["a"], "params": {"x": "y" * 20_000}},
        "expansion too big": {"prompt": "{a}{b}", "variables": {"a": [str(i) for i in range(100)],
                                                               "b": [str(i) for i in range(100)]}},
        "bad webhook": {"prompts": ["a"], "webhook_url": "ftp://example"},
    }
    for what, body in cases.items():
        r = create(client, headers, **body)
        assert r.status_code == 422, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, list) and detail[0]["msg"], what
    r = create(client, headers, prompts=["a"], model="no-such-model")
    assert "known models" in r.json()["detail"][0]["msg"]
    assert client.get("/active-queues", headers=headers).json()["queues"] == []


def test_oversized_body_is_413(client: httpx.Client) -> None:
    r = client.post("/create-queue", content=b"{" + b" " * 2_000_000 + b"}", headers={
        **auth(new_user()), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert "detail" in r.json()


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    """Without Content-Length the limit is found while reading: still a 413, not a parse error."""
    def chunks() -> Iterator[bytes]:
        yield b'{"prompts": ["'
        for _ in range(40):
            yield b"a" * 65_536
        yield b'"]}'

    r = client.post("/create-queue", content=chunks(), headers={**auth(new_user()), "Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert "larger than" in r.json()["detail"]


def test_lone_surrogate_in_any_create_field_is_422(client: httpx.Client) -> None:
    """A lone surrogate escape is valid JSON but not text: each field that carries text refuses it clearly."""
    headers = {**auth(new_user()), "Content-Type": "application/json"}
    bodies = {
        "prompts": '"prompts": ["a \\ud800 fox"]',
        "prompt": '"prompt": "a {c} \\udfff", "variables": {"c": ["red"]}',
        "variable value": '"prompt": "a {c}", "variables": {"c": ["r\\ud83d"]}',
        "variable name": '"prompt": "a {c}", "variables": {"c": ["red"], "\\ud800": ["x"]}',
        "negative_prompt": '"prompts": ["a"], "negative_prompt": "\\ud800"',
        "params value": '"prompts": ["a"], "params": {"style": ["\\ud800"]}',
        "params key": '"prompts": ["a"], "params": {"\\udc00": 1}',
        "name": '"prompts": ["a"], "name": "\\ud800"',
        "tags": '"prompts": ["a"], "tags": ["ok", "\\ud800"]',
        "model": '"prompts": ["a"], "model": "\\ud800"',
        "webhook_url": '"prompts": ["a"], "webhook_url": "https://example.com/\\ud800"',
        "webhook_events": '"prompts": ["a"], "webhook_events": ["\\ud800"]',
    }
    for what, body in bodies.items():
        r = client.post("/create-queue", content=f'{{{body}, "width": 64, "height": 64}}'.encode(), headers=headers)
        assert r.status_code == 422, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, list) and "surrogate" in detail[0]["msg"], (what, detail)
    r = client.post("/generate", content=b'{"prompt": "\\ud800", "width": 64, "height": 64}', headers=headers)
    assert r.status_code == 422, r.text
    # A surrogate pair is ordinary text (an emoji) and is accepted.
    emoji = b'{"prompts": ["a \\ud83e\\udd8a"], "width": 64, "height": 64}'
    r = client.post("/create-queue", content=emoji, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["images"][0]["prompt"] == "a \U0001f98a"
    wait_status(client, headers, r.json()["queue_id"], {"completed"})


def test_params_no_json_writer_could_read_back_are_422_and_leave_nothing_behind(client: httpx.Client) -> None:
    """NaN, Infinity, 1e999 and 4,000-digit integers parse in Python but no strict JSON reader takes
    them; params nested hundreds deep are refused too. Each is a clear 422, and no queue is made."""
    headers = {**auth(new_user()), "Content-Type": "application/json"}
    deep = "[" * 500 + "]" * 500
    cases = {
        "NaN": ('{"x": NaN}', "finite"), "Infinity": ('{"x": [1, -Infinity]}', "finite"),
        "1e999": ('{"x": {"y": 1e999}}', "finite"), "huge int": ('{"x": ' + "9" * 4000 + "}", "64 bits"),
        "deep": ('{"x": ' + deep + "}", "nested more than 32"),
    }
    for what, (params, words) in cases.items():
        for path, base in (("/create-queue", '"prompts": ["x"]'), ("/generate", '"prompt": "x"')):
            body = f'{{{base}, "width": 64, "height": 64, "params": {params}}}'.encode()
            r = client.post(path, content=body, headers=headers)
            assert r.status_code == 422, (what, path, r.status_code, r.text[:300])
            assert words in r.json()["detail"][0]["msg"], (what, r.text[:300])
    history = client.get("/history", headers=headers)
    assert history.status_code == 200 and history.json()["queues"] == []
    assert client.get("/active-queues", headers=headers).json()["queues"] == []
    ok = client.post("/create-queue", headers=headers, json={"prompts": ["x"], "width": 64, "height": 64,
                                                              "params": {"x": [1.5, -(2**63), 2**63 - 1, True]}})
    assert ok.status_code == 201, ok.text
    wait_status(client, headers, ok.json()["queue_id"], {"completed"})


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_variables_expansion_bomb_is_refused_at_once_with_flat_memory(stack: Stack, client: httpx.Client) -> None:
    """666 placeholders and a 1 MB value fit the body limit but would expand to ~700 MB: refused from the
    value lengths, before anything is substituted."""
    body = {"prompt": "{a}" * 666, "variables": {"a": ["x" * 1_000_000]}, "width": 64, "height": 64}
    peak_before = _peak_rss_bytes(stack.api.proc.pid)
    started = time.monotonic()
    r = create(client, auth(new_user()), **body)
    elapsed = time.monotonic() - started
    assert r.status_code == 422, r.text[:300]
    assert "longer than" in r.json()["detail"][0]["msg"]
    assert elapsed < 1.0, elapsed
    assert _peak_rss_bytes(stack.api.proc.pid) - peak_before < 64 * 1024 * 1024  # the body's copies, no more
    # The bound is exact: the longest combination just within the limit is accepted.
    ok = create(client, auth(new_user()), prompt="{a}-{b}", variables={"a": ["x" * 1000, "y"], "b": ["z" * 999]},
                width=64, height=64)
    assert ok.status_code == 201, ok.text[:300]
    too_long = create(client, auth(new_user()), prompt="{a}-{b}", variables={"a": ["x" * 1001], "b": ["z" * 999]},
                      width=64, height=64)
    assert too_long.status_code == 422


def test_unknown_and_foreign_queues_are_404(client: httpx.Client) -> None:
    owner, other = auth(new_user()), auth(new_user())
    qid = create(client, owner, prompts=["x"], width=64, height=64).json()["queue_id"]
    for path in (f"/queue-status/{qid}", "/queue-status/0123456789abcdef0123456789abcdef",
                 "/queue-status/../../etc"):
        assert client.get(path, headers=other).status_code == 404, path
    assert client.post(f"/cancel-queue/{qid}", headers=other).status_code == 404
    assert client.delete(f"/queue/{qid}", headers=other).status_code == 404
    wait_status(client, owner, qid, {"completed"})


# -- cancel --------------------------------------------------------------------------------------
def test_cancel_mid_batch_leaves_exact_counts(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = create(client, headers, prompts=["slow"], count=40, width=64, height=64,
                 params={"latency_ms": 200}).json()["queue_id"]
    wait_status(client, headers, qid, {"running"}, final=False)
    r = client.post(f"/cancel-queue/{qid}", headers=headers)
    returned_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "cancelled" and body["pending"] == 0
    assert_counts_consistent(body)
    done = wait_status(client, headers, qid, {"cancelled"}, timeout=10)
    assert done["running"] == 0 and done["cancelled"] >= 30
    assert done["succeeded"] + done["cancelled"] == 40
    assert_counts_consistent(done)
    # No image of the queue started after the cancel call returned.
    assert all(i["started_at"] is None or i["started_at"] <= returned_at for i in done["images"])
    assert client.post(f"/cancel-queue/{qid}", headers=headers).status_code == 200  # no-op


def test_cancel_completed_queue_is_409(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = create(client, headers, prompts=["x"], width=64, height=64).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    r = client.post(f"/cancel-queue/{qid}", headers=headers)
    assert r.status_code == 409 and "detail" in r.json()


# -- lists -----------------------------------------------------------------------------------------
def test_active_history_and_delete(client: httpx.Client) -> None:
    headers = auth(new_user())
    slow = create(client, headers, prompts=["slow"], count=20, width=64, height=64, params={"latency_ms": 300},
                  name="slow one").json()["queue_id"]
    fast = create(client, headers, prompts=["fast cat"], width=64, height=64, name="fast", tags=["pets"]).json()
    wait_status(client, headers, fast["queue_id"], {"completed"})
    active = client.get("/active-queues", headers=headers).json()["queues"]
    assert [q["queue_id"] for q in active] == [slow]
    assert active[0].get("images") is None
    assert client.delete(f"/queue/{slow}", headers=headers).status_code == 409
    client.post(f"/cancel-queue/{slow}", headers=headers)
    wait_status(client, headers, slow, {"cancelled"})
    history = client.get("/history", headers=headers).json()
    assert history["total"] == 2
    assert [q["queue_id"] for q in history["queues"]] == [slow, fast["queue_id"]]  # newest finished first
    assert history["queues"][1]["images"][0]["status"] == "succeeded"
    assert client.get("/history?tag=pets", headers=headers).json()["total"] == 1
    assert client.get("/history?status=cancelled", headers=headers).json()["queues"][0]["queue_id"] == slow
    assert client.get("/history?search=CAT", headers=headers).json()["queues"][0]["queue_id"] == fast["queue_id"]
    assert client.get("/history?limit=1&offset=1", headers=headers).json()["queues"][0]["queue_id"] == \
        fast["queue_id"]
    assert client.delete(f"/queue/{fast['queue_id']}", headers=headers).status_code == 204
    assert client.get(f"/queue-status/{fast['queue_id']}", headers=headers).status_code == 404
    assert client.get("/history", headers=headers).json()["total"] == 1
    assert client.get("/active-queues", headers=headers).json()["queues"] == []


def test_history_can_carry_only_the_first_images(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = create(client, headers, prompts=["p"], count=12, width=64, height=64).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    (thumbs,) = client.get("/history?images_limit=4", headers=headers).json()["queues"]
    assert [i["index"] for i in thumbs["images"]] == [0, 1, 2, 3] and thumbs["total"] == 12
    assert all(i["url"] for i in thumbs["images"])
    (bare,) = client.get("/history?images_limit=0", headers=headers).json()["queues"]
    assert bare["images"] is None and bare["succeeded"] == 12
    (full,) = client.get("/history", headers=headers).json()["queues"]
    assert len(full["images"]) == 12


def test_eta_follows_the_queue_own_pace(client: httpx.Client) -> None:
    headers = auth(new_user())
    # 24 images of 600 ms on 8 slots: three rounds, about 1.8 s in all (a round is the window to catch).
    qid = create(client, headers, prompts=["p"], count=24, width=64, height=64,
                 params={"latency_ms": 600}).json()["queue_id"]
    status = wait_status(client, headers, qid, {"running"}, final=False)
    while status["succeeded"] < 8 and status["status"] == "running":
        status = client.get(f"/queue-status/{qid}?images_limit=0", headers=headers).json()
    assert status["status"] == "running" and status["pending"], status  # caught between rounds
    assert status["eta_seconds"] is not None and status["eta_seconds"] < 5, status
    wait_status(client, headers, qid, {"completed"})


def test_web_client_page_has_a_strict_content_security_policy(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    script = client.get("/static/js/main.js")  # a module script runs only with a JavaScript type
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")


def test_status_images_can_be_paged(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = create(client, headers, prompts=["p"], count=30, width=64, height=64).json()["queue_id"]
    page = client.get(f"/queue-status/{qid}?images_offset=10&images_limit=5", headers=headers).json()
    assert [i["index"] for i in page["images"]] == [10, 11, 12, 13, 14]
    summary = client.get(f"/queue-status/{qid}?images_limit=0", headers=headers).json()
    assert summary["images"] is None and summary["total"] == 30
    far = client.get(f"/queue-status/{qid}?images_offset={2**31 - 1}&images_limit={2**31 - 1}", headers=headers)
    assert far.status_code == 200 and far.json()["images"] == []
    for query in (f"images_limit={10**20}", f"images_offset={2**31}"):  # refused, not a 500
        refused = client.get(f"/queue-status/{qid}?{query}", headers=headers)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][0] == "query", query
    assert client.get(f"/history?images_limit={10**20}", headers=headers).status_code == 422
    wait_status(client, headers, qid, {"completed"})


# -- idempotency, generate, retry --------------------------------------------------------------
def test_idempotency_key_replays_same_queue(client: httpx.Client) -> None:
    headers = {**auth(new_user()), "Idempotency-Key": "abc-123"}
    first = create(client, headers, prompts=["x"], width=64, height=64)
    again = create(client, headers, prompts=["x"], width=64, height=64)
    assert first.status_code == again.status_code == 201
    assert first.json()["queue_id"] == again.json()["queue_id"]
    assert again.headers.get("idempotent-replayed") == "true"
    different = create(client, headers, prompts=["y"], width=64, height=64)
    assert different.status_code == 422
    other_user = create(client, {**auth(new_user()), "Idempotency-Key": "abc-123"}, prompts=["x"], width=64,
                        height=64)
    assert other_user.json()["queue_id"] != first.json()["queue_id"]
    # Once its queue is deleted the key names nothing: the same request makes a new queue.
    wait_status(client, headers, first.json()["queue_id"], {"completed"})
    assert client.delete(f"/queue/{first.json()['queue_id']}", headers=headers).status_code == 204
    fresh = create(client, headers, prompts=["x"], width=64, height=64)
    assert fresh.status_code == 201 and fresh.json()["queue_id"] != first.json()["queue_id"]
    assert "idempotent-replayed" not in fresh.headers
    assert create(client, headers, prompts=["x"], width=64, height=64).json()["queue_id"] == fresh.json()["queue_id"]


def test_numbers_must_be_numbers(client: httpx.Client) -> None:
    headers = auth(new_user())
    for body in ({"prompts": ["x"], "seed": False}, {"prompts": ["x"], "count": "2"}, {"prompts": ["x"], "width": 1.5}):
        r = create(client, headers, **body)
        assert r.status_code == 422, (body, r.text)
    assert client.post("/generate", headers=headers, json={"prompt": "x", "seed": True}).status_code == 422


def test_generate_returns_image_or_202(client: httpx.Client) -> None:
    headers = auth(new_user())
    r = client.post("/generate?wait=30", json={"prompt": "a lighthouse", "seed": 3, "width": 64, "height": 64},
                    headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"]["status"] == "succeeded" and body["image"]["seed"] == 3
    assert httpx.get(client.base_url.join(body["image"]["url"])).status_code == 200
    slow = client.post("/generate?wait=0", json={"prompt": "slow", "width": 64, "height": 64,
                                                  "params": {"latency_ms": 500}}, headers=headers)
    assert slow.status_code == 202
    assert slow.json()["priority"] == "high" and slow.json()["total"] == 1


def test_failed_images_carry_provider_message_and_can_be_retried(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = create(client, headers, prompts=["x"], count=2, width=64, height=64,
                 params={"fail": "content policy violation"}).json()["queue_id"]
    done = wait_status(client, headers, qid, {"failed"})
    assert done["failed"] == 2
    assert all("content policy violation" in (i["error"] or "") for i in done["images"])
    r = client.post(f"/retry-queue/{qid}", headers=headers, json={})
    assert r.status_code == 200 and r.json()["attempt"] == 2
    again = wait_status(client, headers, qid, {"failed"})
    assert again["attempt"] == 2 and again["failed"] == 2
    assert all(i["attempts"] == 2 for i in again["images"])


def test_retry_rules(client: httpx.Client) -> None:
    headers = auth(new_user())
    qid = create(client, headers, prompts=["x"], width=64, height=64).json()["queue_id"]
    wait_status(client, headers, qid, {"completed"})
    assert client.post(f"/retry-queue/{qid}", headers=headers).status_code == 409  # nothing failed
    slow = create(client, headers, prompts=["s"], count=10, width=64, height=64,
                  params={"latency_ms": 300}).json()["queue_id"]
    assert client.post(f"/retry-queue/{slow}", headers=headers).status_code == 409  # still running
    client.post(f"/cancel-queue/{slow}", headers=headers)
    wait_status(client, headers, slow, {"cancelled"})
    r = client.post(f"/retry-queue/{slow}", headers=headers, json={"include_cancelled": True})
    assert r.status_code == 200
    done = wait_status(client, headers, slow, {"completed"}, timeout=30)
    assert done["succeeded"] == 10 and done["cancelled"] == 0
    assert_counts_consistent(done)
