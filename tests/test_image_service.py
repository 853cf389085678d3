"""Providers against real HTTP servers speaking their protocols; retries, backoff and the rate gate."""

from __future__ import annotations

import base64
import binascii
import email.utils
import io
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from PIL import Image

from app.harness import free_port
from app.services.image_service import ImageService
from app.services.providers.automatic1111 import Automatic1111Provider
from app.services.providers.base import ImageRequest, ProviderRejected, ProviderUnavailable
from app.services.providers.factory import build_provider
from app.services.providers.http import decode_b64
from app.services.providers.procedural import ProceduralProvider
from tests.provider_servers import ProviderServer

REQ = ImageRequest(prompt="a red fox", seed=7, width=64, height=48, negative_prompt="blurry", params={"steps": 4})


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Gate:
    def __init__(self) -> None:
        self.waits = 0
        self.deferred: list[float] = []

    async def wait(self) -> None:
        self.waits += 1

    async def defer(self, seconds: float) -> None:
        self.deferred.append(seconds)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture(params=["openai", "automatic1111"])
def server(request: pytest.FixtureRequest) -> Iterator[ProviderServer]:
    with ProviderServer(request.param, api_key="sk-test") as s:
        yield s


def service(server: ProviderServer, http: httpx.AsyncClient, **kw: object) -> tuple[ImageService, Sleeps, Gate]:
    provider = build_provider(server.kind, client=http, url=server.url, api_key="sk-test", model="m-1", timeout=2)
    sleeps, gate = Sleeps(), Gate()
    return ImageService(provider, max_retries=3, backoff_base=0.1, gate=gate, sleep=sleeps, **kw), sleeps, gate  # type: ignore[arg-type]


async def test_procedural_is_deterministic_and_varies_with_prompt_and_seed() -> None:
    p = ProceduralProvider()
    a = await p.generate(REQ)
    assert a.data == (await p.generate(REQ)).data
    assert a.data != (await p.generate(ImageRequest("a red fox", 8, 64, 48))).data
    assert a.data != (await p.generate(ImageRequest("a blue owl", 7, 64, 48))).data
    assert Image.open(io.BytesIO(a.data)).size == (64, 48) and a.content_type == "image/png"
    big = await p.generate(ImageRequest("big", 1, 512, 512))
    assert Image.open(io.BytesIO(big.data)).size == (512, 512)


async def test_procedural_latency_and_fail_param() -> None:
    p = ProceduralProvider(latency_ms=100)
    t0 = time.monotonic()
    await p.generate(REQ)
    assert time.monotonic() - t0 >= 0.1
    t0 = time.monotonic()
    await p.generate(ImageRequest("x", 1, 64, 64, params={"latency_ms": 0}))  # a request may override it
    assert time.monotonic() - t0 < 0.1
    with pytest.raises(ProviderRejected, match="policy"):
        await ProceduralProvider().generate(ImageRequest("x", 1, 64, 64, params={"fail": "policy"}))
    with pytest.raises(ProviderRejected, match="latency_ms"):
        await ProceduralProvider().generate(ImageRequest("x", 1, 64, 64, params={"latency_ms": "slow"}))


async def test_procedural_latency_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("app.services.providers.procedural.asyncio.sleep", record)
    await ProceduralProvider().generate(ImageRequest("x", 1, 64, 64, params={"latency_ms": 1e12}))
    await ProceduralProvider().generate(ImageRequest("x", 1, 64, 64, params={"latency_ms": float("nan")}))
    assert len(slept) == 1 and 59.5 < slept[0] <= 60.0, slept  # capped (less the render); NaN means none


async def test_http_provider_sends_protocol_request(server: ProviderServer, http: httpx.AsyncClient) -> None:
    svc, sleeps, gate = service(server, http)
    image = await svc.generate(REQ)
    assert Image.open(io.BytesIO(image.data)).size == (64, 48) and image.content_type == "image/png"
    (sent,) = server.requests
    assert sent["headers"]["authorization"] == "Bearer sk-test"
    body = sent["json"]
    assert body["prompt"] == "a red fox" and body["steps"] == 4
    if server.kind == "openai":
        assert sent["path"] == "/v1/images/generations"
        assert body["size"] == "64x48" and body["response_format"] == "b64_json" and body["model"] == "m-1"
        assert body["n"] == 1 and "negative_prompt" not in body  # not part of the OpenAI API
    else:
        assert sent["path"] == "/sdapi/v1/txt2img"
        assert (body["seed"], body["width"], body["height"]) == (7, 64, 48)
        assert body["negative_prompt"] == "blurry"
        assert body["override_settings"] == {"sd_model_checkpoint": "m-1"}
    assert sleeps.delays == [] and gate.waits == 1


