"""Providers report progress (step, steps, preview) from each protocol, never at the image's expense."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.core.config import Settings
from app.services.models import load_catalog
from app.services.providers import comfyui_progress
from app.services.providers.base import ImageRequest, ProviderUnavailable
from app.services.providers.comfyui import ComfyUIProvider
from app.services.providers.comfyui_workflow import Workflow
from app.services.providers.factory import build_provider
from app.services.providers.procedural import ProceduralProvider
from app.services.providers.progress import Progress, ProgressFeed, immediate
from tests.comfyui_server import ComfyUIServer
from tests.provider_servers import ProviderServer
from tests.utils import ROOT, TEST_SECRET

EXAMPLE = ROOT / "examples" / "comfyui" / "txt2img-api.json"


class Listener:
    """Records what it is given; optionally slow or failing."""

    def __init__(self, *, delay: float = 0.0, fail: bool = False) -> None:
        self.seen: list[Progress] = []
        self.delay = delay
        self.fail = fail

    async def __call__(self, progress: Progress) -> None:
        self.seen.append(progress)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("listener broke")

    @property
    def steps(self) -> list[tuple[int, int]]:
        return [(p.step, p.steps) for p in self.seen]


def request(listener: Listener | None = None, **params: object) -> ImageRequest:
    return ImageRequest("a red fox", 7, 64, 48, params=params, request_id="q:0", on_progress=listener)


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


# -- the feed ---------------------------------------------------------------------------------------
async def test_feed_delivers_the_latest_value_and_keeps_the_latest_preview_while_the_listener_is_busy() -> None:
    listener = Listener(delay=0.2)
    feed = ProgressFeed(listener)
    feed.report(1, 4, b"first", "image/png")
    await asyncio.sleep(0.05)  # the listener is now busy with step 1
    feed.report(2, 4, b"second", "image/png")
    feed.report(3, 4)
    await asyncio.sleep(0.3)
    await feed.aclose()
    assert listener.steps == [(1, 4), (3, 4)]  # step 2 was coalesced away...
    assert listener.seen[1].preview == b"second" and listener.seen[1].fraction == 0.75  # ...its preview was not
    feed.report(4, 4)
    assert not feed.wanted and listener.steps == [(1, 4), (3, 4)]  # closed: nothing more


async def test_a_slow_listener_never_slows_the_image() -> None:
    listener = Listener(delay=5.0)
    started = time.monotonic()
    image = await ProceduralProvider(latency_ms=200).generate(request(listener))
    assert time.monotonic() - started < 1.0
    assert size_of(image.data) == (64, 48) and listener.steps == [(1, 4)]  # busy with the first ever since


async def test_a_failing_listener_never_fails_the_image(caplog: pytest.LogCaptureFixture) -> None:
    listener = Listener(fail=True)
    with caplog.at_level(logging.WARNING, logger="imagequeue.providers"):
        image = await ProceduralProvider(latency_ms=100).generate(request(listener))
    assert size_of(image.data) == (64, 48) and len(listener.seen) >= 2
    assert len([r for r in caplog.records if "progress callback failed" in r.message]) == 1


def test_a_plain_function_listener_is_called_too() -> None:
    seen: list[int] = []

    async def run() -> None:
        await ProceduralProvider(latency_ms=80).generate(request(lambda p: seen.append(p.step), steps=2))

    asyncio.run(run())
    assert seen in ([1, 2], [2])  # the last value reaches an idle listener even as the image ends


async def test_an_immediate_listener_is_called_from_report_itself_and_its_failure_is_contained() -> None:
    seen: list[tuple[int, int, bytes | None]] = []

    @immediate
    def store(progress: Progress) -> None:
        seen.append((progress.step, progress.steps, progress.preview))

    feed = ProgressFeed(store)
    feed.report(1, 4)
    feed.preview(b"p", "image/png")
    assert seen == [(1, 4, None), (1, 4, b"p")]  # at once: no task, no turn of the loop
    assert feed._task is None
    calls = []

    @immediate
    def broken(progress: Progress) -> None:
        calls.append(progress.step)
        raise RuntimeError("listener bug")

    failing = ProgressFeed(broken)
    failing.report(1, 2)
    failing.report(2, 2)  # raised, logged once, and the provider never saw it
    assert calls == [1, 2]
    await feed.aclose()
    feed.report(2, 4)
    assert len(seen) == 2  # a closed feed delivers nothing


async def test_procedural_sends_no_previews_for_steps_too_fast_to_see() -> None:
    listener = Listener()
    await ProceduralProvider(latency_ms=200).generate(request(listener, steps=4))  # 50 ms a step
    assert [p.step for p in listener.seen][-1] == 4 and not [p for p in listener.seen if p.preview]


# -- procedural -------------------------------------------------------------------------------------
async def test_procedural_reports_each_step_with_a_sharper_preview_each_time() -> None:
    listener = Listener()
    provider = ProceduralProvider(latency_ms=600)  # 150 ms between steps: each reaches an idle listener
    started = time.monotonic()
    image = await provider.generate(request(listener))
    assert time.monotonic() - started >= 0.6
    assert listener.steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    previews = [p.preview for p in listener.seen[:3]]
    assert all(p is not None for p in previews) and listener.seen[3].preview is None  # the image itself follows
    assert [size_of(p)[0] for p in previews if p] == [16, 32, 48]
    assert {p.preview_type for p in listener.seen[:3]} == {"image/png"}
    assert image.data == (await provider.generate(request(latency_ms=0))).data  # listening changes nothing
    few = Listener()
    await provider.generate(request(few, steps=2, latency_ms=50))
    assert few.steps == [(1, 2), (2, 2)]


# -- OpenAI: streamed partial images ----------------------------------------------------------------
async def test_openai_streams_partial_images_when_the_model_allows_and_someone_listens(
        http: httpx.AsyncClient) -> None:
    with ProviderServer("openai", latency=0.3) as server:
        streaming = build_provider("openai", client=http, url=server.url, api_key=None, model="gpt-image-1",
                                   timeout=5, partial_images=2)
        listener = Listener()
        image = await streaming.generate(request(listener))
        assert size_of(image.data) == (64, 48) and image.content_type == "image/png"
        body = server.requests[-1]["json"]
        assert body["stream"] is True and body["partial_images"] == 2 and body["model"] == "gpt-image-1"
        assert listener.steps == [(1, 3), (2, 3)]
        assert [size_of(p.preview) for p in listener.seen if p.preview] == [(16, 16), (16, 16)]
        await streaming.generate(request())  # nobody listens: a plain request
        assert "stream" not in server.requests[-1]["json"]
        plain = build_provider("openai", client=http, url=server.url, api_key=None, model=None, timeout=5)
        await plain.generate(request(Listener()))  # the model does not stream: a plain request
        assert "stream" not in server.requests[-1]["json"]


async def test_openai_stream_that_ends_before_the_image_is_a_retryable_failure(http: httpx.AsyncClient) -> None:
    with ProviderServer("openai", latency=0.1) as server:
        provider = build_provider("openai", client=http, url=server.url, api_key=None, model=None, timeout=5,
                                  partial_images=3)
        server.script("cut")
        listener = Listener()
        with pytest.raises(ProviderUnavailable, match="stream ended before the image was complete") as err:
            await provider.generate(request(listener))
        assert err.value.retryable and listener.steps == [(1, 4)]
        server.script("429:1")
        with pytest.raises(Exception, match="429") as limited:
            await provider.generate(request(Listener()))
        assert type(limited.value).__name__ == "ProviderRateLimited" and limited.value.retry_after == 1.0


# -- A1111: /sdapi/v1/progress ----------------------------------------------------------------------
async def test_a1111_progress_is_polled_only_where_the_endpoint_runs_one_image_at_a_time(
        http: httpx.AsyncClient) -> None:
    with ProviderServer("automatic1111", latency=1.6) as server:
        exclusive = build_provider("automatic1111", client=http, url=server.url, api_key=None, model=None,
                                   timeout=5, exclusive=True)
        listener = Listener()
        image = await exclusive.generate(request(listener, steps=10))
        assert size_of(image.data) == (64, 48)
        assert server.progress_polls >= 2 and len(listener.seen) >= 2
        assert all(steps == 10 for _, steps in listener.steps)
        assert [s for s, _ in listener.steps] == sorted(s for s, _ in listener.steps)
        assert any(p.preview and p.preview_type == "image/png" for p in listener.seen)
        polls = server.progress_polls
        shared = build_provider("automatic1111", client=http, url=server.url, api_key=None, model=None, timeout=5)
        server.latency = 0.8
        await shared.generate(request(Listener(), steps=10))
        assert server.progress_polls == polls  # it could be someone else's image: never asked


# -- ComfyUI: the websocket -------------------------------------------------------------------------
def comfyui(server: ComfyUIServer, http: httpx.AsyncClient) -> ComfyUIProvider:
    return ComfyUIProvider(http, server.url, workflow=Workflow.load(EXAMPLE), timeout=2, poll_seconds=0.02)


async def test_comfyui_reports_progress_and_previews_from_its_socket(http: httpx.AsyncClient) -> None:
    with ComfyUIServer(run_seconds=0.8) as server:
        provider = comfyui(server, http)
        try:
            listener = Listener()
            image = await provider.generate(request(listener))
            assert size_of(image.data) == (64, 48)
            assert listener.steps and listener.steps[-1][1] == 4
            # In order, never back; a step may come twice (its progress, then its preview frame, when the
            # listener took the first before the second arrived).
            assert [s for s, _ in listener.steps] == sorted(s for s, _ in listener.steps)
            previews = [p for p in listener.seen if p.preview]
            assert previews and all(p.preview_type == "image/jpeg" and size_of(p.preview) == (8, 8)
                                    for p in previews if p.preview)
            assert server.sockets_opened == 1
            (posted,) = server.posted
            assert posted["client_id"] == provider.client_id  # the socket's clientId: ComfyUI routes by it
            await provider.generate(request(Listener()))
            assert server.sockets_opened == 1  # one socket per provider, kept between images
        finally:
            await provider.aclose()


async def test_comfyui_socket_that_drops_mid_image_loses_nothing(http: httpx.AsyncClient,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comfyui_progress, "RECONNECT_MIN_SECONDS", 0.1)
    with ComfyUIServer(run_seconds=2.4) as server:
        server.progress_steps, server.drop_socket_after = 8, 2
        provider = comfyui(server, http)
        try:
            listener = Listener()
            image = await provider.generate(request(listener))
            assert size_of(image.data) == (64, 48)  # completion comes from /history, socket or not
            steps = [s for s, _ in listener.steps]
            assert server.sockets_opened == 2 and provider.progress.connections == 2
            assert 2 in steps and any(s > 3 for s in steps), steps  # before the drop, and after the reconnect
        finally:
            await provider.aclose()


async def test_comfyui_opens_no_socket_when_nobody_listens(http: httpx.AsyncClient) -> None:
    with ComfyUIServer(run_seconds=0.05) as server:
        provider = comfyui(server, http)
        await provider.generate(request())
        await provider.aclose()
        assert server.sockets_opened == 0


async def test_comfyui_socket_that_cannot_connect_changes_nothing(http: httpx.AsyncClient) -> None:
    with ComfyUIServer(run_seconds=0.3) as server:
        provider = comfyui(server, http)
        provider.progress.url = "ws://127.0.0.1:9/ws?clientId=x"  # nothing listens there
        try:
            image = await provider.generate(request(Listener()))
            assert size_of(image.data) == (64, 48) and provider.progress.connections == 0
        finally:
            await provider.aclose()


def test_ws_url_follows_the_server_root() -> None:
    assert comfyui_progress.ws_url("http://h:8188", "c1") == "ws://h:8188/ws?clientId=c1"
    assert comfyui_progress.ws_url("https://u:p@h/comfy/", "c1") == "wss://u:p@h/comfy/ws?clientId=c1"


# -- the catalogue ------------------------------------------------------------------------------------
def test_partial_images_comes_from_the_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nname = "gpt"\nprovider = "openai"\nurl = "https://api.example/v1"\n'
                         "partial_images = 2\n")
    monkeypatch.setenv("MODELS_FILE", str(catalogue))
    assert load_catalog(Settings(jwt_secret=TEST_SECRET)).models["gpt"].partial_images == 2
    catalogue.write_text(catalogue.read_text().replace("= 2", "= 9"))
    with pytest.raises(ValueError, match="partial_images must be a whole number from 0 to 3"):
        load_catalog(Settings(jwt_secret=TEST_SECRET))
