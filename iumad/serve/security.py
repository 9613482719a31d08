"""Who may start the server where: loopback by default, any other address only with a bearer token."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from iumad.errors import UsageError

TOKEN_ENV = "IUMAD_SERVE_TOKEN"
COOKIE = "iumad_session"
"""The dashboard's login cookie: an HMAC of the token (never the token itself), HttpOnly, SameSite=Strict."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; a name or 0.0.0.0 is not (it may reach the network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The token from `--token-file` (first line, stripped) or $IUMAD_SERVE_TOKEN; None when neither is set."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{token_file}: cannot read the token file ({exc}); check the path",
                             file=token_file, fix="check the --token-file path") from None
        if not token or not token[0].strip():
            raise UsageError(f"{token_file}: the token file is empty; write a token on its first line",
                             file=token_file, fix="write a long random token on the first line")
        return token[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token: uploads and model details would be open to the network."""
    if not is_loopback(host) and token is None:
        raise UsageError(f"--host {host} is not a loopback address and no token is set; set {TOKEN_ENV} or pass "
                         "--token-file, or bind 127.0.0.1",
                         fix=f"set {TOKEN_ENV} or --token-file, or use --host 127.0.0.1")


def cookie_value(token: str) -> str:
    """What the login cookie holds for `token`: a keyed hash, so the cookie jar never holds the token."""
    return hmac.new(token.encode(), b"iumad dashboard session", hashlib.sha256).hexdigest()


def credentials_ok(token: str, authorization: str | None, cookie: str | None) -> bool:
    """True when the request carries `Authorization: Bearer <token>` or the login cookie of `token`
    (constant-time comparisons)."""
    if authorization is not None and hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        return True
    return cookie is not None and hmac.compare_digest(cookie.encode(), cookie_value(token).encode())
