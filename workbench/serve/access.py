"""Who may use the server: an API key, a Host allow-list, JSON-only bodies and CORS (off unless opened).

    app = create_app(engine, model_name="m", access=Access(api_key="sk-...", allowed_hosts=frozenset({"llm.example"})))
    workbench serve engine/ --api-key sk-...  (or WORKBENCH_API_KEY)  --allowed-hosts llm.example  --allowed-origins ...

Three ASGI middlewares (``Access.install``), outermost first, each answering a refusal with OpenAI's error body:

    HostCheck  (400)  the Host header is one of ``allowed_hosts``: a web page that rebinds its own DNS name
                      to 127.0.0.1 sends its own name as Host, so it cannot reach a loopback server
    CORS              only with ``allowed_origins``: browsers on those origins may read responses (Starlette's)
    RequestCheck      /v1 routes need ``Authorization: Bearer <api_key>`` (401; compared in constant time), and
                      a request with a body must be ``application/json`` (415): the "simple" cross-origin POST a
                      page may send without asking (text/plain, a form) never reaches a route

``/health`` and ``/metrics`` need no key, as vLLM's. ``default_allowed_hosts`` is what ``workbench serve``
allows unless told more: the bound address, plus localhost's names when that address is a loopback one, and
any Host on a wildcard address (0.0.0.0, ::), where the server cannot know its public names.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..errors import WorkbenchError
from .openai_api import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Access:
    """The server's access rules. ``api_key``: the bearer token every /v1 request must carry (None: open);
    ``allowed_hosts``: Host header names accepted (None: any); ``allowed_origins``: CORS origins ("*" for any;
    empty: no CORS headers, so browsers on other origins cannot read responses)."""
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise WorkbenchError("the API key is blank; give a non-empty --api-key (or WORKBENCH_API_KEY), or none")
        if self.allowed_hosts is not None:
            hosts = frozenset(h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip())
            object.__setattr__(self, "allowed_hosts", None if "*" in hosts else hosts)

    def install(self, app) -> None:
        """Add these rules to a Starlette/FastAPI ``app`` (the last added runs first)."""
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(RequestCheck, api_key=self.api_key)
        if self.allowed_origins:
            app.add_middleware(CORSMiddleware, allow_origins=list(self.allowed_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"], max_age=600)
        if self.allowed_hosts is not None:
            app.add_middleware(HostCheck, allowed=self.allowed_hosts)


def default_allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names a server bound to ``host`` accepts: ``host`` itself, plus localhost's names on a loopback
    address, plus ``extra``; None (any) on a wildcard address or when ``extra`` holds "*"."""
    name = host.strip().lower().strip("[]")
    if "*" in extra or name in ("", "0.0.0.0", "::"):
        return None
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = False
    return frozenset({name, *(LOOPBACK_NAMES if loopback else ()), *(e.strip().lower() for e in extra)})


def host_name(value: str) -> str:
    """The name of a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``Example.com:80`` -> ``example.com``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _refuse(error: ApiError, scope, receive, send, headers: dict[str, str] | None = None) -> None:
    await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)


class HostCheck:
    """Refuses (400) a request whose Host header is not in ``allowed`` (DNS rebinding)."""

    def __init__(self, app, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and host_name(Headers(scope=scope).get("host", "")) not in self.allowed:
            return await _refuse(ApiError(400, "the Host header names a host this server does not answer for; "
                                               "start it with --allowed-hosts NAME to accept that name",
                                          code="invalid_host"), scope, receive, send)
        await self.app(scope, receive, send)


class RequestCheck:
    """The API key on /v1 routes (401) and JSON bodies on POST (415)."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.expected is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, self.expected):
                return await _refuse(ApiError(401, "a valid API key is required: send the header 'Authorization: "
                                                   "Bearer <key>' with the server's --api-key",
                                              code="invalid_api_key"), scope, receive, send,
                                     {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return await _refuse(ApiError(415, f"the request body must be JSON with the header 'Content-Type: "
                                                   f"application/json', not {media or 'none'!r}",
                                              code="unsupported_media_type"), scope, receive, send)
        await self.app(scope, receive, send)


__all__ = ["Access", "HostCheck", "RequestCheck", "default_allowed_hosts", "host_name"]
