"""Settings, read once from the environment (and an optional `.env` file: IMAGEQUEUE_ENV_FILE names
another, and set empty reads none, as the test and benchmark processes do)."""

from __future__ import annotations

import os
from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the API and the workers; names match the environment variables."""

    model_config = SettingsConfigDict(env_file=os.environ.get("IMAGEQUEUE_ENV_FILE", ".env") or None, extra="ignore")

    # Redis
    redis_url: str | None = None
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    redis_socket_timeout: float = 3.0
    redis_connect_timeout: float = 2.0
    redis_max_connections: int = Field(default=512, ge=8)

    # Auth
    jwt_secret: str | None = None
    jwt_algorithms: str = "HS256"
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Tokens are checked by this host's clock against their issuer's: `exp` and `nbf` tolerate this
    # much disagreement between the two.
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=600)
    url_signing_secret: str | None = None
    image_url_ttl_seconds: int = Field(default=3600, ge=60)
    # Set in the container images: no local secret is generated, JWT_SECRET or JWT_PUBLIC_KEY must be given.
    require_auth_config: bool = False

    # Queue lifetime
    # Short lifetimes are for soaks and tests (bench.chaos waits for queues to expire).
    queue_ttl_seconds: int = Field(default=86_400, ge=5)
    queue_safety_ttl_seconds: int = Field(default=7 * 86_400, ge=10)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60)

    # Provider (the single default model when no catalogue is configured)
    image_provider: str = "procedural"  # a provider kind, checked when the model catalogue loads
    image_provider_url: str | None = None
    image_provider_api_key: str | None = None
    image_model: str | None = None
    procedural_latency_ms: float = Field(default=0.0, ge=0)
    provider_timeout_seconds: float = Field(default=120.0, gt=0)
    provider_max_retries: int = Field(default=4, ge=0)
    provider_backoff_base_seconds: float = Field(default=0.5, ge=0)
    provider_backoff_max_seconds: float = Field(default=30.0, ge=0)
    provider_max_concurrency: int = Field(default=0, ge=0)  # 0 = no global cap
    image_provider_urls: str | None = None  # several endpoints: "[kind+]url[#max=N]", comma-separated
    provider_failure_threshold: int = Field(default=3, ge=1)  # consecutive failures that rest an endpoint
    provider_cooldown_seconds: float = Field(default=30.0, ge=0)  # how long it rests before a trial request
    comfyui_workflow: str | None = None  # path of an API-format workflow JSON
    comfyui_fields: str | None = None  # "prompt=6.inputs.text,seed=3.inputs.seed"
    comfyui_output_node: str | None = None  # node id whose image is taken; default: the first saved image
    comfyui_poll_seconds: float = Field(default=0.5, gt=0)  # /history polling interval
    comfyui_prompt_timeout_seconds: float = Field(default=600.0, gt=0)  # queue wait + run time of one prompt

    # Image store (where image bytes live; Redis keeps only each image's record)
    image_store: str | None = None  # file:///abs/dir | s3://bucket/prefix | redis; default: .data/images
    s3_endpoint_url: str | None = None  # for stores other than AWS, e.g. http://127.0.0.1:8333
    s3_public_url: str | None = None  # the endpoint as browsers reach it: image URLs redirect to presigned GETs
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_region: str | None = None
    image_store_retry_seconds: float = Field(default=120.0, gt=0)  # upload retries before the image fails
    image_store_sweep_seconds: float = Field(default=60.0, gt=0)  # how often expired queues' objects are removed
    thumbnail_wait_seconds: float = Field(default=30.0, gt=0, le=600)  # then 503 + Retry-After while it is made

    # Limits
    max_prompt_length: int = Field(default=2000, ge=1)
    max_prompts: int = Field(default=1000, ge=1)
    max_images_per_queue: int = Field(default=10_000, ge=1)
    max_count: int = Field(default=1000, ge=1)
    max_variable_combinations: int = Field(default=1000, ge=1)
    max_variables: int = Field(default=10, ge=1)
    max_width: int = Field(default=2048, ge=64)
    max_height: int = Field(default=2048, ge=64)
    max_params_bytes: int = Field(default=8192, ge=2)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_tags: int = Field(default=20, ge=0)
    max_generate_wait_seconds: float = Field(default=300.0, ge=0)
    max_pending_images_per_user: int = Field(default=100_000, ge=0)  # 0 = unlimited
    max_active_queues_per_user: int = Field(default=200, ge=0)  # 0 = unlimited

    # Worker
    worker_concurrency: int = Field(default=8, ge=1)
    worker_lease_seconds: float = Field(default=10.0, gt=0)
    worker_heartbeat_seconds: float = Field(default=2.0, gt=0)
    worker_grace_seconds: float = Field(default=20.0, ge=0)
    worker_ticket_seconds: float = Field(default=20.0, gt=0)
    worker_cancel_poll_seconds: float = Field(default=0.5, gt=0)
    worker_progress: bool = True  # step progress and previews from providers to status and events
    max_image_attempts: int = Field(default=3, ge=1)

    # Webhooks
    webhook_secret: str | None = None
    webhook_allow_private: bool = False
    webhook_max_retry_seconds: float = Field(default=3600.0, ge=0)

    # Ops
    log_level: str = "INFO"
    log_prompts: bool = False  # put prompts on the workers' per-image log lines
    metrics_token: str | None = None  # when set, GET /metrics (API and workers) needs it as a bearer token
    worker_metrics_host: str = "0.0.0.0"  # where a worker's --metrics-port listens

    def check_auth(self) -> None:
        """Refuses an unsafe token configuration (ValueError). The API checks it at start; workers,
        which never see a token, run without these secrets."""
        algs = self.algorithms
        if "none" in [a.lower() for a in algs]:
            raise ValueError("JWT_ALGORITHMS may not contain 'none'")
        if any(a.startswith("HS") for a in algs) and not self.jwt_secret:
            raise ValueError(
                "JWT_SECRET is required for HS* algorithms (at least 16 characters; "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
            )
        if any(not a.startswith("HS") for a in algs) and not self.jwt_public_key:
            raise ValueError("JWT_PUBLIC_KEY is required for RS*/ES*/PS* algorithms")
        if self.jwt_secret is not None and len(self.jwt_secret) < 16:
            raise ValueError("JWT_SECRET must be at least 16 characters")
        if self.url_signing_secret is None and self.jwt_secret is None:
            raise ValueError("URL_SIGNING_SECRET is required when JWT_SECRET is not set")

    @property
    def algorithms(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]

    @property
    def effective_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def default_model(self) -> str:
        return self.image_model or self.image_provider

    @property
    def signing_key(self) -> bytes:
        if self.url_signing_secret:
            return self.url_signing_secret.encode()
        if not self.jwt_secret:
            raise ValueError("URL_SIGNING_SECRET or JWT_SECRET is required to sign URLs")
        return f"image-url:{self.jwt_secret}".encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()
