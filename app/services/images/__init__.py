"""Where image bytes live: one contract (base.py), three backends (file, s3, redis), the factory that
picks one from IMAGE_STORE, output formats and thumbnails (encoding.py), and bounded upload retries."""

from app.services.images.base import (
    ImageStore,
    ObjectMissing,
    ObjectStream,
    RangeNotSatisfiable,
    StoredObject,
    StoreError,
    StoreUnavailable,
    image_key,
    parse_range,
    queue_prefix,
    thumbnail_key,
)
from app.services.images.encoding import EncodedImage, ImageUnreadable, OutputFormat, encode_async
from app.services.images.factory import open_store, store_url
from app.services.images.upload import StoreUnreachable, put_retrying

__all__ = [
    "EncodedImage",
    "ImageStore",
    "ImageUnreadable",
    "ObjectMissing",
    "ObjectStream",
    "OutputFormat",
    "RangeNotSatisfiable",
    "StoreError",
    "StoreUnavailable",
    "StoreUnreachable",
    "StoredObject",
    "encode_async",
    "image_key",
    "open_store",
    "parse_range",
    "put_retrying",
    "queue_prefix",
    "store_url",
    "thumbnail_key",
]