async def test_params_cannot_override_the_request_or_the_operator(server: ProviderServer,
                                                                  http: httpx.AsyncClient) -> None:
    svc, _, _ = service(server, http)
    sneaky = {"n": 8, "batch_size": 8, "n_iter": 8, "size": "4096x4096", "width": 4096, "height": 4096,
              "model": "expensive", "override_settings": {"sd_model_checkpoint": "other"}, "prompt": "else",
              "seed": 1, "steps": 4}
    await svc.generate(ImageRequest("a red fox", 7, 64, 48, params=sneaky, model="m-1"))
    body = server.requests[-1]["json"]
    assert body["prompt"] == "a red fox" and body["steps"] == 4
    if server.kind == "openai":
        assert (body["n"], body["size"], body["model"]) == (1, "64x48", "m-1")
    else:
        assert (body["batch_size"], body["n_iter"], body["width"], body["height"], body["seed"]) == (1, 1, 64, 48, 7)
        assert body["override_settings"] == {"sd_model_checkpoint": "m-1"}


async def test_a1111_second_passes_scripts_and_infotext_never_reach_the_server(http: httpx.AsyncClient) -> None:
    with ProviderServer("automatic1111") as server:
        provider = build_provider("automatic1111", client=http, url=server.url, api_key=None, model="m-1", timeout=5)
        sneaky = {"enable_hr": True, "hr_scale": 8, "hr_resize_x": 8192, "hr_resize_y": 8192,
                  "hr_checkpoint_name": "other", "refiner_checkpoint": "other", "refiner_switch_at": 0.5,
                  "alwayson_scripts": {"x": {"args": []}}, "infotext": "Size: 8192x8192, Model: other",
                  "firstphase_width": 8192, "steps": 4}
        await provider.generate(ImageRequest("a red fox", 7, 64, 48, params=sneaky))
    body = server.requests[-1]["json"]
    assert body["steps"] == 4 and (body["width"], body["height"]) == (64, 48)
    assert not set(sneaky) - {"steps"} & set(body), sorted(body)


async def test_client_error_fails_at_once_with_provider_message(server: ProviderServer,
                                                                 http: httpx.AsyncClient) -> None:
    svc, sleeps, _ = service(server, http)
    server.script("400:Your prompt was rejected by the safety system")
    with pytest.raises(ProviderRejected) as err:
        await svc.generate(REQ)
    assert "400 Your prompt was rejected by the safety system" in err.value.message
    assert len(server.requests) == 1 and sleeps.delays == []


async def test_server_errors_are_retried(server: ProviderServer, http: httpx.AsyncClient) -> None:
    svc, sleeps, _ = service(server, http)
    server.script("500", "503", "ok")
    await svc.generate(REQ)
    assert len(server.requests) == 3 and len(sleeps.delays) == 2
    assert all(0 <= d <= 0.1 * 2**i for i, d in enumerate(sleeps.delays))


async def test_rate_limit_honours_retry_after_and_slows_everyone(server: ProviderServer,
                                                                 http: httpx.AsyncClient) -> None:
    svc, sleeps, gate = service(server, http)
    server.script("429:2", "ok")
    await svc.generate(REQ)
    assert sleeps.delays[0] >= 2 and gate.deferred and gate.deferred[0] >= 2
    assert gate.waits == 2  # the gate is consulted before every attempt


async def test_retry_after_as_http_date_is_honoured(server: ProviderServer, http: httpx.AsyncClient) -> None:
    svc, sleeps, gate = service(server, http)
    server.script("429:" + email.utils.formatdate(time.time() + 5, usegmt=True))
    await svc.generate(REQ)
    assert 3 <= sleeps.delays[0] <= 6 and gate.deferred == sleeps.delays


async def test_retry_budget_exhausted_reports_attempts(server: ProviderServer, http: httpx.AsyncClient) -> None:
    svc, _, _ = service(server, http)
    server.script("500", "500", "500", "500", "500")
    with pytest.raises(ProviderUnavailable, match=r"after 4 attempts: .*500 The server had an error") as err:
        await svc.generate(REQ)
    assert len(server.requests) == 4 and err.value.retryable  # the caller may still requeue it later


