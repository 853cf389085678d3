"""The checks of a new queue before anything is written: limits, model, params, template expansion, webhook.

Each failure is an Unprocessable naming the field (`loc`) and saying what is wrong in words.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import secrets
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.core.config import Settings
from app.core.errors import Unprocessable
from app.models.queue import MAX_SEED, CreateQueueRequest
from app.services.models import Catalog
from app.services.providers.base import is_reserved
from app.services.queue.states import WebhookEvent

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HTTP_URL = re.compile(r"^https?://[^\s/]+")
MAX_TAG_LENGTH = 64
MAX_WEBHOOK_URL_LENGTH = 2048
RANDOM_SEED_BOUND = 2**31  # a seed drawn for a request that gives none


@dataclass(frozen=True, slots=True)
class CheckedQueue:
    """What a valid create request comes to: its model, its prompts expanded, and its seed."""

    model: str
    prompts: list[str]
    total: int  # prompts x count
    seed: int
    webhook: dict[str, Any] | None


def check_create(req: CreateQueueRequest, settings: Settings, catalog: Catalog) -> CheckedQueue:
    """Every check of a create request, in the order a user fixes them."""
    s = settings
    model = _check_model_and_size(req, settings, catalog)
    if req.count > s.max_count:
        raise Unprocessable(f"count must be at most {s.max_count}", ("body", "count"))
    if len(req.tags) > s.max_tags:
        raise Unprocessable(f"at most {s.max_tags} tags", ("body", "tags"))
    for i, tag in enumerate(req.tags):
        if not tag.strip() or len(tag) > MAX_TAG_LENGTH:
            raise Unprocessable(f"tags must be 1-{MAX_TAG_LENGTH} characters", ("body", "tags", i))
    if req.output_format == "png" and req.output_quality is not None:
        raise Unprocessable("output_quality applies to webp and jpeg; png is lossless", ("body", "output_quality"))
    prompts = expand(req, settings)
    total = len(prompts) * req.count
    if total > s.max_images_per_queue:
        raise Unprocessable(
            f"{len(prompts)} prompts x count {req.count} = {total} images; at most "
            f"{s.max_images_per_queue} images per queue",
            ("body", "count"),
        )
    check_fits_pending_limit(total, settings, what="the queue holds", advice="split it into smaller queues",
                             loc=("body", "count"))
    seed = req.seed if req.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)
    if seed + total - 1 > MAX_SEED:
        raise Unprocessable(f"seed + images must stay below {MAX_SEED}", ("body", "seed"))
    return CheckedQueue(model, prompts, total, seed, check_webhook(req, settings))


def check_fits_pending_limit(
    images: int, settings: Settings, *, what: str, advice: str, loc: tuple[str | int, ...]
) -> None:
    """More images than the per-user pending limit are never admitted, however long the user waits: a
    422 that says so, not the 429 (with Retry-After) of a request that fits once others finish. Used by
    create and by retry (`what` says which images, `advice` what the user can do instead)."""
    cap = settings.max_pending_images_per_user
    if cap and images > cap:
        raise Unprocessable(
            f"{what} {images} images, more than the per-user limit of {cap} pending images "
            f"(MAX_PENDING_IMAGES_PER_USER), so waiting cannot help; {advice}",
            loc,
        )


def expand(req: CreateQueueRequest, settings: Settings) -> list[str]:
    """The request's prompts, with a template's variables expanded as a cartesian product."""
    s = settings
    if req.prompts is not None:
        if not req.prompts:
            raise Unprocessable("'prompts' must hold at least one prompt", ("body", "prompts"))
        if len(req.prompts) > s.max_prompts:
            raise Unprocessable(f"at most {s.max_prompts} prompts per queue", ("body", "prompts"))
        for i, p in enumerate(req.prompts):
            _check_prompt(p, ("body", "prompts", i), settings)
        return list(req.prompts)
    template = req.prompt or ""
    _check_prompt(template, ("body", "prompt"), settings)
    names = list(dict.fromkeys(_PLACEHOLDER.findall(template)))
    variables = req.variables or {}
    if len(variables) > s.max_variables:
        raise Unprocessable(f"at most {s.max_variables} variables", ("body", "variables"))
    missing = [n for n in names if n not in variables]
    if missing:
        raise Unprocessable(
            f"the template uses {', '.join('{' + n + '}' for n in missing)} but 'variables' gives no values",
            ("body", "variables"),
        )
    unused = [n for n in variables if n not in names]
    if unused:
        raise Unprocessable(f"variables not used in the template: {', '.join(unused)}", ("body", "variables"))
    combos = 1
    for n in names:
        values = variables[n]
        if not values:
            raise Unprocessable(f"variable {n!r} has no values", ("body", "variables", n))
        combos *= len(values)
        if combos > s.max_variable_combinations:
            raise Unprocessable(
                f"variables expand to more than {s.max_variable_combinations} prompts", ("body", "variables")
            )
    # The longest prompt the template can make, from the value lengths, before anything is built: a few
    # placeholders and one long value fit the body limit yet would expand to hundreds of megabytes.
    uses = Counter(_PLACEHOLDER.findall(template))
    longest = len(_PLACEHOLDER.sub("", template)) + sum(
        count * max(len(v) for v in variables[n]) for n, count in uses.items()
    )
    if longest > s.max_prompt_length:
        raise Unprocessable(
            f"the template with its longest values makes a prompt of {longest} characters, longer than "
            f"{s.max_prompt_length} characters",
            ("body", "variables"),
        )
    prompts: list[str] = []
    for combo in itertools.product(*(variables[n] for n in names)):
        mapping = dict(zip(names, combo, strict=True))
        prompt = _PLACEHOLDER.sub(lambda m, mapping=mapping: mapping[m[1]], template)  # type: ignore[misc]
        _check_prompt(prompt, ("body", "prompt"), settings)
        prompts.append(prompt)
    return prompts


def check_webhook(req: CreateQueueRequest, settings: Settings) -> dict[str, Any] | None:
    """The queue's webhook configuration, or None without `webhook_url`. Where the URL points is checked
    at each delivery (DNS may change): see webhooks.py."""
    if req.webhook_url is None:
        return None
    if not settings.webhook_secret:
        raise Unprocessable(
            "webhooks are not enabled on this server (the operator sets WEBHOOK_SECRET)", ("body", "webhook_url")
        )
    url = req.webhook_url
    if not _HTTP_URL.match(url) or len(url) > MAX_WEBHOOK_URL_LENGTH:
        raise Unprocessable("webhook_url must be an http(s) URL", ("body", "webhook_url"))
    problem = webhook_url_problem(url)
    if problem:
        raise Unprocessable(f"webhook_url is not a usable URL: {problem}", ("body", "webhook_url"))
    if not settings.webhook_allow_private:
        # Names are checked where they resolve, at each delivery; an address or localhost is known now.
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
        address = literal_address(host)
        if host == "localhost" or host.endswith(".localhost") or (
                address is not None and not webhook_address_allowed(address)):
            raise Unprocessable(
                f"webhook_url points at a private, loopback or reserved address ({host}); webhooks go to "
                "public addresses only (the operator may set WEBHOOK_ALLOW_PRIVATE)", ("body", "webhook_url"))
    events = req.webhook_events or [e.value for e in WebhookEvent]
    known = {e.value for e in WebhookEvent}
    bad = [e for e in events if e not in known]
    if bad:
        raise Unprocessable(f"unknown webhook events {bad}; known: {sorted(known)}", ("body", "webhook_events"))
    return {"url": url, "events": events}


def webhook_url_problem(url: str) -> str | None:
    """What keeps a delivery to `url` from being made, checked as the worker will use it; None if nothing."""
    if any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
        return "it holds spaces, control characters or backslashes"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    host = parts.hostname
    if not host:
        return "it names no host"
    if port == 0:
        return "port 0 cannot be connected to"
    if ":" not in host:  # a name, or an IPv4 address: each label must be valid in DNS
        try:
            host.encode("idna")
        except UnicodeError as exc:
            return f"invalid host name ({exc})"
    else:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return "invalid IPv6 address"
    return None


Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are an IPv4 address
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): a private network's
# Not globally reachable per IANA, but `is_global` on older Pythons (before 3.12.4) misses it.
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")


def webhook_address_allowed(address: Address) -> bool:
    """Only globally routable unicast addresses: not private, loopback, link-local, carrier-grade NAT
    (100.64.0.0/10), documentation, benchmarking, reserved or multicast, nor an IPv6 form that embeds
    such an IPv4 address (mapped, 6to4, Teredo, NAT64)."""
    if address.is_multicast or not address.is_global or address in _IETF_PROTOCOL:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False
        embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
        return all(webhook_address_allowed(v4) for v4 in embedded if v4 is not None)
    return True


def literal_address(host: str) -> Address | None:
    """The address a host written as one names, in any form a resolver takes as an address rather
    than a name ("127.1", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]"); None for a name."""
    try:
        return ipaddress.IPv6Address(host.split("%", 1)[0]) if ":" in host else ipaddress.IPv4Address(
            socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _check_prompt(prompt: str, loc: tuple[str | int, ...], settings: Settings) -> None:
    if not prompt.strip():
        raise Unprocessable("prompt must not be empty", loc)
    if len(prompt) > settings.max_prompt_length:
        raise Unprocessable(f"prompt longer than {settings.max_prompt_length} characters", loc)


def _check_model_and_size(req: CreateQueueRequest, settings: Settings, catalog: Catalog) -> str:
    """The model's name; the size within its limits, and params that leave the request's own fields alone."""
    s = settings
    model = catalog.resolve(req.model)
    if model is None:
        known = ", ".join(sorted(catalog.models))
        raise Unprocessable(f"unknown model {req.model!r}; known models: {known}", ("body", "model"))
    kinds = {model.provider, *(e.kind for e in model.endpoints)}
    reserved = sorted(k for k in req.params if any(is_reserved(k, kind) for kind in kinds))
    if reserved:
        raise Unprocessable(
            f"params may not set {', '.join(reserved)}: use the request's own fields (prompt, seed, width, "
            "height, negative_prompt, model); the rest is fixed by the server",
            ("body", "params"),
        )
    max_w = model.max_width or s.max_width
    max_h = model.max_height or s.max_height
    if req.width > max_w:
        raise Unprocessable(f"width must be at most {max_w}", ("body", "width"))
    if req.height > max_h:
        raise Unprocessable(f"height must be at most {max_h}", ("body", "height"))
    if len(json.dumps(req.params)) > s.max_params_bytes:
        raise Unprocessable(f"params larger than {s.max_params_bytes} bytes of JSON", ("body", "params"))
    if req.negative_prompt is not None and len(req.negative_prompt) > s.max_prompt_length:
        raise Unprocessable(
            f"negative_prompt longer than {s.max_prompt_length} characters", ("body", "negative_prompt")
        )
    return model.name
