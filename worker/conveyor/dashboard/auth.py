"""Who may use the dashboard, and proof that an action comes from the dashboard's own page.

A browser logs in once with the token and gets a signed session cookie (HttpOnly,
SameSite=Strict); API clients send the token as a bearer header instead. Sessions are signed,
not stored, so a restart or a second replica keeps everyone logged in, and changing the token
ends every session. An action (POST) made with a session must carry the page's CSRF token, an
HMAC of the session (a synchronizer token that needs no server-side state), and an Origin or
Referer naming the dashboard itself. Bearer requests need no CSRF token and may omit the Origin
(a browser never attaches that header on its own, so a cross-site page cannot forge one), but a
foreign Origin is refused all the same.

Known gap: logging out drops the cookie but cannot revoke it; a copied session cookie works until
it expires (``session_hours``) or the token changes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from conveyor.dashboard.settings import DashboardSettings

COOKIE = "conveyor_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Identity:
    kind: Literal["bearer", "session"]
    csrf: str
    """The CSRF token a session's actions must carry; empty for bearer requests."""


class Guard:
    def __init__(self, settings: DashboardSettings) -> None:
        self._token = settings.token.encode()
        self._key = hmac.new(self._token, b"conveyor dashboard sessions", hashlib.sha256).digest()
        self.lifetime = round(settings.session_hours * 3600)
        self.secure = settings.secure_cookie
        self.extra_origins = frozenset(o.rstrip("/") for o in settings.origins)

    def _sign(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()

    # -- sessions --------------------------------------------------------------------------------

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def new_session(self, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.lifetime)
        body = f"{expires}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._sign('session', body)}"

    def session_valid(self, value: str, now: float | None = None) -> bool:
        body, _, signature = value.rpartition(".")
        expires, _, _ = body.partition(".")
        if not expires.isdigit() or not hmac.compare_digest(signature, self._sign("session", body)):
            return False
        return int(expires) > (time.time() if now is None else now)

    def csrf_for(self, session: str) -> str:
        return self._sign("csrf", session)

    def set_cookie(self, response: Response, session: str) -> None:
        response.set_cookie(
            COOKIE,
            session,
            max_age=self.lifetime,
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )

    # -- requests --------------------------------------------------------------------------------

    def identify(self, request: Request) -> Identity | None:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            # A wrong bearer token is refused outright, never rescued by a cookie.
            return Identity("bearer", "") if self.token_matches(credential.strip()) else None
        session = request.cookies.get(COOKIE, "")
        if session and self.session_valid(session):
            return Identity("session", self.csrf_for(session))
        return None

    def require(self, request: Request, *, action: bool = False) -> Identity:
        """The caller's identity; raises 401 without one, 403 for an unsafe action."""
        identity = self.identify(request)
        if identity is None:
            raise HTTPException(401, "log in, or send the token as 'Authorization: Bearer'")
        if action:
            if not self.same_origin(request, required=identity.kind == "session"):
                raise HTTPException(403, "cross-origin request refused")
            given = request.headers.get(CSRF_HEADER, "")
            if identity.kind == "session" and not hmac.compare_digest(given, identity.csrf):
                raise HTTPException(403, "missing or wrong CSRF token")
        return identity

    def same_origin(self, request: Request, *, required: bool) -> bool:
        """Whether the request's Origin (or Referer) is the dashboard itself.

        The dashboard's own origin is matched on host and port only: behind a proxy that ends
        TLS the app sees http while the browser says https, and the host alone already names
        the site. Other origins must be listed in full in the settings.
        """
        origin = request.headers.get("origin")
        if origin is None and "referer" in request.headers:
            parts = urlsplit(request.headers["referer"])
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin is None:
            return not required
        origin = origin.rstrip("/")
        if origin in self.extra_origins:
            return True
        host = request.headers.get("host", "")
        return bool(host) and urlsplit(origin).netloc == host
