"""`--cors-allowed-origins` (smg 1.13): browsers on the listed origins may call the gateway.

Only requests whose `Origin` is allowed get CORS headers; others are served as before (a browser
then blocks the answer, which is the point). A preflight (`OPTIONS` with
`Access-Control-Request-Method`) from an allowed origin is answered here, 204, without reaching
a route: any method and the requested headers are allowed, as smg's permissive layer does, and
the answer may be cached for 10 minutes. `*` alone allows every origin.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDict

PREFLIGHT_MAX_AGE_SECS = 600


class CorsPolicy:
    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.rstrip("/") for o in origins)

    def allows(self, origin: str) -> bool:
        return self._any or origin.rstrip("/") in self._origins

    def headers(self, origin: str) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Access-Control-Allow-Origin"] = "*" if self._any else origin
        if not self._any:
            headers["Vary"] = "Origin"  # the answer differs by origin: caches must key on it
        return headers

    def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to an allowed preflight, or None when `request` is not one."""
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None or \
                "Access-Control-Request-Method" not in request.headers or \
                not self.allows(origin):
            return None
        headers = self.headers(origin)
        headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            headers["Access-Control-Allow-Headers"] = requested
        headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_SECS)
        return web.Response(status=204, headers=headers)

    def decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS headers to an answer whose headers are not sent yet."""
        origin = request.headers.get("Origin")
        if origin is not None and self.allows(origin) and not response.prepared:
            response.headers.update(self.headers(origin))
