"""Optional bearer-token authentication for REST and websockets."""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Security, WebSocket, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger("segstream.auth")


def refused(conn: Request | WebSocket, why: str) -> None:
    """Log a refused request (rate-limited like every line): who, where and why."""
    client = conn.client.host if conn.client else "?"
    log.warning("refused %s from %s: %s", conn.url.path, client, why)


def token_matches(expected: str | None, given: str | None) -> bool:
    """True when no token is configured, or ``given`` equals it (constant-time comparison)."""
    if not expected:
        return True
    if not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def origin_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    """Whether a websocket's ``Origin`` may connect: none given (not a browser), the page's
    own origin (its host is the one connected to), or one of ``server.allowed_origins``
    (``*``: any). Browsers apply no CORS to websockets, so without this check any web page
    could open the results or the camera upload (cross-site websocket hijacking)."""
    origin = ws.headers.get("origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    netloc = urlsplit(origin).netloc.lower()
    # Behind a proxy that rewrites Host, the public host comes as X-Forwarded-Host.
    given = ",".join(ws.headers.get(k, "") for k in ("host", "x-forwarded-host"))
    hosts = {h.strip().lower() for h in given.split(",")}
    return bool(netloc) and netloc in hosts


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def presented_token(conn: Request | WebSocket) -> str | None:
    return _bearer(conn.headers.get("authorization")) or conn.query_params.get("token")


# Declares the bearer scheme in the OpenAPI document, so /docs offers "Authorize" and sends
# the token; the check itself is ``presented_token`` (header or ?token=).
_BEARER = HTTPBearer(auto_error=False, description="the server's --token (when one is set)")


def require_token(
    request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(_BEARER)
) -> None:
    expected = request.app.state.config.server.token
    if not token_matches(expected, presented_token(request)):
        refused(request, "missing or wrong token")
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong token: send 'Authorization: Bearer <token>' or ?token=",
            headers={"WWW-Authenticate": "Bearer"},
        )
