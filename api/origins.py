"""Browsers: which web pages may call this server (Origin, CORS) and under which names (Host).

A server on 127.0.0.1 is reachable by every page the user opens. Without these checks a page
on any site can POST ``text/plain`` (no preflight) to /api/pull or /api/delete, and a
DNS-rebinding page (a foreign name that resolves to 127.0.0.1) can even read the answers. We
follow Ollama's rules so its users' settings keep their meaning:

* A request with an ``Origin`` that is not allowed gets 403 before anything else runs, for
  every method and path. Allowed by default: http/https on localhost, 127.0.0.1, 0.0.0.0 (and
  [::1]) on any port, and the desktop-app schemes (app://, file://, tauri://, vscode-webview://,
  vscode-file://). OLLAMA_ORIGINS and VLLAMA_ORIGINS add more, comma-separated; an entry may
  hold one ``*`` (``https://*.example.com``, ``chrome-extension://*``); ``*`` alone allows all.
* An ``Origin`` equal to ``http://<Host>`` or ``https://<Host>`` is a same-origin request (say,
  the API's own /docs page), not a cross-origin one: it passes without CORS headers.
* Allowed cross-origin requests get ``Access-Control-Allow-Origin`` (the origin echoed) and
  ``Vary: Origin``; their preflights (``OPTIONS``) answer 204 here, before authentication,
  since a browser sends no credentials with a preflight.
* When the API listens on a loopback address only, a request whose ``Host`` is not a local
  name or address gets 403: that is how a DNS-rebinding page shows itself. Allowed: no Host,
  localhost, the machine's host name, names under .localhost/.local/.internal, and loopback,
  private, unspecified or this machine's own addresses. Listening on 0.0.0.0 or a network
  address turns this check off (the server is then meant to be reached under other names).

Plain ASGI: it only adds headers to the start of a response, so streamed bodies pass as they
are produced.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

# Ollama's defaults (envconfig.AllowedOrigins), plus IPv6 loopback.
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
DEFAULT_ORIGINS: tuple[str, ...] = tuple(
    f"{scheme}://{host}{port}" for host in _LOCAL_HOSTS for port in ("", ":*") for scheme in ("http", "https")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")

ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
# Ollama's list (what its own, OpenAI's and Anthropic's browser clients send), so that a
# preflight for any of them is granted.
ALLOW_HEADERS = ",".join((
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
    "Openai-Beta", "Openai-Organization", "Openai-Project",
    "X-Stainless-Arch", "X-Stainless-Async", "X-Stainless-Custom-Poll-Interval", "X-Stainless-Helper-Method",
    "X-Stainless-Lang", "X-Stainless-Os", "X-Stainless-Package-Version", "X-Stainless-Poll-Helper",
    "X-Stainless-Retry-Count", "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Timeout",
    "X-Api-Key", "Anthropic-Version", "Anthropic-Beta", "Anthropic-Dangerous-Direct-Browser-Access",
))
MAX_AGE_S = 12 * 3600  # how long a browser may cache a granted preflight

# Names a DNS-rebinding page cannot take: they never resolve through public DNS to the attacker.
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


@dataclass(frozen=True)
class OriginRules:
    """Allowed origins: exact ones, and ``prefix*suffix`` patterns."""

    allow_all: bool
    exact: frozenset[str]
    patterns: tuple[tuple[str, str], ...]

    def allows(self, origin: str) -> bool:
        if self.allow_all or origin in self.exact:
            return True
        return any(len(origin) >= len(pre) + len(suf) and origin.startswith(pre) and origin.endswith(suf)
                   for pre, suf in self.patterns)


def parse_origins(entries: Iterable[str]) -> OriginRules:
    """Build the rules, failing at start on an entry that could never match a browser's
    Origin (a name without its scheme, two ``*``), naming the settings to fix."""
    exact: set[str] = set()
    patterns: list[tuple[str, str]] = []
    allow_all = False
    for raw in entries:
        entry = raw.strip().lower().rstrip("/")
        if not entry:
            continue
        if entry == "*":
            allow_all = True
        elif entry.count("*") > 1:
            raise ValueError(f"VLLAMA_ORIGINS/OLLAMA_ORIGINS entry {raw.strip()!r} has more than one '*'; "
                             "write one pattern per origin, e.g. https://*.example.com")
        elif "*" in entry:
            pre, _, suf = entry.partition("*")
            patterns.append((pre, suf))
        elif "://" not in entry:
            raise ValueError(f"VLLAMA_ORIGINS/OLLAMA_ORIGINS entry {raw.strip()!r} is not an origin: write it "
                             f"with its scheme, e.g. https://{entry}")
        else:
            exact.add(entry)
    return OriginRules(allow_all, frozenset(exact), tuple(patterns))


def configured_origins(settings_origins: str, environ: Mapping[str, str] = os.environ) -> OriginRules:
    """Ollama's defaults plus VLLAMA_ORIGINS (``settings_origins``) plus OLLAMA_ORIGINS."""
    extra = f"{settings_origins},{environ.get('OLLAMA_ORIGINS', '')}".split(",")
    return parse_origins([*extra, *DEFAULT_ORIGINS])


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback_bind(host: str) -> bool:
    """Whether the API listens on a loopback address only (then it checks Host headers)."""
    if host.strip().lower() == "localhost":
        return True
    addr = _ip(host.strip())
    return addr is not None and addr.is_loopback


