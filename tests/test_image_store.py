"""The image store's contract, kept by every backend: a real directory, a real SeaweedFS (S3), a real Redis."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio
from PIL import Image
from redis.asyncio import Redis

from app.core.config import Settings
from app.harness import RedisServer, free_port
from app.services.images import (
    ImageStore,
    ImageUnreadable,
    ObjectMissing,
    RangeNotSatisfiable,
    StoreUnavailable,
    StoreUnreachable,
    encode_async,
    image_key,
    open_store,
    parse_range,
    put_retrying,
    queue_prefix,
    thumbnail_key,
)
from app.services.images.factory import DEFAULT_DIRECTORY
from app.services.images.file import FileStore
from app.services.images.redis import RedisStore
from app.services.images.s3 import S3Store
from app.services.images.saving import save_image
from app.services.images.serving import ImageGone, ImageObject, ImageServer, ThumbnailBusy
from app.services.queue.store import GC_KEY, QueueStore
from tests.seaweedfs import ACCESS_KEY_ID, SEAWEEDFS_BUCKET, SECRET_ACCESS_KEY, SeaweedServer

BUCKET = SEAWEEDFS_BUCKET


def s3_store(server: SeaweedServer, prefix: str, *, public: bool = True, endpoint: str | None = None,
             secret: str = SECRET_ACCESS_KEY) -> S3Store:
    return S3Store(f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint or server.endpoint,
                   public_url=server.endpoint if public else None, access_key_id=ACCESS_KEY_ID,
                   secret_access_key=secret)


@pytest.fixture(params=["file", "s3", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ImageStore]:
    if request.param == "file":
        yield FileStore(tmp_path / "images")
    elif request.param == "s3":
        yield s3_store(request.getfixturevalue("seaweedfs"), f"contract-{uuid.uuid4().hex[:8]}")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = redis.asyncio.Redis.from_url(server.fresh_url())
        yield RedisStore(client, max_age_seconds=600)
        await client.aclose()


def queue_id() -> str:
    return uuid.uuid4().hex


async def test_an_object_reads_back_whole_in_chunks_and_by_range(store: ImageStore) -> None:
    data = os.urandom(700_000)
    key = image_key(queue_id(), 3, 1, "image/png")
    stored = await store.put(key, data, "image/png")
    assert (stored.key, stored.size, stored.content_type) == (key, len(data), "image/png")
    assert stored.etag

    assert await store.get(key) == data
    stream = await store.open(key)
    assert (stream.size, stream.start, stream.stop, stream.content_type) == (len(data), 0, len(data), "image/png")
    assert stream.etag and not stream.partial
    chunks = [c async for c in stream.chunks]
    await stream.aclose()
    assert b"".join(chunks) == data
    if store.kind != "redis":  # Redis hands a value over whole; the others stream it
        assert len(chunks) > 1

    for header, expected in (("bytes=0-9", data[:10]), ("bytes=699990-", data[699_990:]),
                             ("bytes=-5", data[-5:]), ("bytes=100-2000000", data[100:])):
        byte_range = parse_range(header, len(data))
        part = await store.open(key, byte_range)
        assert part.partial and part.size == len(data)
        assert await part.read() == expected, header


async def test_missing_objects_say_so_and_deleting_them_is_no_error(store: ImageStore) -> None:
    key = image_key(queue_id(), 0, 1, "image/png")
    assert not await store.exists(key)
    with pytest.raises(ObjectMissing):
        await store.open(key)
    with pytest.raises(ObjectMissing):
        await store.get(key)
    await store.delete([key])
    await store.put(key, b"x" * 10, "image/png")
    assert await store.exists(key)
    await store.delete([key])
    assert not await store.exists(key)


async def test_deleting_a_queue_prefix_removes_its_objects_and_nothing_else(store: ImageStore) -> None:
    q1, q2 = queue_id(), queue_id()
    keys = [image_key(q1, i, 1, "image/webp") for i in range(3)] + [thumbnail_key(q1, 0, 1)]
    for key in keys:
        await store.put(key, b"img " + key.encode(), "image/webp")
    other = image_key(q2, 0, 1, "image/webp")
    await store.put(other, b"other", "image/webp")

    assert await store.delete_prefix(queue_prefix(q1)) == len(keys)
    for key in keys:
        assert not await store.exists(key)
    assert await store.get(other) == b"other"
    assert await store.delete_prefix(queue_prefix(q1)) == 0


async def test_keys_that_could_escape_the_store_are_refused(store: ImageStore) -> None:
    for bad in ("../etc/passwd", "/abs/key", "a//b", "a/./b", "a/../b", ".hidden", "", "a b", "q/" + "x" * 600):
        with pytest.raises(ValueError):
            await store.put(bad, b"x", "image/png")
    with pytest.raises(ValueError):
        await store.delete_prefix("no-trailing-slash")
    with pytest.raises(ValueError):
        await store.delete_prefix("/")


async def test_every_client_of_one_store_sees_the_same_identity(
    store: ImageStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    first = await store.identity()
    assert first == await store.identity()
    await store.check()
    if isinstance(store, FileStore):
        assert await FileStore(store.root).identity() == first
        assert await FileStore(tmp_path / "elsewhere").identity() != first
    elif isinstance(store, S3Store):
        server = request.getfixturevalue("seaweedfs")
        # The same bucket and prefix through another name of the endpoint is the same store.
        again = s3_store(server, store.prefix, endpoint=server.endpoint.replace("127.0.0.1", "localhost"))
        assert await again.identity() == first
        assert await s3_store(server, store.prefix + "-other").identity() != first


async def test_presigned_urls_serve_the_object_without_credentials(store: ImageStore) -> None:
    key = image_key(queue_id(), 1, 2, "image/jpeg")
    await store.put(key, b"\xff\xd8 jpeg bytes", "image/jpeg")
    url = await store.presigned_url(key, 60)
    if store.kind != "s3":
        assert url is None  # the API streams these itself
        return
    assert url is not None and "X-Amz-Signature=" in url
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
        assert r.status_code == 200 and r.content == b"\xff\xd8 jpeg bytes"
        assert r.headers["content-type"] == "image/jpeg"
        tampered = url.replace(key, image_key(queue_id(), 1, 2, "image/jpeg"))
        assert (await client.get(tampered)).status_code == 403


async def test_an_s3_store_without_a_public_url_hands_out_no_presigned_urls(seaweedfs: SeaweedServer) -> None:
    store = s3_store(seaweedfs, "private", public=False)
    key = image_key(queue_id(), 0, 1, "image/png")
    await store.put(key, b"png", "image/png")
    assert await store.presigned_url(key, 60) is None


async def test_wrong_s3_credentials_fail_with_the_stores_words(seaweedfs: SeaweedServer) -> None:
    store = s3_store(seaweedfs, "creds", secret="not-the-secret")
    with pytest.raises(StoreUnavailable, match=r"writing 'q/0-1.png' in s3://imagequeue-test/creds at http://.*403"):
        await store.put("q/0-1.png", b"png", "image/png")
    with pytest.raises(StoreUnavailable, match="403"):
        await store.check()


async def test_file_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "images")
    qid = queue_id()
    for i in range(5):
        await store.put(image_key(qid, i, 1, "image/png"), os.urandom(50_000), "image/png")
    names = sorted(p.name for p in (tmp_path / "images" / qid).iterdir())
    assert names == [f"{i}-1.png" for i in range(5)]
    # A write that cannot finish leaves no partial file behind under the key.
    blocker = tmp_path / "images" / "blocked"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreUnavailable):
        await store.put("blocked/0-1.png", b"x", "image/png")
    assert blocker.read_text().startswith("a file")


async def test_file_etag_changes_with_the_content(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.put("q/a.png", b"one", "image/png")
    first = (await store.open("q/a.png"))
    await first.aclose()
    time.sleep(0.01)
    await store.put("q/a.png", b"two!", "image/png")
    second = await store.open("q/a.png")
    await second.aclose()
    assert first.etag != second.etag


async def test_unreachable_stores_are_reported_quickly() -> None:
    dead = S3Store("s3://nowhere/x", endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="a",
                   secret_access_key="b")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="nowhere"):
        await dead.check()
    assert time.monotonic() - started < 15
    with pytest.raises(StoreUnreachable, match=r"^image store unreachable: writing 'q/0-1.png' in s3://nowhere/x"):
        await put_retrying(dead, "q/0-1.png", b"x", "image/png", give_up_after=1.0)


async def test_file_store_on_an_unusable_path_fails_its_check(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot use"):
        await FileStore(tmp_path / "file" / "images").check()


async def test_an_upload_waits_out_a_store_that_is_down_and_then_lands(seaweedfs: SeaweedServer) -> None:
    store = s3_store(seaweedfs, "retry")
    key = image_key(queue_id(), 0, 1, "image/png")
    retries: list[str] = []
    seaweedfs.kill()
    try:
        upload = asyncio.create_task(put_retrying(store, key, b"survives" * 1000, "image/png", give_up_after=90,
                                                  on_retry=lambda n, e: retries.append(e.message)))
        await asyncio.sleep(2)
        assert not upload.done() and retries
    finally:
        await asyncio.to_thread(seaweedfs.start)
    stored = await upload
    assert stored.size == 8000
    assert await store.get(key) == b"survives" * 1000


# -- encoding -----------------------------------------------------------------------------------
def picture(width: int, height: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    im = Image.linear_gradient("L").resize((width, height)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


async def test_png_output_keeps_the_providers_bytes_and_adds_a_webp_thumbnail() -> None:
    data = picture(1024, 768)
    out = await encode_async(data)
    assert out.data is data and out.content_type == "image/png" and (out.width, out.height) == (1024, 768)
    assert out.thumbnail is not None
    thumb = Image.open(io.BytesIO(out.thumbnail))
    assert thumb.format == "WEBP" and thumb.size == (256, 192)


async def test_a_png_kept_without_decoding_is_still_checked_whole() -> None:
    """The worker keeps a PNG as sent without decoding it (its thumbnail comes on first request), but an
    answer cut short or damaged is refused all the same, as the decode would have."""
    data = picture(640, 480)
    kept = await encode_async(data, thumbnail=None)
    assert kept.data is data and kept.thumbnail is None
    iend = data.rindex(b"IEND") - 4
    damaged = bytearray(data)
    damaged[iend // 2] ^= 0xFF  # a byte inside the image data: that chunk's CRC no longer matches
    for bad, words in ((data[: len(data) // 2], "cut short"), (data[:iend], "cut short"),
                       (bytes(damaged), "CRC")):
        with pytest.raises(ImageUnreadable, match=words):
            await encode_async(bad, thumbnail=None)
    webp = await encode_async(data, "webp", 80, thumbnail=None)  # decoded anyway: the thumbnail comes too
    assert webp.thumbnail is not None


@pytest.mark.parametrize(("fmt", "mode", "options"), [
    ("JPEG", "RGB", {"quality": 90}), ("WEBP", "RGB", {"quality": 80}), ("WEBP", "RGBA", {"lossless": True}),
])
async def test_a_jpeg_or_webp_kept_as_sent_is_checked_whole(fmt: str, mode: str, options: dict) -> None:
    """Kept as the provider sent it (output format equal to its own, no quality asked): not decoded, but
    an answer cut short is refused, by the format's own structure."""
    im = Image.merge("RGB", (Image.linear_gradient("L"), Image.effect_noise((256, 256), 40).convert("L"),
                             Image.linear_gradient("L").rotate(90))).resize((320, 240)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    data = buf.getvalue()
    output = "jpeg" if fmt == "JPEG" else "webp"
    kept = await encode_async(data, output, thumbnail=None)
    assert kept.data is data and kept.thumbnail is None and (kept.width, kept.height) == (320, 240)
    for trailer in (b"\0\0", b"\xff" * 8, b"\x1a", b"vendor trailer"):  # bytes after the end: still whole
        assert (await encode_async(data + trailer, output, thumbnail=None)).width == 320
    for cut in (len(data) // 2, len(data) - 1):
        with pytest.raises(ImageUnreadable, match="cut short" if fmt == "JPEG" else "could not be read"):
            await encode_async(data[:cut], output, thumbnail=None)
    if fmt == "WEBP":
        damaged = bytearray(data)
        damaged[16:20] = (int.from_bytes(data[16:20], "little") - 2).to_bytes(4, "little")  # first chunk's size
        with pytest.raises(ImageUnreadable, match="could not be read"):
            await encode_async(bytes(damaged), output, thumbnail=None)


async def test_a_thumbnail_made_on_request_is_stored_and_its_queue_looked_at_again_by_the_sweep(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = Redis.from_url(redis_server.fresh_url())
    queues = QueueStore(client)
    images = FileStore(tmp_path)
    server = ImageServer(images, queues.blob, queues.gc_recheck)
    data = picture(512, 384)
    await images.put("q1/0-1.png", data, "image/png")
    await images.put("q2/0-1.png", b"\x89PNG not an image", "image/png")
    await client.zadd(GC_KEY, {"q1": 10**13})  # a live queue's time on the sweep list stays as it is
    made = await server.open(ImageObject("q1", 0, 1, {"k": "q1/0-1.png"}), True, None)
    thumb = await made.read()
    assert Image.open(io.BytesIO(thumb)).size == (256, 192)
    assert await images.get("q1/0-1.thumb.webp") == thumb and await client.zscore(GC_KEY, "q1") == 10**13
    # A queue no longer on the list (deleted or swept while the thumbnail was made) goes back on it, due now.
    await images.delete(["q1/0-1.thumb.webp"])
    fresh = ImageServer(images, queues.blob, queues.gc_recheck)
    await client.zrem(GC_KEY, "q1")
    await (await fresh.open(ImageObject("q1", 0, 1, {"k": "q1/0-1.png"}), True, None)).aclose()
    assert await client.zscore(GC_KEY, "q1") == 0
    # An image that cannot be read as one serves itself as its thumbnail, and is not tried again.
    odd = ImageObject("q2", 0, 1, {"k": "q2/0-1.png"})
    assert await (await server.open(odd, True, None)).read() == b"\x89PNG not an image"
    await images.delete(["q2/0-1.png"])
    with pytest.raises(ImageGone):
        await server.open(odd, True, None)  # the image itself is asked for, and it is gone
    assert not await images.exists("q2/0-1.thumb.webp")
    await client.aclose()


async def test_lossy_outputs_convert_with_the_quality_asked_for() -> None:
    data = picture(512, 512, "RGBA")
    low, high = await encode_async(data, "jpeg", 20), await encode_async(data, "jpeg", 95)
    assert low.content_type == "image/jpeg" and Image.open(io.BytesIO(low.data)).format == "JPEG"
    assert len(low.data) < len(high.data)
    webp = await encode_async(data, "webp", 80, thumbnail=False)
    assert webp.content_type == "image/webp" and webp.thumbnail is None
    assert Image.open(io.BytesIO(webp.data)).size == (512, 512)
    jpeg_in = picture(300, 200, fmt="JPEG")
    as_png = await encode_async(jpeg_in, "png")
    assert Image.open(io.BytesIO(as_png.data)).format == "PNG" and (as_png.width, as_png.height) == (300, 200)
    assert (await encode_async(jpeg_in, "jpeg")).data is jpeg_in  # same format, no quality asked: kept


async def test_bytes_that_are_no_image_are_refused() -> None:
    with pytest.raises(ImageUnreadable, match="could not be read"):
        await encode_async(b"<html>502 Bad Gateway</html>")


# -- ranges and configuration -------------------------------------------------------------------
def test_range_headers() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-0", 100) == (0, 1)
    assert parse_range("bytes=10-", 100) == (10, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=-500", 100) == (0, 100)
    assert parse_range("bytes=50-20", 100) is None  # malformed: served whole
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: served whole
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=abc", 100) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=100-", 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-0", 100)


def test_image_store_setting_picks_the_backend() -> None:
    client = redis.asyncio.Redis()
    assert isinstance(open_store(Settings(image_store="redis"), client), RedisStore)
    default = open_store(Settings(image_store=None), client)
    assert isinstance(default, FileStore) and default.root == DEFAULT_DIRECTORY
    assert DEFAULT_DIRECTORY.parent.name == ".data"
    s3 = open_store(Settings(image_store="s3://bucket/some/prefix", s3_endpoint_url="http://127.0.0.1:1"), client)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    for bad in ("file://relative/dir", "file://host/dir", "ftp://x", "s3://", "/plain/path"):
        with pytest.raises(ValueError, match="IMAGE_STORE="):
            open_store(Settings(image_store=bad), client)


async def test_a_saved_image_is_described_by_a_small_record(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    qid = queue_id()
    data = picture(1024, 1024)
    saved = await save_image(store, store_id=await store.identity(), queue_id=qid, index=7, attempt=2, data=data,
                             output_format="webp", quality=80, give_up_after=5)
    assert saved.key == f"{qid}/7-2.webp" and saved.thumbnail_key == f"{qid}/7-2.thumb.webp"
    assert (saved.width, saved.height, saved.content_type) == (1024, 1024, "image/webp")
    assert saved.size == len(await store.get(saved.key))
    record = json.dumps(saved.record())
    assert len(record) < 300, record  # whatever the image's size
    thumb = Image.open(io.BytesIO(await store.get(f"{qid}/7-2.thumb.webp")))
    assert thumb.format == "WEBP" and max(thumb.size) == 256


class GatedStore(FileStore):
    """A real file store whose reads of images wait for a gate: a slow or hung store, seen from the API."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.reading: list[str] = []
        self.failing = False

    async def get(self, key: str) -> bytes:
        self.reading.append(key)
        await self.gate.wait()
        if self.failing:
            raise StoreUnavailable("store away")
        return await super().get(key)


async def test_thumbnails_on_request_share_their_slots_fairly_and_never_hold_a_request_for_ever(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = Redis.from_url(redis_server.fresh_url())
    queues = QueueStore(client)
    store = GatedStore(tmp_path)
    server = ImageServer(store, queues.blob, queues.gc_recheck)
    data = picture(64, 48)
    for queue in ("big", "small", "hung"):
        for index in range(6):
            await FileStore.put(store, f"{queue}/{index}-1.png", data, "image/png")

    def thumb(queue: str, index: int) -> asyncio.Task[bytes]:
        async def read() -> bytes:
            return await (await server.open(ImageObject(queue, index, 1, {"k": f"{queue}/{index}-1.png"}),
                                            True, None)).read()
        return asyncio.ensure_future(read())

    # One queue asking for six at once holds two of the four slots; another queue's request starts at once.
    big = [thumb("big", i) for i in range(6)]
    await wait_for(lambda: len(store.reading) == 2)
    small = thumb("small", 0)
    await wait_for(lambda: len(store.reading) == 3)
    await asyncio.sleep(0.05)
    assert sorted(store.reading) == ["big/0-1.png", "big/1-1.png", "small/0-1.png"]
    store.gate.set()
    for made in await asyncio.gather(*big, small):
        assert Image.open(io.BytesIO(made)).size == (64, 48)

    # A request waits a bounded time and is told to come back; the thumbnail is made meanwhile, once.
    store.gate.clear()
    store.reading.clear()
    server.thumbnail_wait = 0.2
    with pytest.raises(ThumbnailBusy, match="try again"):
        await thumb("small", 1)
    store.gate.set()
    await wait_for(lambda: os.path.exists(tmp_path / "small" / "1-1.thumb.webp"))
    assert Image.open(io.BytesIO(await thumb("small", 1))).format == "WEBP" and store.reading == ["small/1-1.png"]

    # A making that fails after every request gave up is logged (not left as an unretrieved error),
    # and the next request tries again.
    store.gate.clear()
    store.failing = True
    with pytest.raises(ThumbnailBusy):
        await thumb("hung", 0)
    caplog.set_level(logging.WARNING)
    store.gate.set()
    await wait_for(lambda: "making thumbnail hung/0-1.thumb.webp failed: store away" in caplog.text)
    gc.collect()
    assert "never retrieved" not in caplog.text
    store.failing = False
    assert Image.open(io.BytesIO(await thumb("hung", 0))).size == (64, 48)
    await client.aclose()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
