"""The image store named by IMAGE_STORE."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from redis.asyncio import Redis

from app.core.config import Settings
from app.services.images.base import ImageStore
from app.services.images.file import FileStore
from app.services.images.redis import RedisStore
from app.services.images.s3 import S3Store

# With nothing configured, images go next to the app, as Redis's data does under ./run.sh.
DEFAULT_DIRECTORY = Path(__file__).resolve().parents[3] / ".data" / "images"


def store_url(settings: Settings) -> str:
    return settings.image_store or DEFAULT_DIRECTORY.as_uri()


def open_store(settings: Settings, redis_client: Redis) -> ImageStore:
    """The configured store; ValueError (with what is expected) for an IMAGE_STORE it cannot use."""
    url = store_url(settings).strip()
    if url == "redis":
        return RedisStore(redis_client, max_age_seconds=settings.queue_ttl_seconds + settings.queue_safety_ttl_seconds)
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"IMAGE_STORE={url!r}: expected file:///absolute/directory")
        return FileStore(Path(unquote(parsed.path)))
    if url.startswith("s3://"):
        return S3Store(
            url,
            endpoint_url=settings.s3_endpoint_url,
            public_url=settings.s3_public_url,
            region=settings.aws_region,
            access_key_id=settings.aws_access_key_id,
            secret_access_key=settings.aws_secret_access_key,
        )
    raise ValueError(f"IMAGE_STORE={url!r}: expected file:///absolute/directory, s3://bucket/prefix or redis")
