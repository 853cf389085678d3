"""The worker's sharded HTTP transport: requests spread over its small pools and give their place back."""

from __future__ import annotations

import asyncio

import httpx

from app.harness import free_port
from app.services.providers.base import ImageRequest
from app.services.providers.openai import OpenAIProvider
from app.services.providers.transport import ShardedTransport
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
