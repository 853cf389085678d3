"""A developer machine's JWT secret: generated once into `.data/jwt-secret`, used when JWT_SECRET is unset.

`uvicorn app.main:app`, `./run.sh` and `python -m app.cli token USER` all use the same file, so a token
minted by one is accepted by the others. The container images set REQUIRE_AUTH_CONFIG=true: there
nothing is generated and the API refuses to start until JWT_SECRET (or JWT_PUBLIC_KEY) is configured.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from app.core.security import mint_token

SECRET_FILE_NAME = "jwt-secret"  # noqa: S105 - a file name, not a secret
LOCAL_TOKEN_TTL_SECONDS = 86_400


def data_dir() -> Path:
    """Where local state lives: IMAGEQUEUE_DATA_DIR, else `.data` in the working directory."""
    return Path(os.environ.get("IMAGEQUEUE_DATA_DIR") or ".data")


@dataclass(frozen=True, slots=True)
class LocalSecret:
    value: str
    path: Path
    created: bool  # generated now, rather than read from an earlier run


def local_secret(directory: Path | None = None) -> LocalSecret:
    """The secret kept in `directory`/jwt-secret, generated (readable by its owner only) when absent."""
    path = (directory or data_dir()) / SECRET_FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then linked into place: never briefly readable by others,
        # never seen half-written, and when two processes race the first link wins for both.
        draft = path.with_name(f".{SECRET_FILE_NAME}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        try:
            os.link(draft, path)
            created = True
        except FileExistsError:
            created = False
        finally:
            draft.unlink()
        return LocalSecret(path.read_text().strip(), path, created)
    return LocalSecret(path.read_text().strip(), path, created=False)


def needs_local_secret(settings: Settings) -> bool:
    """True on a developer machine that configured no token key for the HS* algorithms it accepts."""
    return (
        not settings.require_auth_config
        and not settings.jwt_secret
        and any(a.startswith("HS") for a in settings.algorithms)
    )


def with_local_secret(settings: Settings) -> tuple[Settings, LocalSecret | None]:
    """`settings` as they are, or with the local secret as JWT_SECRET where `needs_local_secret`."""
    if not needs_local_secret(settings):
        return settings, None
    local = local_secret()
    return settings.model_copy(update={"jwt_secret": local.value}), local


def token_for(settings: Settings, user_id: str, ttl_seconds: int = LOCAL_TOKEN_TTL_SECONDS) -> str:
    """A token for `user_id` signed with JWT_SECRET, or on a developer machine with the local secret
    (what `python -m app.cli token USER` prints). ValueError when no HS* secret can be had."""
    resolved, _ = with_local_secret(settings)
    return mint_token(resolved, user_id, ttl_seconds)
