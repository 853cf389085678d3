"""ComfyUI provider against a server speaking its protocol; several endpoints with failover and caps."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.core.config import Settings
from app.harness import ROOT, free_port
from app.services.image_service import ImageService
from app.services.models import EndpointSpec, ModelConfig, load_catalog, parse_endpoint
from app.services.providers import comfyui
from app.services.providers.base import ImageRequest, ProviderRateLimited, ProviderRejected, ProviderUnavailable
from app.services.providers.comfyui import ComfyUIProvider
from app.services.providers.comfyui_workflow import Workflow, WorkflowError
from app.services.providers.factory import build_model_provider, build_provider
from app.services.providers.failover import Endpoint, FailoverProvider
from tests.comfyui_server import ComfyUIServer
from tests.provider_servers import ProviderServer
from tests.utils import TEST_SECRET, MakeStack, assert_counts_consistent, auth, new_user, wait_status, wait_until

EXAMPLE = ROOT / "examples" / "comfyui" / "txt2img-api.json"
REQ = ImageRequest(prompt="a red fox", seed=7, width=64, height=48, negative_prompt="blurry", request_id="q1:0")


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def server() -> Iterator[ComfyUIServer]:
    with ComfyUIServer(run_seconds=0.05) as s:
        yield s


def provider(server: ComfyUIServer | str, http: httpx.AsyncClient, **kw: Any) -> ComfyUIProvider:
    url = server if isinstance(server, str) else server.url
    kw.setdefault("timeout", 2)
    kw.setdefault("poll_seconds", 0.02)
    return ComfyUIProvider(http, url, workflow=Workflow.load(EXAMPLE), **kw)


def request(index: int = 0, **kw: Any) -> ImageRequest:
    return ImageRequest(**{"prompt": f"prompt {index}", "seed": 100 + index, "width": 64, "height": 64,
                           "request_id": f"q:{index}", **kw})


def settings(**kw: Any) -> Settings:
    return Settings(jwt_secret=TEST_SECRET, provider_timeout_seconds=2, comfyui_poll_seconds=0.02, **kw)


async def foreign_prompt(server: ComfyUIServer, step: str = "slow") -> str:
    """Another client's prompt on the same server."""
    server.script(step)
    graph = json.loads(EXAMPLE.read_text().replace('"{{seed}}"', "1").replace('"{{width}}"', "64")
                       .replace('"{{height}}"', "64"))
    async with httpx.AsyncClient() as other:
        r = await other.post(server.url + "/prompt", json={"prompt": graph, "client_id": "someone-else"})
    return str(r.json()["prompt_id"])


async def started(server: ComfyUIServer, state: str, count: int = 1) -> list[str]:
    """Waits until `count` prompts of ours (not someone-else's) are in `state`."""
    for _ in range(200):
        mine = [pid for pid, p in server.prompts.items() if p["client_id"] != "someone-else"
                and server.state(pid) == state]
        if len(mine) >= count:
            return mine
        await asyncio.sleep(0.02)
    raise AssertionError(f"no prompt reached {state}: {server.prompts}")


# -- workflow ---------------------------------------------------------------------------------------
def test_placeholders_become_typed_values_and_fields_are_set() -> None:
    graph = json.loads(EXAMPLE.read_text())
    graph["6"]["inputs"]["text"] = "a photo of {{prompt}}, seed {{seed}}"
    graph["3"]["inputs"]["steps"] = 20
    wf = Workflow.from_graph(graph, {"steps": "3.inputs.steps"})
    assert wf.names() == {"prompt", "negative_prompt", "seed", "width", "height", "steps"}
    out = wf.render({"prompt": "fox", "negative_prompt": "", "seed": 42, "width": 512, "height": 768, "steps": 8})
    assert out["3"]["inputs"]["seed"] == 42 and out["5"]["inputs"]["width"] == 512
    assert out["5"]["inputs"]["height"] == 768 and out["3"]["inputs"]["steps"] == 8
    assert out["6"]["inputs"]["text"] == "a photo of fox, seed 42"
    assert out["3"]["inputs"]["model"] == ["4", 0]  # links untouched
    assert graph["5"]["inputs"]["width"] == "{{width}}"  # the template is not modified


