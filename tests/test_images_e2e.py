"""Image bytes in the image store, end to end: real API and worker processes, real Redis, a real
directory and a real SeaweedFS; records in Redis, serving, lifecycle, faults."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import redis
from PIL import Image

from app.harness import start_worker, stop_all, wait_until
from tests.seaweedfs import SeaweedServer
from tests.utils import LOG_DIR, MakeStack, assert_counts_consistent, auth, new_user, wait_status

TERMINAL = {"completed", "failed", "cancelled"}


@contextmanager
def images_stack(make_stack: MakeStack, *, worker_env: dict[str, Any] | None = None,
                 **env: Any) -> Iterator[tuple[httpx.Client, dict[str, str], Any]]:
    """API + one worker (its own settings on top, when given) on a fresh database; yields (client,
    env, a Redis client on that database)."""
    stack = make_stack(workers=0 if worker_env else 1, **env)
    if worker_env:
        worker_settings = {k: str(v) for k, v in worker_env.items()}
        stack.workers.append(start_worker({**stack.env, **worker_settings}, "--concurrency=4", log_dir=LOG_DIR))
        stack.wait_for_workers(1)
    r = redis.Redis.from_url(stack.redis_url)
    try:
        with stack.client() as client:
            yield client, stack.env, r
    finally:
        r.close()


def run_queue(client: httpx.Client, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = client.post("/create-queue", headers=headers, json={"width": 256, "height": 192, **body})
    assert r.status_code == 201, r.text
    done = wait_status(client, headers, r.json()["queue_id"], TERMINAL)
    assert_counts_consistent(done)
    return done


def records(r: Any, queue_id: str) -> dict[int, dict[str, Any]]:
    return {int(k): json.loads(v) for k, v in r.hgetall(f"iq:q:{{{queue_id}}}:img").items()}


def directory(env: dict[str, str]) -> Path:
    return Path(urlparse(env["IMAGE_STORE"]).path)


def test_images_go_to_the_file_store_and_redis_keeps_only_records(make_stack: MakeStack) -> None:
    with images_stack(make_stack) as (client, env, r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["a fox", "an owl"], count=2, output_format="webp",
                         output_quality=70)
        assert done["succeeded"] == 4
        qid = done["queue_id"]
        assert not r.exists(f"iq:q:{{{qid}}}:blob")
        for index, rec in records(r, qid).items():
            assert rec["k"] == f"{qid}/{index}-1.webp" and rec["tk"] == f"{qid}/{index}-1.thumb.webp"
            assert (rec["ct"], rec["iw"], rec["ih"]) == ("image/webp", 256, 192)
            assert (directory(env) / rec["k"]).stat().st_size == rec["n"]
            assert len(json.dumps(rec)) < 400
        image = done["images"][0]
        full = client.get(image["url"])
        assert full.status_code == 200 and full.headers["content-type"] == "image/webp"
        assert "immutable" in full.headers["cache-control"] and full.headers["etag"]
        assert Image.open(io.BytesIO(full.content)).size == (256, 192)
        thumb = client.get(image["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(thumb.content)).size == (256, 192)  # already small: not enlarged
        # Conditional and partial requests, as browsers and download tools send them.
        again = client.get(image["url"], headers={"If-None-Match": full.headers["etag"]})
        assert again.status_code == 304 and not again.content
        part = client.get(image["url"], headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == full.content[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(full.content)}"
        beyond = client.get(image["url"], headers={"Range": f"bytes={len(full.content)}-"})
        assert beyond.status_code == 416
        etag = full.headers["etag"]
        for matching in ("*", f'"other", {etag}', f"W/{etag}"):
            assert client.get(image["url"], headers={"If-None-Match": matching}).status_code == 304, matching
        assert client.get(image["url"], headers={"If-None-Match": '"other"'}).status_code == 200
        # If-Range: the part while the client's copy is this image, all of it otherwise.
        resumed = client.get(image["url"], headers={"Range": "bytes=10-19", "If-Range": etag})
        assert resumed.status_code == 206 and resumed.content == full.content[10:20]
        changed = client.get(image["url"], headers={"Range": "bytes=10-19", "If-Range": '"other"'})
        assert changed.status_code == 200 and changed.content == full.content
        head = client.head(image["url"])
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == etag
        assert int(head.headers["content-length"]) == len(full.content)
        head_part = client.head(image["url"], headers={"Range": "bytes=10-19"})
        assert head_part.status_code == 206 and head_part.headers["content-range"] == f"bytes 10-19/{len(full.content)}"
        with_token = client.get(f"/images/{qid}/1", headers=headers)
        assert with_token.status_code == 200 and with_token.headers["content-type"] == "image/webp"


def test_a_png_kept_as_sent_gets_its_thumbnail_when_first_asked_for(make_stack: MakeStack) -> None:
    """The worker does not decode an image it keeps as the provider sent it: the API makes the
    thumbnail on the first request (once, however many ask together) and serves it from the store after."""
    with images_stack(make_stack) as (client, env, r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["a lighthouse"], width=512, height=384)
        qid = done["queue_id"]
        rec = records(r, qid)[0]
        assert rec["k"] == f"{qid}/0-1.png" and "tk" not in rec
        made = directory(env) / qid / "0-1.thumb.webp"
        assert not made.exists()
        url = done["images"][0]["thumbnail_url"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.get(client.base_url.join(url)), range(8)))
        assert {a.status_code for a in answers} == {200} and len({a.content for a in answers}) == 1
        thumb = Image.open(io.BytesIO(answers[0].content))
        assert thumb.format == "WEBP" and thumb.size == (256, 192)
        assert made.read_bytes() == answers[0].content
        mtime = made.stat().st_mtime_ns
        again = client.get(url, headers={"If-None-Match": answers[0].headers["etag"]})
        assert again.status_code == 304 and made.stat().st_mtime_ns == mtime  # served, not made again
        full = client.get(done["images"][0]["url"])
        assert full.headers["content-type"] == "image/png" and Image.open(io.BytesIO(full.content)).size == (512, 384)


def test_output_format_is_validated(client: httpx.Client) -> None:
    headers = auth(new_user())
    for body, field in (({"output_format": "gif"}, "output_format"), ({"output_quality": 0, "output_format": "jpeg"},
                        "output_quality"), ({"output_quality": 80}, "output_quality")):
        r = client.post("/create-queue", headers=headers, json={"prompts": ["x"], **body})
        assert r.status_code == 422, r.text
        assert field in json.dumps(r.json()["detail"])


def test_a_vanished_object_is_a_404_that_says_so_and_delete_removes_the_queues_objects(
    make_stack: MakeStack,
) -> None:
    with images_stack(make_stack) as (client, env, r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["a", "b", "c"])
        qid = done["queue_id"]
        queue_dir = directory(env) / qid
        assert len(list(queue_dir.iterdir())) == 3  # three PNGs (thumbnails come when asked for)
        assert client.get(done["images"][2]["thumbnail_url"]).status_code == 200
        assert len(list(queue_dir.iterdir())) == 4
        (queue_dir / "0-1.png").unlink()
        gone = client.get(done["images"][0]["url"])
        assert gone.status_code == 404
        assert "no longer in the image store" in gone.json()["detail"]
        gone_thumb = client.get(done["images"][0]["thumbnail_url"])  # nothing left to make it from
        assert gone_thumb.status_code == 404 and "no longer in the image store" in gone_thumb.json()["detail"]
        assert client.get(done["images"][1]["url"]).status_code == 200
        assert client.delete(f"/queue/{qid}", headers=headers).status_code == 204
        assert not queue_dir.exists()
        assert r.zscore("iq:gc", qid) is None


def test_expired_queues_leave_nothing_in_the_store(make_stack: MakeStack) -> None:
    ttl, sweep = 5, 1
    with images_stack(make_stack, QUEUE_TTL_SECONDS=ttl, IMAGE_STORE_SWEEP_SECONDS=sweep) as (client, env, r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["short-lived"], count=3)
        qid = done["queue_id"]
        for image in done["images"]:
            assert client.get(image["thumbnail_url"]).status_code == 200
        assert len(list((directory(env) / qid).iterdir())) == 6
        wait_until(lambda: not (directory(env) / qid).exists() and r.zscore("iq:gc", qid) is None,
                   ttl + sweep + 10, interval=0.2, what="the sweep to remove the expired queue's objects")
        assert not r.exists(f"iq:q:{{{qid}}}") and not r.exists(f"iq:q:{{{qid}}}:img")


def test_the_api_sweeps_expired_queues_while_no_worker_runs(make_stack: MakeStack) -> None:
    """Workers gone for the night: an expired queue's objects still leave the store, by the API's sweep."""
    ttl, sweep = 5, 1
    stack = make_stack(QUEUE_TTL_SECONDS=ttl, IMAGE_STORE_SWEEP_SECONDS=sweep)
    r = redis.Redis.from_url(stack.redis_url)
    try:
        with stack.client() as client:
            headers = auth(new_user())
            qid = run_queue(client, headers, prompts=["overnight"], count=2)["queue_id"]
            stop_all(stack.workers)
            assert not any(w.alive for w in stack.workers)
            assert len(list((directory(stack.env) / qid).iterdir())) == 2
            wait_until(lambda: not (directory(stack.env) / qid).exists() and r.zscore("iq:gc", qid) is None,
                       ttl + sweep + 10, interval=0.2, what="the API's sweep to remove the expired queue's objects")
            assert client.get("/health").json()["workers"] == 0
    finally:
        r.close()


def test_a_thumbnail_still_being_made_answers_503_with_retry_after_and_is_there_on_the_retry(
        make_stack: MakeStack) -> None:
    with images_stack(make_stack, THUMBNAIL_WAIT_SECONDS=0.001) as (client, _, _r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["a large one"], width=1024, height=1024)
        url = done["images"][0]["thumbnail_url"]
        busy = client.get(url)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert "is still being made" in busy.json()["detail"]
        wait_until(lambda: client.get(url).status_code == 200, 10, interval=0.1, what="the thumbnail")
        thumb = client.get(url)
        assert thumb.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(thumb.content)).size == (256, 256)


def test_images_written_before_the_store_stay_readable(make_stack: MakeStack) -> None:
    with images_stack(make_stack) as (client, _, r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["old"])
        qid = done["queue_id"]
        # As an earlier version left it: no object key in the record, the bytes beside it in Redis.
        rec = records(r, qid)[0]
        legacy = {k: v for k, v in rec.items() if k not in ("k", "n", "iw", "ih", "tk", "sid")}
        r.hset(f"iq:q:{{{qid}}}:img", "0", json.dumps(legacy))
        r.hset(f"iq:q:{{{qid}}}:blob", "0", b"\x89PNG legacy bytes")
        status = client.get(f"/queue-status/{qid}", headers=headers).json()
        got = client.get(status["images"][0]["url"])
        assert got.status_code == 200 and got.content == b"\x89PNG legacy bytes"
        assert got.headers["content-type"] == "image/png"
        assert client.get(status["images"][0]["thumbnail_url"]).content == b"\x89PNG legacy bytes"


def test_s3_store_streams_or_redirects_to_a_presigned_url(make_stack: MakeStack, seaweedfs: SeaweedServer) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    with images_stack(make_stack, **seaweedfs.env(prefix)) as (client, _, _r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["through the api"], output_format="jpeg")
        got = client.get(done["images"][0]["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(got.content)).format == "JPEG"
        health = client.get("/health").json()
        assert health["image_store"]["kind"] == "s3" and health["image_store"]["reachable"]
        assert not [w for w in health["warnings"] if "image store" in w]
    with images_stack(make_stack, **seaweedfs.env(prefix + "-public", public=True)) as (client, _, _r):
        headers = auth(new_user())
        done = run_queue(client, headers, prompts=["straight from the store"])
        redirect = client.get(done["images"][0]["url"], follow_redirects=False)
        assert redirect.status_code == 302
        location = redirect.headers["location"]
        assert location.startswith(seaweedfs.endpoint) and "X-Amz-Signature=" in location
        direct = httpx.get(location)
        assert direct.status_code == 200 and Image.open(io.BytesIO(direct.content)).format == "PNG"
        thumb = client.get(done["images"][0]["thumbnail_url"], follow_redirects=True)
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "WEBP"
        # The web client may show images from there.
        assert seaweedfs.endpoint in client.get("/").headers["content-security-policy"]


def test_a_worker_writing_where_the_api_cannot_read_says_so(make_stack: MakeStack, tmp_path: Path) -> None:
    elsewhere = f"file://{tmp_path / 'worker-host-disk'}"
    with images_stack(make_stack, worker_env={"IMAGE_STORE": elsewhere}) as (client, _, _r):
        def warned() -> list[str]:
            return [w for w in client.get("/health").json()["warnings"] if "cannot read" in w]

        assert wait_until(warned, 15, interval=0.2, what="/health to notice the worker's store")
        headers = auth(new_user())

        def fails_with_mismatch() -> bool:
            done = run_queue(client, headers, prompts=["lost in transit"])
            return done["failed"] == 1 and "image store mismatch" in (done["images"][0]["error"] or "")

        assert wait_until(fails_with_mismatch, 40, interval=0.5, what="images to fail with the mismatch")


def test_an_object_store_outage_mid_batch_fails_only_past_the_bound_and_counts_stay_exact(
    make_stack: MakeStack, seaweedfs: SeaweedServer
) -> None:
    bound = 4
    env = {**seaweedfs.env(f"outage-{uuid.uuid4().hex[:8]}"), "IMAGE_STORE_RETRY_SECONDS": bound,
           "PROCEDURAL_LATENCY_MS": 250}
    with images_stack(make_stack, **env) as (client, _, r):
        headers = auth(new_user())
        created = client.post("/create-queue", headers=headers,
                              json={"prompts": ["through the storm"], "count": 48, "width": 128, "height": 128})
        qid = created.json()["queue_id"]

        def progressed() -> bool:
            return int(client.get(f"/queue-status/{qid}?images_limit=0", headers=headers).json()["succeeded"]) >= 4

        wait_until(progressed, 60, interval=0.1, what="some images to succeed")
        seaweedfs.kill()
        try:
            # Down for longer than the bound: images finishing now wait, then fail with the store's error.
            wait_until(lambda: client.get(f"/queue-status/{qid}?images_limit=0", headers=headers).json()["failed"],
                       bound + 30, interval=0.2, what="an image to fail past the bound")
        finally:
            seaweedfs.start()
        done = wait_status(client, headers, qid, TERMINAL, timeout=120)
        assert_counts_consistent(done)
        assert done["succeeded"] + done["failed"] == 48 and done["failed"] >= 1 and done["succeeded"] >= 4
        for image in done["images"]:
            if image["status"] == "failed":
                assert image["error"].startswith("image store unreachable: "), image
            else:
                assert image["status"] == "succeeded" and client.get(image["url"]).status_code == 200
        # Generated once each: an upload that failed never sent an image back to the provider.
        assert {rec["a"] for rec in records(r, qid).values()} == {1}