_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


@lru_cache(maxsize=1)
def _machine_addresses() -> frozenset[str]:
    """This machine's own addresses (by its host name), looked up once and only when a Host
    header holds a public address, which a loopback-bound server rarely sees."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return frozenset()
    return frozenset(str(_ip(info[4][0])) for info in infos)


def split_host(header: str) -> str:
    """The name or address in a Host header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def host_allowed(header: str) -> bool:
    """Ollama's rule for a server bound to loopback: local names and local addresses only."""
    host = split_host(header)
    addr = _ip(host)
    if addr is not None:
        return (addr.is_loopback or addr.is_unspecified or any(addr in net for net in _PRIVATE
                if net.version == addr.version) or str(addr) in _machine_addresses())
    host = host.removesuffix(".")
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    return host.endswith(_LOCAL_SUFFIXES)


class BrowserGuard:
    """ASGI middleware enforcing the Origin and Host rules above; install it outermost."""

    def __init__(self, app: ASGIApp, origins: OriginRules, check_host: bool, bind: str = "") -> None:
        self.app = app
        self.check_host = check_host
        self.bind = bind
        # Clients send the same few values over and over; parsing addresses costs ~10 us.
        self._origin_ok = lru_cache(maxsize=1024)(origins.allows)
        self._host_ok = lru_cache(maxsize=1024)(host_allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        origin = headers.get("origin", "")
        host = headers.get("host", "")
        cross = bool(origin) and origin not in (f"http://{host}", f"https://{host}")
        if cross and not self._origin_ok(origin):
            await self._forbid(scope, receive, send, self._origin_message(origin))
            return
        if cross and scope["method"] == "OPTIONS":
            await _preflight(origin, headers)(scope, receive, send)
            return
        if self.check_host and not self._host_ok(host):
            await self._forbid(scope, receive, send, self._host_message(host))
            return
        if not cross:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"access-control-allow-origin"]
                raw.append((b"access-control-allow-origin", origin.encode("latin-1")))
                raw.append((b"vary", b"Origin"))
                message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, with_cors)

    @staticmethod
    async def _forbid(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        await error_response(Request(scope), message, 403)(scope, receive, send)

    @staticmethod
    def _origin_message(origin: str) -> str:
        return (f"requests from the web page origin {origin!r} are not allowed: a page may call this server "
                f"only from an allowed origin; to allow this one, set OLLAMA_ORIGINS={origin} (or "
                "VLLAMA_ORIGINS; comma-separated, '*' wildcards such as https://*.example.com) and restart")

    def _host_message(self, host: str) -> str:
        return (f"requests for host {split_host(host)!r} are not allowed: this server listens on the loopback "
                f"address {self.bind} and answers only requests addressed to localhost or a local address "
                "(a guard against DNS rebinding); call it as http://localhost:<port> (a reverse proxy on this "
                "machine should send 'Host: localhost'), or, to serve other names, listen on a network "
                "address with VLLAMA_HOST (or OLLAMA_HOST), e.g. 0.0.0.0")


def _headers(scope: Scope) -> dict[str, str]:
    """The first value of each request header we read (names are lower case in ASGI)."""
    out: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        name = key.decode("latin-1")
        if name in ("origin", "host", "access-control-request-private-network"):
            out.setdefault(name, value.decode("latin-1"))
    return out


def _preflight(origin: str, headers: Mapping[str, str]) -> Response:
    """204 granting Ollama's methods and headers to an allowed origin."""
    response = Response(status_code=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": str(MAX_AGE_S),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    })
    if headers.get("access-control-request-private-network", "").lower() == "true":
        # An explicitly allowed page on a public address asks to reach this local server.
        response.headers["Access-Control-Allow-Private-Network"] = "true"
    return response


def install_browser_guard(app: Starlette, settings_origins: str, bind_host: str) -> None:
    """Add the guard as the outermost user middleware, so it runs before authentication and
    every other check; call it after the app's other ``add_middleware`` calls."""
    app.add_middleware(BrowserGuard, origins=configured_origins(settings_origins),
                       check_host=is_loopback_bind(bind_host), bind=bind_host)
