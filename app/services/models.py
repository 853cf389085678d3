"""The model catalogue: which models exist, their provider, endpoint and caps."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.config import Settings
from app.services.providers.base import ProviderKind

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_PARTIAL_IMAGES = 3  # the OpenAI Images API's own bound


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One address a model is served from: `[kind+]url[#max=N]`, e.g. `comfyui+http://gpu1:8188#max=2`."""

    kind: ProviderKind
    url: str
    max_concurrency: int = 0  # within one worker process; 0 = no cap


def parse_endpoint(text: str, default_kind: str) -> EndpointSpec:
    """`http://h:8188`, `comfyui+http://h:8188` or `http://h:8188#max=2`; no kind means the model's own."""
    text = text.strip()
    kind = ProviderKind.parse(default_kind)
    head, plus, rest = text.partition("+")
    if plus and "://" in rest and "://" not in head:
        kind, text = ProviderKind.parse(head, f"endpoint {text!r}"), rest
    url, _, fragment = text.partition("#")
    cap = 0
    for option in filter(None, fragment.split("&")):
        key, _, value = option.partition("=")
        if key not in ("max", "max_concurrency") or not value.isdigit():
            raise ValueError(f"endpoint {text!r}: unknown option {option!r} (known: #max=N)")
        cap = int(value)
    if kind != ProviderKind.PROCEDURAL and "://" not in url:
        raise ValueError(f"endpoint {url!r} is not a URL (expected http://host:port)")
    return EndpointSpec(kind, url, cap)


def format_endpoint(spec: EndpointSpec) -> str:
    return f"{spec.kind}+{spec.url}" + (f"#max={spec.max_concurrency}" if spec.max_concurrency else "")


def parse_fields(spec: str | dict[str, Any] | None) -> dict[str, str]:
    """ComfyUI field targets: `prompt=6.inputs.text,seed=3.inputs.seed` (environment) or a TOML table."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for part in filter(str.strip, spec.split(",")):
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"COMFYUI_FIELDS entry {part.strip()!r} is not name=node.inputs.field")
        out[name.strip()] = path.strip()
    return out


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One servable model: a provider kind, its endpoint(s), and how hard it may be driven."""

    name: str
    provider: ProviderKind
    urls: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    provider_model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int = 0  # across all workers; 0 = no cap
    max_width: int | None = None
    max_height: int | None = None
    latency_ms: float = 0.0
    workflow: str | None = None  # comfyui: path of the API-format workflow
    fields: dict[str, str] = field(default_factory=dict)  # comfyui: value name -> "node.inputs.field"
    output_node: str | None = None  # comfyui: the node whose image is taken
    partial_images: int = 0  # openai: partial images the server streams per image (0: it does not stream)

    @property
    def url(self) -> str | None:
        return self.urls[0] if self.urls else None

    @property
    def endpoints(self) -> tuple[EndpointSpec, ...]:
        return tuple(parse_endpoint(u, self.provider) for u in self.urls)


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
    urls = [settings.image_provider_url] if settings.image_provider_url else []
    urls += [u.strip() for u in (settings.image_provider_urls or "").split(",") if u.strip()]
    model = ModelConfig(
        name=_checked_name(name),
        provider=ProviderKind.parse(settings.image_provider, "IMAGE_PROVIDER"),
        urls=tuple(dict.fromkeys(urls)),
        api_key=settings.image_provider_api_key,
        provider_model=settings.image_model,
        max_concurrency=settings.provider_max_concurrency,
        latency_ms=settings.procedural_latency_ms,
        workflow=settings.comfyui_workflow,
        fields=parse_fields(settings.comfyui_fields),
        output_node=settings.comfyui_output_node or None,
    )
    for url in model.urls:
        parse_endpoint(url, model.provider)  # a malformed endpoint fails at start-up, not per image
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
        provider = ProviderKind.parse(entry.get("provider", ProviderKind.PROCEDURAL), f"{path}: model {name!r}")
        urls = [_endpoint_entry(u, provider, f"{path}: model {name!r}") for u in
                entry.get("urls") or ([entry["url"]] if entry.get("url") else [])]
        key_env = entry.get("api_key_env")
        workflow = entry.get("workflow")
        if workflow:
            workflow = str(path.parent / workflow)  # relative to the catalogue; absolute paths stay
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
            workflow=workflow,
            fields=parse_fields(entry.get("fields")),
            output_node=str(entry["output_node"]) if entry.get("output_node") is not None else None,
            partial_images=_partial_images(entry.get("partial_images", 0), f"{path}: model {name!r}"),
        )
        if entry.get("default"):
            default = name
    return Catalog(models, default or next(iter(models)))


def _partial_images(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PARTIAL_IMAGES:
        raise ValueError(f"{where}: partial_images must be a whole number from 0 to {MAX_PARTIAL_IMAGES}")
    return value


def _endpoint_entry(entry: Any, provider: ProviderKind, where: str) -> str:
    """A `urls` item, checked: a string, or a table {url, kind?, max_concurrency?} stored as `kind+url#max=N`."""
    try:
        if isinstance(entry, dict):
            spec = parse_endpoint(str(entry["url"]), ProviderKind.parse(entry.get("kind", provider)))
            cap = int(entry.get("max_concurrency", spec.max_concurrency))
            return format_endpoint(EndpointSpec(spec.kind, spec.url, cap))
        parse_endpoint(str(entry), provider)
        return str(entry)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where}: bad url entry {entry!r}: {exc}") from exc
