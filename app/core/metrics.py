"""Prometheus metrics: the API's registry (its own figures and gauges set from Redis at scrape time,
see services/queue/fleet.py), its timing middleware, and the workers' registry."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_access_log = logging.getLogger("imagequeue.access")


class ApiMetrics:
    """Per-app registry, so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_latency = Histogram(
            "imagequeue_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queues_created = Counter(
            "imagequeue_queues_created_total", "Queues created", ["model", "priority"], registry=r
        )
        self.images_created = Counter(
            "imagequeue_images_created_total", "Images in created queues", ["model"], registry=r
        )
        self.images_finished = Gauge(
            "imagequeue_images_finished_total",
            "Images that reached a terminal status (all workers, from Redis)",
            ["status"],
            registry=r,
        )
        self.in_flight = Gauge("imagequeue_images_in_flight", "Images being generated now", ["model"], registry=r)
        self.pending = Gauge("imagequeue_images_pending", "Images waiting to start", ["model", "priority"], registry=r)
        self.workers = Gauge("imagequeue_workers", "Live workers", registry=r)
        self.worker_slots = Gauge("imagequeue_worker_concurrency", "Total generation slots of live workers", registry=r)


class TimingMiddleware:
    """HTTP latency by method, route template and status (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router leaves the matched route in the scope: label by its template, not the raw
            # path, so ids do not explode the label set.
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.metrics.http_latency.labels(scope["method"], route, str(status)).observe(elapsed)
            if _access_log.isEnabledFor(logging.INFO):
                _access_log.info(
                    "%s %s %d", scope["method"], scope["path"], status,
                    extra={"method": scope["method"], "path": scope["path"], "http_status": status,
                           "ms": round(elapsed * 1000, 2)},
                )


def install_metrics(app: FastAPI, metrics: ApiMetrics) -> None:
    app.add_middleware(TimingMiddleware, metrics=metrics)


class WorkerMetrics:
    """A worker's own figures, served on --metrics-port."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.provider_latency = Histogram(
            "imagequeue_provider_request_duration_seconds",
            "Provider request latency per attempt",
            ["model", "outcome"],
            buckets=PROVIDER_BUCKETS,
            registry=r,
        )
        self.provider_errors = Counter(
            "imagequeue_provider_errors_total", "Provider errors by kind", ["model", "kind"], registry=r
        )
        self.images = Counter(
            "imagequeue_worker_images_total", "Images this worker finished", ["model", "status"], registry=r
        )
        self.in_flight = Gauge("imagequeue_worker_images_in_flight", "Images this worker is generating", registry=r)
        self.progress_values = Counter(
            "imagequeue_worker_progress_values_total",
            "Step progress values from providers, by what became of them: written to Redis, stale (the image"
            " had ended), dropped (Redis slow or failing), coalesced (a newer value came first)",
            ["outcome"],
            registry=r,
        )

    def observer(self, model: str) -> Callable[[str, float], None]:
        def observe(kind: str, seconds: float) -> None:
            self.provider_latency.labels(model, kind).observe(seconds)
            if kind != "ok":
                self.provider_errors.labels(model, kind).inc()

        return observe


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper holds up neither the next one nor the worker's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # scrapes every few seconds are not news


def serve_worker_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0",
                         token: str | None = None) -> WSGIServer:
    """A worker's metrics on http://host:port/metrics, in a daemon thread. With `token` (METRICS_TOKEN,
    as on the API), a scrape without `Authorization: Bearer <token>` gets 401."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if token:
            scheme, _, sent = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
                start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                    ("WWW-Authenticate", "Bearer")])
                return [b'{"detail": "worker metrics need the scrape token (Authorization: Bearer <METRICS_TOKEN>)"}']
        return exposition(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
