"""The worker's sharded HTTP transport: requests spread over its small pools and give their place back."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.harness import free_port
from app.services.providers.base import ImageRequest
from app.services.providers.openai import OpenAIProvider
from app.services.providers.transport import ShardedTransport, provider_client
from tests.provider_servers import ProviderServer


async def test_requests_spread_over_shards_and_every_place_is_given_back() -> None:
    with ProviderServer("openai", latency=0.2) as server:
        transport = ShardedTransport(8, per_shard=2)
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            provider = OpenAIProvider(client, server.url, api_key=None, model=None, timeout=10)
            images = await asyncio.gather(*(
                provider.generate(ImageRequest(prompt="a fox", seed=i, width=8, height=8)) for i in range(8)))
            assert [image.content_type for image in images] == ["image/png"] * 8
            assert server.max_in_flight == 8  # four shards of two: all at once
            assert transport.in_flight == [0, 0, 0, 0]


async def test_a_streamed_answer_closed_unread_and_a_failed_request_give_their_place_back() -> None:
    with ProviderServer("openai") as server:
        transport = ShardedTransport(2, per_shard=1)
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            request = client.build_request("POST", server.url + "/images/generations", json={"prompt": "a fox"})
            response = await client.send(request, stream=True)
            assert response.status_code == 200 and transport.in_flight == [1, 0]
            await response.aclose()
            assert transport.in_flight == [0, 0]
            try:
                await client.get(f"http://127.0.0.1:{free_port()}/")
            except httpx.ConnectError:
                pass
            else:
                raise AssertionError("nothing listens there")
            assert transport.in_flight == [0, 0]


async def test_the_sharded_transport_gives_way_to_a_proxy_but_not_to_a_lone_no_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "NO_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    client = provider_client(8, timeout=5)
    assert isinstance(client._transport, ShardedTransport)
    await client.aclose()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    client = provider_client(8, timeout=5)
    assert not isinstance(client._transport, ShardedTransport)
    assert any(key.pattern.startswith("https") for key in client._mounts)  # httpx routes https through it
    await client.aclose()