async def test_unreachable_and_hanging_servers(http: httpx.AsyncClient) -> None:
    closed = build_provider("openai", client=http, url=f"http://127.0.0.1:{free_port()}/v1", api_key=None,
                            model=None, timeout=1)
    sleeps = Sleeps()
    svc = ImageService(closed, max_retries=1, sleep=sleeps)
    with pytest.raises(ProviderUnavailable, match=r"after 2 attempts: openai: cannot connect to http://127\.0\.0\.1"):
        await svc.generate(REQ)
    assert len(sleeps.delays) == 1
    with ProviderServer("automatic1111") as server:
        server.script("hang")
        slow = build_provider("automatic1111", client=http, url=server.url, api_key=None, model=None, timeout=0.5)
        with pytest.raises(ProviderUnavailable, match="timed out"):
            await ImageService(slow, max_retries=0).generate(REQ)


async def test_answer_without_image_is_rejected(server: ProviderServer, http: httpx.AsyncClient) -> None:
    svc, _, _ = service(server, http)
    server.script("garbage")
    with pytest.raises(ProviderRejected, match="no image"):
        await svc.generate(REQ)


async def test_wrong_key_is_a_clear_401(http: httpx.AsyncClient) -> None:
    with ProviderServer("openai", api_key="right") as server:
        provider = build_provider("openai", client=http, url=server.url, api_key="wrong", model=None, timeout=2)
        with pytest.raises(ProviderRejected, match="401 Incorrect API key"):
            await ImageService(provider).generate(REQ)


async def test_error_messages_never_show_the_key(http: httpx.AsyncClient) -> None:
    with ProviderServer("openai") as server:
        server.script("400:Incorrect API key provided: sk-secret-123")
        provider = build_provider("openai", client=http, url=server.url, api_key="sk-secret-123", model=None,
                                  timeout=2)
        with pytest.raises(ProviderRejected) as err:
            await provider.generate(REQ)
    assert "sk-secret-123" not in err.value.message and "Incorrect API key provided: ***" in err.value.message
    closed = build_provider("automatic1111", client=http, url=f"http://user:hunter2@127.0.0.1:{free_port()}",
                            api_key=None, model=None, timeout=1)
    with pytest.raises(ProviderUnavailable) as err:
        await closed.generate(REQ)
    assert "hunter2" not in err.value.message


async def test_a1111_interrupt_only_when_enabled(http: httpx.AsyncClient) -> None:
    with ProviderServer("automatic1111") as server:
        default = ImageService(build_provider("automatic1111", client=http, url=server.url, api_key=None,
                                              model=None, timeout=2))
        await default.interrupt(REQ)
        assert server.interrupts == 0
        # Only safe when the server runs one job at a time for this worker: it stops whatever is running.
        enabled = Automatic1111Provider(http, server.url, api_key=None, model=None, timeout=2,
                                        interrupt_on_cancel=True)
        await ImageService(enabled).interrupt(REQ)
        assert server.interrupts == 1
    await enabled.interrupt(REQ)  # server gone: best effort, no error


def test_build_provider_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="IMAGE_PROVIDER_URL"):
        build_provider("openai", client=None, url=None, api_key=None, model=None, timeout=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known"):
        build_provider("dalle9", client=None, url="http://x", api_key=None, model=None, timeout=1)  # type: ignore[arg-type]


async def test_base64_images_are_checked_strictly() -> None:
    assert await decode_b64("aGVsbG8=") == b"hello"
    assert await decode_b64("data:image/png;base64,aGVsbG8=") == b"hello"
    for bad in ("aGVs bG8=", "aGVsbG8", "aGVsbG8===", "!!!!", "aGVs\nbG8=", "aGVsbG8=\u00e9", "aGVsbG8=aGVs"):
        with pytest.raises(binascii.Error):
            await decode_b64(bad)
    # A 1024x1024 PNG's size: decoded whole, and one wrong character anywhere still fails it.
    raw = bytes(range(256)) * 10_000
    text = base64.b64encode(raw).decode()
    assert await decode_b64(text) == raw
    with pytest.raises(binascii.Error):
        await decode_b64(text[:1_000_000] + "*" + text[1_000_001:])
