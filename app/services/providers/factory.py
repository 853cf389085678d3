"""A model's provider from its catalogue entry: one endpoint, or several behind a FailoverProvider."""

from __future__ import annotations

import httpx

from app.core.config import Settings
from app.services.models import EndpointSpec, ModelConfig
from app.services.providers.automatic1111 import Automatic1111Provider
from app.services.providers.base import ImageProvider, ProviderKind
from app.services.providers.comfyui import ComfyUIProvider
from app.services.providers.comfyui_workflow import Workflow
from app.services.providers.failover import Endpoint, FailoverProvider
from app.services.providers.openai import OpenAIProvider
from app.services.providers.procedural import ProceduralProvider


def build_provider(
    kind: str,
    *,
    client: httpx.AsyncClient,
    url: str | None,
    api_key: str | None,
    model: str | None,
    timeout: float,
    procedural_latency_ms: float = 0.0,
    partial_images: int = 0,
    exclusive: bool = False,
) -> ImageProvider:
    """The provider of `kind`, sharing `client` for its HTTP calls (ComfyUI, which needs a workflow,
    is built by build_model_provider). `partial_images`: openai streams that many previews per image;
    `exclusive`: the endpoint serves one image of ours at a time (A1111 then reports progress)."""
    kind = ProviderKind.parse(kind)
    if kind == ProviderKind.PROCEDURAL:
        return ProceduralProvider(procedural_latency_ms)
    if kind == ProviderKind.COMFYUI:
        raise ValueError("provider 'comfyui' needs a workflow: build it with providers.build_model_provider")
    if not url:
        raise ValueError(f"provider {kind.value!r} needs IMAGE_PROVIDER_URL (or a url in the model catalogue)")
    if kind == ProviderKind.OPENAI:
        return OpenAIProvider(client, url, api_key=api_key, model=model, timeout=timeout, partial_images=partial_images)
    return Automatic1111Provider(client, url, api_key=api_key, model=model, timeout=timeout, exclusive=exclusive)


def build_model_provider(model: ModelConfig, *, client: httpx.AsyncClient, settings: Settings) -> ImageProvider:
    """The provider serving `model`, sharing `client`; a FailoverProvider when it has several endpoints or caps."""
    specs = model.endpoints or (EndpointSpec(model.provider, ""),)
    workflow: Workflow | None = None
    if any(spec.kind == ProviderKind.COMFYUI for spec in specs):
        if not model.workflow:
            raise ValueError(
                f"model {model.name!r}: comfyui needs a workflow (COMFYUI_WORKFLOW, or workflow = in the catalogue)"
            )
        workflow = Workflow.load(model.workflow, model.fields)
    endpoints = [
        Endpoint(_one(spec, model, client, settings, workflow), _shown(spec.url), spec.max_concurrency)
        for spec in specs
    ]
    if len(endpoints) == 1 and not endpoints[0].max_concurrency:
        return endpoints[0].provider
    return FailoverProvider(
        endpoints,
        failure_threshold=settings.provider_failure_threshold,
        cooldown=settings.provider_cooldown_seconds,
    )


def _one(
    spec: EndpointSpec, model: ModelConfig, client: httpx.AsyncClient, settings: Settings, workflow: Workflow | None
) -> ImageProvider:
    if spec.kind == ProviderKind.COMFYUI:
        assert workflow is not None
        if not spec.url:
            raise ValueError(f"model {model.name!r}: comfyui needs IMAGE_PROVIDER_URL (or a url in the catalogue)")
        return ComfyUIProvider(
            client,
            spec.url,
            workflow=workflow,
            api_key=model.api_key,
            model=model.provider_model,
            timeout=settings.provider_timeout_seconds,
            output_node=model.output_node,
            poll_seconds=settings.comfyui_poll_seconds,
            prompt_timeout=settings.comfyui_prompt_timeout_seconds,
        )
    return build_provider(
        spec.kind,
        client=client,
        url=spec.url or None,
        api_key=model.api_key,
        model=model.provider_model,
        timeout=settings.provider_timeout_seconds,
        procedural_latency_ms=model.latency_ms,
        partial_images=model.partial_images,
        # The model's cap holds across all workers; an endpoint's #max within one worker process.
        exclusive=model.max_concurrency == 1 or spec.max_concurrency == 1,
    )


def _shown(url: str) -> str:
    """The address for messages, without credentials."""
    return str(httpx.URL(url).copy_with(userinfo=b"")) if url else "built-in"
