"""JWT verification and minting, the CurrentUser dependency, and signed image/event URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jose import JWTError, jwt

from app.core.config import Settings
from app.core.errors import Unauthorized

MAX_USER_ID_LENGTH = 256
MAX_TOKEN_LENGTH = 8192
_SIG_LENGTH = 43  # an unpadded base64url SHA-256


@dataclass(frozen=True, slots=True)
class User:
    id: str


def mint_token(settings: Settings, user_id: str, ttl_seconds: int = 86_400, **claims: Any) -> str:
    """A HS* token for local use and tests (RS/ES deployments mint tokens elsewhere)."""
    if not settings.jwt_secret:
        raise ValueError("minting needs JWT_SECRET")
    alg = next((a for a in settings.algorithms if a.startswith("HS")), "HS256")
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds, **claims}
    if settings.jwt_audience:
        payload.setdefault("aud", settings.jwt_audience)
    if settings.jwt_issuer:
        payload.setdefault("iss", settings.jwt_issuer)
    return jwt.encode(payload, settings.jwt_secret, algorithm=alg)


def verify_token(settings: Settings, token: str) -> User:
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized("token too long")
    try:
        header = jwt.get_unverified_header(token)
    except JWTError as exc:
        raise Unauthorized("malformed token") from exc
    alg = str(header.get("alg", ""))
    if alg not in settings.algorithms:
        raise Unauthorized(f"token algorithm {alg or 'none'!r} is not accepted")
    key = settings.jwt_secret if alg.startswith("HS") else settings.jwt_public_key
    try:
        claims = jwt.decode(
            token,
            key or "",
            algorithms=[alg],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={
                "require_exp": True,
                "require_sub": True,
                "verify_aud": settings.jwt_audience is not None,
                # python-jose checks `aud` only when the token has one: a configured audience must be present.
                "require_aud": settings.jwt_audience is not None,
                "require_iss": settings.jwt_issuer is not None,
                "leeway": settings.jwt_leeway_seconds,
            },
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("token expired") from exc
    except JWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_USER_ID_LENGTH:
        raise Unauthorized("token has no usable 'sub' claim")
    return User(id=sub)


bearer_scheme = HTTPBearer(auto_error=False, description="A JWT whose `sub` is the user id")


def user_from_credentials(request: Request, credentials: HTTPAuthorizationCredentials | None) -> User:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing bearer token (Authorization: Bearer <JWT>)")
    settings: Settings = request.app.state.settings
    cache: TokenCache | None = getattr(request.app.state, "token_cache", None)
    if cache is None:
        return verify_token(settings, credentials.credentials)
    return cache.verify(settings, credentials.credentials)


class BearerUser(HTTPBearer):
    """The CurrentUser dependency: the bearer scheme (as OpenAPI shows it) that also verifies the token.
    One dependency rather than a scheme and a verifier on top of it: each costs FastAPI time on every
    request, and every authenticated request pays it."""

    async def __call__(self, request: Request) -> User:  # type: ignore[override]
        return user_from_credentials(request, await super().__call__(request))


get_current_user = BearerUser(auto_error=False, description="A JWT whose `sub` is the user id",
                              scheme_name="HTTPBearer")


class TokenCache:
    """Remembers verified tokens until their expiry (or TOKEN_CACHE_SECONDS): a polling client's token
    is then checked once, not on every poll. Only successes are cached."""

    def __init__(self, size: int = 10_000, max_age: float = 60.0) -> None:
        self.size = size
        self.max_age = max_age
        self._entries: dict[str, tuple[User, float]] = {}

    def verify(self, settings: Settings, token: str) -> User:
        now = time.time()
        hit = self._entries.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        user = verify_token(settings, token)
        try:
            exp = float(jwt.get_unverified_claims(token)["exp"])
        except (JWTError, KeyError, TypeError, ValueError):
            return user
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[token] = (user, min(exp, now + self.max_age))
        return user


CurrentUser = Annotated[User, Depends(get_current_user)]


# -- signed URLs ------------------------------------------------------------------------------
def _sign(settings: Settings, message: str) -> str:
    digest = hmac.new(settings.signing_key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signature_expiry(settings: Settings, now: float | None = None) -> int:
    """Expiry rounded up to half the URL lifetime, so a polled status keeps the same URLs (browser cache)."""
    ttl = settings.image_url_ttl_seconds
    step = max(1, ttl // 2)
    return int(math.ceil(((now or time.time()) + ttl) / step) * step)


def sign_image(settings: Settings, queue_id: str, index: int, attempt: int, expires: int) -> str:
    return _sign(settings, f"img:{queue_id}:{index}:{attempt}:{expires}")


def image_signature_current(expires: int, signature: str) -> bool:
    """What can be checked of a signed URL without knowing which image it names: expiry and form."""
    return expires >= time.time() and len(signature) == _SIG_LENGTH


def check_image_signature(
    settings: Settings, queue_id: str, index: int, attempt: int, expires: int, signature: str
) -> bool:
    if not image_signature_current(expires, signature):
        return False
    return hmac.compare_digest(sign_image(settings, queue_id, index, attempt, expires), signature)


_STREAM_TOKEN = re.compile(r"^(\d{1,12})\.([A-Za-z0-9_-]{43})\.(.{1,512})$")


def stream_token(settings: Settings, user_id: str, ttl_seconds: int = 300) -> str:
    """A short-lived token for EventSource, which cannot send headers: `<exp>.<sig>.<user>`."""
    expires = int(time.time()) + ttl_seconds
    return f"{expires}.{_sign(settings, f'sse:{user_id}:{expires}')}.{user_id}"


def verify_stream_token(settings: Settings, token: str) -> User:
    match = _STREAM_TOKEN.match(token)
    if not match:
        raise Unauthorized("malformed stream token")
    expires, sig, user_id = int(match[1]), match[2], match[3]
    if expires < time.time():
        raise Unauthorized("stream token expired")
    if not hmac.compare_digest(_sign(settings, f"sse:{user_id}:{expires}"), sig):
        raise Unauthorized("invalid stream token")
    return User(id=user_id)