def test_explicit_fields_without_placeholders() -> None:
    graph = json.loads(EXAMPLE.read_text())
    graph["6"]["inputs"]["text"], graph["3"]["inputs"]["seed"] = "placeholder-free", 0
    wf = Workflow.from_graph(graph, {"prompt": "6.inputs.text", "seed": "3.seed"})
    out = wf.render({"prompt": "owl", "seed": 9, "negative_prompt": "", "width": 64, "height": 64})
    assert out["6"]["inputs"]["text"] == "owl" and out["3"]["inputs"]["seed"] == 9


def test_unusable_workflows_are_refused_with_reasons(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="Save \\(API Format\\)"):
        Workflow.from_graph({"nodes": [], "links": [], "version": 0.4})
    graph = json.loads(EXAMPLE.read_text())
    graph["6"]["inputs"]["text"] = "fixed"
    with pytest.raises(WorkflowError, match="nothing receives the prompt"):
        Workflow.from_graph(graph)
    with pytest.raises(WorkflowError, match="no node '60'"):
        Workflow.from_graph(graph, {"prompt": "60.inputs.text"})
    with pytest.raises(WorkflowError, match=r"has no input 'txt'.*text"):
        Workflow.from_graph(graph, {"prompt": "6.inputs.txt"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WorkflowError, match="not JSON"):
        Workflow.load(bad)


# -- the provider -------------------------------------------------------------------------------------
async def test_generates_through_prompt_history_view(server: ComfyUIServer, http: httpx.AsyncClient) -> None:
    p = provider(server, http, model="ignored-by-this-workflow")
    image = await p.generate(REQ)
    assert image.content_type == "image/png"
    assert Image.open(io.BytesIO(image.data)).size == (64, 48)
    (pid, sent), = server.prompts.items()
    graph = sent["prompt"]
    assert graph["6"]["inputs"]["text"] == "a red fox" and graph["7"]["inputs"]["text"] == "blurry"
    assert graph["3"]["inputs"]["seed"] == 7 and isinstance(graph["5"]["inputs"]["width"], int)
    assert sent["client_id"] == p.client_id
    assert ("GET", "/view") in server.requests and ("GET", f"/history/{pid}") in server.requests
    assert p._prompts == {}  # nothing left behind


async def test_history_that_shows_completion_late_is_polled_until_done(server: ComfyUIServer,
                                                                      http: httpx.AsyncClient) -> None:
    server.script("lag:4")
    await provider(server, http).generate(REQ)
    (pid,) = server.prompts
    assert server.requests.count(("GET", f"/history/{pid}")) >= 5


async def test_validation_error_names_node_and_is_not_retried(server: ComfyUIServer,
                                                              http: httpx.AsyncClient) -> None:
    server.script("invalid")
    sleeps = Sleeps()
    with pytest.raises(ProviderRejected) as err:
        await ImageService(provider(server, http), max_retries=3, sleep=sleeps).generate(REQ)
    message = err.value.message
    assert message.startswith("comfyui: workflow rejected (400)")
    assert "node 4 (CheckpointLoaderSimple)" in message and "Value not in list" in message
    assert "missing.safetensors" in message and "Prompt outputs failed validation" in message
    assert server.requests.count(("POST", "/prompt")) == 1 and sleeps.delays == []


async def test_execution_error_in_history_is_a_clear_failure(server: ComfyUIServer,
                                                             http: httpx.AsyncClient) -> None:
    server.script("exec_error")
    with pytest.raises(ProviderRejected) as err:
        await ImageService(provider(server, http), max_retries=3, sleep=Sleeps()).generate(REQ)
    assert err.value.message == ("comfyui: node 3 (KSampler) failed: torch.OutOfMemoryError: "
                                 "Allocation on device 0 would exceed allowed memory.")


async def test_server_errors_and_unreachable_servers_are_retryable(server: ComfyUIServer,
                                                                   http: httpx.AsyncClient) -> None:
    server.script("500", "500")
    sleeps = Sleeps()
    image = await ImageService(provider(server, http), max_retries=3, backoff_base=0.1, sleep=sleeps).generate(REQ)
    assert image.data and len(sleeps.delays) == 2
    with pytest.raises(ProviderUnavailable) as err:
        await provider(f"http://127.0.0.1:{free_port()}", http).generate(REQ)
    assert err.value.retryable and "cannot connect" in err.value.message


async def test_missing_value_for_a_placeholder_is_rejected(server: ComfyUIServer, http: httpx.AsyncClient,
                                                           tmp_path: Path) -> None:
    graph = json.loads(EXAMPLE.read_text())
    graph["3"]["inputs"]["steps"] = "{{steps}}"
    p = ComfyUIProvider(http, server.url, workflow=Workflow.from_graph(graph), timeout=2, poll_seconds=0.02)
    with pytest.raises(ProviderRejected, match="asks for steps"):
        await p.generate(REQ)
    await p.generate(request(params={"steps": 4}))
    assert next(iter(server.prompts.values()))["prompt"]["3"]["inputs"]["steps"] == 4


async def test_cancel_deletes_our_pending_prompt_and_leaves_the_running_one(http: httpx.AsyncClient) -> None:
    # An older server: /interrupt stops whatever runs, so only a /queue check keeps others safe.
    with ComfyUIServer(legacy_interrupt=True) as server:
        theirs = await foreign_prompt(server)
        p = provider(server, http)
        task = asyncio.create_task(p.generate(REQ))
        (ours,) = await started(server, "pending")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await p.interrupt(REQ)
        assert server.deleted == [ours] and server.interrupted == []
        assert server.state(ours) == "deleted" and server.state(theirs) == "running"
        await p.interrupt(REQ)  # a second cancel finds nothing to do
        assert server.deleted == [ours]


async def test_cancel_interrupts_our_running_prompt_only(http: httpx.AsyncClient) -> None:
    with ComfyUIServer(legacy_interrupt=True) as server:
        p = provider(server, http)
        server.script("slow")
        task = asyncio.create_task(p.generate(REQ))
        (ours,) = await started(server, "running")
        theirs = await foreign_prompt(server, "ok")
        assert server.state(theirs) == "pending"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await p.interrupt(REQ)
        assert server.interrupted == [ours]
        assert server.prompts[ours]["history"]["status"]["status_str"] == "error"
        wait_until(lambda: server.state(theirs) == "done", 5, what="the other prompt to run")
        # A cancel that comes after our prompt finished must not stop someone else's.
        server.script("ok")
        await p.generate(REQ)
        theirs2 = await foreign_prompt(server)
        await started_foreign(server, theirs2)
        await p.interrupt(REQ)
        assert server.interrupted == [ours] and server.state(theirs2) == "running"


async def started_foreign(server: ComfyUIServer, pid: str) -> None:
    for _ in range(200):
        if server.state(pid) == "running":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{pid} never ran")


async def test_interrupt_sends_prompt_id_to_newer_servers(server: ComfyUIServer, http: httpx.AsyncClient) -> None:
    p = provider(server, http)
    server.script("slow")
    task = asyncio.create_task(p.generate(REQ))
    (ours,) = await started(server, "running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.interrupt(REQ)
    assert server.interrupted == [ours] and ("POST", "/interrupt") in server.requests


async def test_prompt_timeout_gives_up_and_removes_the_prompt(server: ComfyUIServer,
                                                              http: httpx.AsyncClient) -> None:
    server.script("slow")
    with pytest.raises(ProviderUnavailable, match=r"did not finish within 0\.3s") as err:
        await provider(server, http, prompt_timeout=0.3).generate(REQ)
    assert err.value.retryable
    (pid,) = server.prompts
    assert server.interrupted == [pid]


async def test_prompt_lost_by_the_server_is_retryable(server: ComfyUIServer, http: httpx.AsyncClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comfyui, "QUEUE_CHECK_SECONDS", 0.1)
    server.script("lose")
    with pytest.raises(ProviderUnavailable, match="neither queued nor finished") as err:
        await provider(server, http).generate(REQ)
    assert err.value.retryable


def test_comfyui_needs_a_workflow_and_a_url() -> None:
    model = ModelConfig(name="m", provider="comfyui", urls=("http://127.0.0.1:1",))
    with pytest.raises(ValueError, match="needs a workflow"):
        build_model_provider(model, client=None, settings=settings())  # type: ignore[arg-type]
    model = ModelConfig(name="m", provider="comfyui", workflow=str(EXAMPLE))
    with pytest.raises(ValueError, match="IMAGE_PROVIDER_URL"):
        build_model_provider(model, client=None, settings=settings())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a workflow"):
        build_provider("comfyui", client=None, url="http://x", api_key=None, model=None, timeout=1)  # type: ignore[arg-type]


# -- configuration ------------------------------------------------------------------------------------
def test_endpoint_specs() -> None:
    assert parse_endpoint("http://h:8188", "comfyui") == EndpointSpec("comfyui", "http://h:8188", 0)
    assert parse_endpoint(" openai+https://api.example/v1#max=3 ", "comfyui") == EndpointSpec(
        "openai", "https://api.example/v1", 3)
    assert parse_endpoint("http://u:p@h/x#max_concurrency=2", "automatic1111").max_concurrency == 2
    with pytest.raises(ValueError, match="unknown provider kind 'dalle'"):
        parse_endpoint("dalle+http://h", "openai")
    with pytest.raises(ValueError, match="unknown option"):
        parse_endpoint("http://h#cap=2", "openai")
    with pytest.raises(ValueError, match="not a URL"):
        parse_endpoint("h:8188", "openai")


def test_catalogue_and_environment_configure_comfyui_endpoints(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flows").mkdir()
    catalogue = tmp_path / "models.toml"
    catalogue.write_text("""
[[models]]
name = "sd15"
provider = "comfyui"
workflow = "flows/txt2img.json"
fields = {seed = "3.inputs.seed"}
output_node = "9"
urls = ["http://gpu1:8188#max=2", {url = "http://gpu2:8188", max_concurrency = 1},
        {url = "https://api.example/v1", kind = "openai"}]
""")
    monkeypatch.setenv("MODELS_FILE", str(catalogue))
    model = load_catalog(settings()).models["sd15"]
    assert model.workflow == str(tmp_path / "flows" / "txt2img.json")
    assert model.fields == {"seed": "3.inputs.seed"} and model.output_node == "9"
    assert model.endpoints == (EndpointSpec("comfyui", "http://gpu1:8188", 2),
                               EndpointSpec("comfyui", "http://gpu2:8188", 1),
                               EndpointSpec("openai", "https://api.example/v1", 0))
    monkeypatch.delenv("MODELS_FILE")
    env = settings(image_provider="comfyui", image_provider_url="http://a:1",
                   image_provider_urls="http://b:2#max=1, openai+http://c/v1", comfyui_workflow=str(EXAMPLE),
                   comfyui_fields="seed=3.inputs.seed,prompt=6.inputs.text")
    model = load_catalog(env).resolve(None)
    assert model is not None
    assert [e.url for e in model.endpoints] == ["http://a:1", "http://b:2", "http://c/v1"]
    assert model.fields == {"seed": "3.inputs.seed", "prompt": "6.inputs.text"}


# -- several endpoints ----------------------------------------------------------------------------------
async def test_all_images_succeed_when_one_endpoint_is_down(server: ComfyUIServer, http: httpx.AsyncClient) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    model = ModelConfig(name="m", provider="comfyui", urls=(dead, server.url), workflow=str(EXAMPLE))
    failover = build_model_provider(model, client=http, settings=settings(provider_failure_threshold=2))
    assert isinstance(failover, FailoverProvider)
    service = ImageService(failover, max_retries=2, sleep=Sleeps())
    images = [await service.generate(request(i)) for i in range(6)]
    assert all(img.data for img in images) and len(server.prompts) == 6
    down, up = failover.endpoints
    assert down.failures == 2 and down.served == 0 and up.served == 6


async def test_failing_endpoint_is_skipped_during_its_cool_down(http: httpx.AsyncClient) -> None:
    clock = Clock()
    with ComfyUIServer() as bad, ComfyUIServer() as good:
        bad.fail_all = True
        endpoints = [Endpoint(provider(s, http), s.url) for s in (bad, good)]
        failover = FailoverProvider(endpoints, failure_threshold=3, cooldown=30, clock=clock)
        for i in range(10):
            await failover.generate(request(i))
        posts = lambda s: s.requests.count(("POST", "/prompt"))  # noqa: E731
        assert posts(bad) == 3 and posts(good) == 10
        clock.now += 29
        await failover.generate(request(10))
        assert posts(bad) == 3  # still resting
        clock.now += 2
        await failover.generate(request(11))
        assert posts(bad) == 4  # one trial after the cool-down; it failed, so it rests again
        await failover.generate(request(12))
        assert posts(bad) == 4
        bad.fail_all = False
        clock.now += 31
        for i in range(13, 17):
            await failover.generate(request(i))
        assert posts(bad) == 6 and endpoints[0].failures == 0  # a good trial, then back in rotation


async def test_all_endpoints_down_is_retryable_with_the_first_return_time(http: httpx.AsyncClient) -> None:
    clock = Clock()
    dead = [Endpoint(provider(f"http://127.0.0.1:{free_port()}", http), f"e{i}") for i in range(2)]
    failover = FailoverProvider(dead, failure_threshold=1, cooldown=30, clock=clock)
    with pytest.raises(ProviderUnavailable) as first:
        await failover.generate(REQ)
    assert "e0: comfyui: cannot connect" in first.value.message and "; e1: " in first.value.message
    clock.now += 10
    with pytest.raises(ProviderUnavailable, match="all 2 endpoints are cooling down") as resting:
        await failover.generate(REQ)
    assert resting.value.retryable and resting.value.retry_after == pytest.approx(20)


async def test_rate_limited_endpoint_rests_for_retry_after(http: httpx.AsyncClient) -> None:
    clock = Clock()
    with ProviderServer("openai") as busy, ProviderServer("openai") as free:
        busy.script("429:5")
        endpoints = [Endpoint(build_provider("openai", client=http, url=s.url, api_key=None, model=None,
                                             timeout=2), s.url) for s in (busy, free)]
        failover = FailoverProvider(endpoints, clock=clock)
        for i in range(4):
            await failover.generate(request(i))
        assert len(busy.requests) == 1 and len(free.requests) == 4 and endpoints[0].failures == 0
        clock.now += 6
        for i in range(4):
            await failover.generate(request(i))
        assert len(busy.requests) > 1
        busy.script("429:2")
        free.script("429:7")
        with pytest.raises(ProviderRateLimited) as err:
            await failover.generate(REQ)
        assert err.value.retry_after == 2


async def test_each_endpoint_cap_holds(http: httpx.AsyncClient) -> None:
    with ProviderServer("openai", latency=0.1) as a, ProviderServer("automatic1111", latency=0.1) as b:
        model = ModelConfig(name="m", provider="openai", urls=(f"{a.url}#max=2", f"automatic1111+{b.url}#max=1"))
        failover = build_model_provider(model, client=http, settings=settings())
        images = await asyncio.gather(*(failover.generate(request(i)) for i in range(12)))
        assert len(images) == 12
        assert a.max_in_flight == 2 and b.max_in_flight == 1
        assert len(a.requests) + len(b.requests) == 12 and len(b.requests) >= 2


async def test_cancel_reaches_the_endpoint_that_runs_the_image(http: httpx.AsyncClient) -> None:
    with ComfyUIServer() as one, ComfyUIServer() as two:
        endpoints = [Endpoint(provider(s, http), s.url, 1) for s in (one, two)]
        failover = FailoverProvider(endpoints)
        one.script("slow")
        two.script("slow")
        a, b = request(1), request(2)
        tasks = [asyncio.create_task(failover.generate(r)) for r in (a, b)]
        await asyncio.sleep(0.3)
        assert {p["state"] for s in (one, two) for p in s.prompts.values()} == {"running"}
        tasks[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        await failover.interrupt(b)
        stopped = [s for s in (one, two) if s.interrupted]
        assert len(stopped) == 1 and len(stopped[0].interrupted) == 1
        tasks[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        await failover.interrupt(a)
        assert one.interrupted and two.interrupted


# -- end to end ---------------------------------------------------------------------------------------
@pytest.fixture
def comfy_stack(make_stack: MakeStack) -> Iterator[tuple[ComfyUIServer, httpx.Client]]:
    with ComfyUIServer(run_seconds=0.05) as server:
        dead = f"http://127.0.0.1:{free_port()}"
        stack = make_stack(IMAGE_PROVIDER="comfyui", IMAGE_MODEL="sd15", COMFYUI_WORKFLOW=str(EXAMPLE),
                           IMAGE_PROVIDER_URLS=f"{dead},{server.url}#max=2", COMFYUI_POLL_SECONDS="0.05",
                           PROVIDER_COOLDOWN_SECONDS="60")
        with stack.client() as client:
            yield server, client
        stack.stop()  # before its provider goes


def test_batch_and_cancel_through_api_and_worker(comfy_stack: tuple[ComfyUIServer, httpx.Client]) -> None:
    server, client = comfy_stack
    headers = auth(new_user())
    server.script("invalid")
    r = client.post("/create-queue", headers=headers, json={"prompts": ["a fox", "an owl"], "count": 3,
                                                           "width": 64, "height": 64, "seed": 10})
    assert r.status_code == 201, r.text
    done = wait_status(client, headers, r.json()["queue_id"], {"completed"})
    assert done["succeeded"] == 5 and done["failed"] == 1
    assert_counts_consistent(done)
    (failed,) = [i for i in done["images"] if i["status"] == "failed"]
    assert "node 4 (CheckpointLoaderSimple)" in failed["error"] and "Value not in list" in failed["error"]
    ok = next(i for i in done["images"] if i["status"] == "succeeded")
    assert Image.open(io.BytesIO(client.get(ok["url"]).content)).size == (64, 64)
    seeds = sorted(body["prompt"]["3"]["inputs"]["seed"] for body in server.posted)
    assert seeds == [10, 11, 12, 13, 14, 15]

    server.script("slow", "slow", "slow")
    qid = client.post("/create-queue", headers=headers, json={"prompts": ["slow"], "count": 3, "width": 64,
                                                              "height": 64}).json()["queue_id"]
    wait_until(lambda: sum(server.state(p) == "running" for p in server.prompts) == 1
               and sum(server.state(p) == "pending" for p in server.prompts) == 1, 20, what="a running prompt")
    assert client.post(f"/cancel-queue/{qid}", headers=headers).status_code == 200
    wait_status(client, headers, qid, {"cancelled"})
    wait_until(lambda: server.interrupted and not [p for p in server.prompts if server.state(p) in
                                                   ("running", "pending")], 10, what="cancel on ComfyUI")
    assert len(server.posted) == 8  # 6 + 2: the third slow image never reached ComfyUI, its cap is 2
