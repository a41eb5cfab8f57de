"""Which requests the explorer answers: the ``Host`` and ``Origin`` checks (DNS rebinding, other sites).

A server on 127.0.0.1 is out of other machines' reach, but not out of the user's browser: any web
page the user opens may send requests to ``http://127.0.0.1:PORT`` (a form post or a ``fetch`` in
"no-cors" mode starts computations and uploads files without reading the answer), and a page whose
domain name is re-pointed at 127.0.0.1 (DNS rebinding) reads the answers too, since the browser then
treats the explorer as that page's own origin. So the app answers only:

* requests whose ``Host`` names a loopback host (``localhost``, ``*.localhost``, 127.0.0.0/8,
  ``[::1]``) or a host the user allowed (``allow_hosts``; ``"*"`` allows every host): a rebound
  domain arrives with its own name in ``Host``;
* requests that change something (not GET / HEAD / OPTIONS) whose ``Origin``, when the browser sends
  one, is the explorer's own (the same host and port as ``Host``) or an allowed host: another site's
  page sends its own origin (``null`` from a sandboxed frame or a file is refused too).

Clients that are not browsers (``curl``, scripts) send no ``Origin`` and pass the second check. A
server bound to a host that is not loopback (``--host 0.0.0.0``, with its warning) is reached by
names the server cannot know: there the ``Host`` check is off unless ``allow_hosts`` names them;
the ``Origin`` check stays (same origin, or an allowed host).
"""
from __future__ import annotations

import ipaddress
import json
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import urlsplit

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_local(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback:
    ``localhost``, a name under ``.localhost`` (RFC 6761), 127.0.0.0/8 or ``::1``."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(netloc: str) -> str:
    """The host of a ``Host`` header value or an origin's netloc, without its port, lower case."""
    parts = urlsplit("//" + netloc.strip())
    try:
        return (parts.hostname or "").rstrip(".").lower()
    except ValueError:  # a malformed port or bracket
        return ""


class HostGuard:
    """ASGI middleware: 403 for a request another site or a rebound domain could have sent (see the
    module's text). ``local``: the server listens on a loopback address (the ``Host`` check is on);
    ``allow_hosts``: host names also answered (``"*"``: all; the checks are off)."""

    def __init__(self, app: ASGIApp, *, local: bool = True, allow_hosts: Optional[Iterable[str]] = None) -> None:
        self.app = app
        allowed = {h.strip().strip("[]").rstrip(".").lower() for h in (allow_hosts or ()) if h.strip()}
        self.any_host = "*" in allowed
        self.allowed = allowed - {"*"}
        self.check_host = local or bool(self.allowed)

    def _allowed_name(self, name: str) -> bool:
        return is_local(name) or name in self.allowed

    def refusal(self, method: str, headers: dict[str, str]) -> Optional[str]:
        """Why this request is refused (``None``: it is answered)."""
        if self.any_host:
            return None
        host = headers.get("host", "")
        name = _hostname(host)
        if self.check_host and not self._allowed_name(name):
            return (f"the explorer answers requests for localhost, not {host or 'a request without a Host'!r} "
                    "(a protection against DNS rebinding); open it at http://127.0.0.1:PORT/, or start it "
                    f"with --allow-host {name or 'NAME'} (Python: allow_hosts=[...]) to answer that name too, "
                    "e.g. behind a proxy")
        origin = headers.get("origin")
        if method in SAFE_METHODS or origin is None:
            return None
        parts = urlsplit(origin)
        if origin != "null" and parts.netloc.lower() == host.lower():
            return None  # the page itself
        if origin != "null" and self._allowed_name(_hostname(parts.netloc)):
            return None
        return (f"the explorer does not take {method} requests from another site's page (Origin {origin!r}); "
                f"allow that host with --allow-host {_hostname(parts.netloc) or 'NAME'} if it is yours")

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        why = self.refusal(scope.get("method", "GET").upper(), headers)
        if why is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": why}).encode("utf-8")
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
