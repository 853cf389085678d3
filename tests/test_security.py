"""Token verification beyond HS256: RS256 and ES256 with a public key, and the attacks on them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwt

from app.core.config import Settings
from app.core.errors import Unauthorized
from app.core.local_auth import token_for, with_local_secret
from app.core.security import check_image_signature, sign_image, verify_stream_token, verify_token

ROOT = Path(__file__).resolve().parent.parent


def _pems(private: Any) -> tuple[str, str]:
    priv = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return priv, pub


def _hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    """What an attacker would send: HS256 keyed with the (public) PEM. Libraries refuse to make one."""
    def part(data: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(claims)
    sig = base64.urlsafe_b64encode(hmac.new(secret, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + sig).decode()


def _claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 60, **extra}


@pytest.mark.parametrize(
    ("alg", "key"),
    [("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
     ("ES256", ec.generate_private_key(ec.SECP256R1()))],
)
def test_public_key_algorithms_verify_and_refuse_forgeries(alg: str, key: Any) -> None:
    private, public = _pems(key)
    settings = Settings(_env_file=None, jwt_algorithms=alg, jwt_public_key=public, url_signing_secret="u" * 32)
    assert verify_token(settings, jwt.encode(_claims(), private, algorithm=alg)).id == "alice"
    # The public key used as an HMAC secret (algorithm confusion) is refused.
    with pytest.raises(Unauthorized):
        verify_token(settings, _hs256_by_hand(_claims(), public.encode()))
    # Another key pair's signature is refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256" \
        else ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthorized):
        verify_token(settings, jwt.encode(_claims(), _pems(other)[0], algorithm=alg))
    with pytest.raises(Unauthorized, match="expired"):
        verify_token(settings, jwt.encode(_claims(exp=int(time.time()) - 60), private, algorithm=alg))


def test_expiry_tolerates_the_configured_clock_skew_and_no_more() -> None:
    settings = Settings(_env_file=None, jwt_secret="s" * 32, jwt_leeway_seconds=30)
    now = int(time.time())
    # Issued by a host whose clock runs 20 s ahead of ours: not yet valid by our clock, within leeway.
    ahead = jwt.encode(_claims(exp=now - 10, nbf=now + 20), "s" * 32, algorithm="HS256")
    assert verify_token(settings, ahead).id == "alice"
    with pytest.raises(Unauthorized, match="expired"):
        verify_token(settings, jwt.encode(_claims(exp=now - 31), "s" * 32, algorithm="HS256"))
    strict = Settings(_env_file=None, jwt_secret="s" * 32, jwt_leeway_seconds=0)
    with pytest.raises(Unauthorized, match="expired"):
        verify_token(strict, jwt.encode(_claims(exp=now - 2), "s" * 32, algorithm="HS256"))


def test_audience_and_issuer_are_checked_when_configured() -> None:
    settings = Settings(_env_file=None, jwt_secret="s" * 32, jwt_audience="imagequeue", jwt_issuer="https://id.example")
    good = jwt.encode(_claims(aud="imagequeue", iss="https://id.example"), "s" * 32, algorithm="HS256")
    assert verify_token(settings, good).id == "alice"
    for claims in (_claims(aud="other", iss="https://id.example"), _claims(aud="imagequeue", iss="evil"), _claims()):
        with pytest.raises(Unauthorized):
            verify_token(settings, jwt.encode(claims, "s" * 32, algorithm="HS256"))


def test_settings_refuse_unsafe_auth_configuration() -> None:
    unsafe = {
        "JWT_SECRET is required": Settings(_env_file=None, jwt_secret=None),
        "at least 16": Settings(_env_file=None, jwt_secret="short"),
        "none": Settings(_env_file=None, jwt_secret="s" * 32, jwt_algorithms="HS256,none"),
        "JWT_PUBLIC_KEY": Settings(_env_file=None, jwt_algorithms="RS256", url_signing_secret="u" * 32),
    }
    for message, settings in unsafe.items():
        with pytest.raises(ValueError, match=message):
            settings.check_auth()
    with pytest.raises(ValueError, match="sign URLs"):
        _ = Settings(_env_file=None, jwt_secret=None).signing_key


def test_local_secret_only_where_no_key_is_configured_nor_required(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEQUEUE_DATA_DIR", str(tmp_path))
    dev, local = with_local_secret(Settings(_env_file=None))
    assert local is not None and local.created and dev.jwt_secret == local.value and len(local.value) >= 32
    assert (tmp_path / "jwt-secret").stat().st_mode & 0o077 == 0
    again, reused = with_local_secret(Settings(_env_file=None))
    assert reused is not None and not reused.created and again.jwt_secret == dev.jwt_secret
    assert verify_token(dev, token_for(Settings(_env_file=None), "alice")).id == "alice"
    for configured in (Settings(_env_file=None, jwt_secret="s" * 32),
                       Settings(_env_file=None, require_auth_config=True),
                       Settings(_env_file=None, jwt_algorithms="RS256", jwt_public_key="k",
                                url_signing_secret="u" * 32)):
        assert with_local_secret(configured) == (configured, None)
    with pytest.raises(ValueError, match="JWT_SECRET"):
        token_for(Settings(_env_file=None, require_auth_config=True), "alice")


def test_workers_need_no_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "URL_SIGNING"))}
    worker = subprocess.run([sys.executable, str(ROOT / "worker.py"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0 and "--concurrency" in worker.stdout, worker.stderr
    assert list(tmp_path.iterdir()) == []


def test_signed_urls_and_stream_tokens_are_bound_and_expire() -> None:
    settings = Settings(_env_file=None, jwt_secret="s" * 32)
    exp = int(time.time()) + 60
    sig = sign_image(settings, "q" * 32, 3, 1, exp)
    assert check_image_signature(settings, "q" * 32, 3, 1, exp, sig)
    assert not check_image_signature(settings, "q" * 32, 4, 1, exp, sig)  # another image
    assert not check_image_signature(settings, "q" * 32, 3, 2, exp, sig)  # another attempt
    assert not check_image_signature(settings, "q" * 32, 3, 1, exp + 1, sig)  # a stretched expiry
    assert not check_image_signature(settings, "q" * 32, 3, 1, int(time.time()) - 1,
                                     sign_image(settings, "q" * 32, 3, 1, int(time.time()) - 1))
    with pytest.raises(Unauthorized):
        verify_stream_token(settings, f"{exp}.{'A' * 43}.alice")


def test_configured_audience_requires_the_claim() -> None:
    """python-jose skips the audience check when the token has no `aud`: such a token is refused."""
    settings = Settings(_env_file=None, jwt_secret="s" * 32, jwt_audience="imagequeue")
    assert verify_token(settings, jwt.encode(_claims(aud="imagequeue"), "s" * 32, algorithm="HS256")).id == "alice"
    with pytest.raises(Unauthorized, match="aud"):
        verify_token(settings, jwt.encode(_claims(), "s" * 32, algorithm="HS256"))
    # Without a configured audience, tokens with or without one are accepted as before.
    open_settings = Settings(_env_file=None, jwt_secret="s" * 32)
    for claims in (_claims(), _claims(aud="anything")):
        assert verify_token(open_settings, jwt.encode(claims, "s" * 32, algorithm="HS256")).id == "alice"
