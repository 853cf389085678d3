"""The model catalogue: which models exist, their provider, endpoint and caps."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.config import Settings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PROVIDER_KINDS = ("procedural", "openai", "automatic1111")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One servable model: a provider kind, its endpoint(s), and how hard it may be driven."""

    name: str
    provider: str
    urls: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    provider_model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int = 0  # across all workers; 0 = no cap
    max_width: int | None = None
    max_height: int | None = None
    latency_ms: float = 0.0

    @property
    def url(self) -> str | None:
        return self.urls[0] if self.urls else None


@dataclass(frozen=True, slots=True)
class Catalog:
    models: dict[str, ModelConfig]
    default: str

    def resolve(self, name: str | None) -> ModelConfig | None:
        return self.models.get(name or self.default)

    def caps(self) -> dict[str, int]:
        return {m.name: m.max_concurrency for m in self.models.values() if m.max_concurrency > 0}


def load_catalog(settings: Settings) -> Catalog:
    """The catalogue from MODELS_FILE (TOML), or one model from the IMAGE_* settings."""
    path = os.environ.get("MODELS_FILE")
    if path:
        return _from_file(Path(path), settings)
    name = settings.default_model
    model = ModelConfig(
        name=_checked_name(name),
        provider=settings.image_provider,
        urls=(settings.image_provider_url,) if settings.image_provider_url else (),
        api_key=settings.image_provider_api_key,
        provider_model=settings.image_model,
        max_concurrency=settings.provider_max_concurrency,
        latency_ms=settings.procedural_latency_ms,
    )
    return Catalog({model.name: model}, model.name)


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def _from_file(path: Path, settings: Settings) -> Catalog:
    data = tomllib.loads(path.read_text())
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected one or more [[models]] tables")
    models: dict[str, ModelConfig] = {}
    default: str | None = None
    for entry in entries:
        name = _checked_name(str(entry["name"]))
        provider = str(entry.get("provider", "procedural"))
        if provider not in PROVIDER_KINDS:
            raise ValueError(f"{path}: model {name!r}: unknown provider {provider!r} (known: {PROVIDER_KINDS})")
        urls = entry.get("urls") or ([entry["url"]] if entry.get("url") else [])
        key_env = entry.get("api_key_env")
        models[name] = ModelConfig(
            name=name,
            provider=provider,
            urls=tuple(str(u) for u in urls),
            api_key=os.environ.get(key_env) if key_env else None,
            provider_model=entry.get("provider_model"),
            params=dict(entry.get("params", {})),
            max_concurrency=int(entry.get("max_concurrency", 0)),
            max_width=entry.get("max_width"),
            max_height=entry.get("max_height"),
            latency_ms=float(entry.get("latency_ms", settings.procedural_latency_ms)),
        )
        if entry.get("default"):
            default = name
    return Catalog(models, default or next(iter(models)))
