"""What a request must show before any route sees it, against the attacks a server on a desktop meets:

- a Host this server answers to: with DNS rebinding, a web page's own name comes to point at 127.0.0.1,
  and the browser lets it read the answers; its requests still carry that name as Host;
- no foreign browser Origin: any page the user opens may send requests to a loopback server (and a
  `text/plain` POST needs no CORS preflight); the chat page this server serves is same-origin;
- JSON bodies on POST (415 otherwise): a cross-site `application/json` request needs a preflight, which
  this server does not grant to a foreign origin;
- the API key, where one is set, on the API, the tokenizer endpoints and /openapi.json.

The checks are pure functions of the headers (`refusal`), applied by one ASGI middleware (`Guard`)."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from starlette.requests import Request

from ftq.openai.schema import RequestError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class Policy:
    hosts: frozenset[str]  # Host names (no port) accepted
    origins: frozenset[str]  # browser origins accepted besides the server's own ("scheme://host[:port]")
    ip_literals: bool = False  # any IP address as Host (a wildcard bind: clients reach it by the machine's IPs)
    any_host: bool = False  # --allowed-host '*': no Host check (a proxy in front checks it)

    @classmethod
    def for_bind(cls, bind: str, hosts=(), origins=()) -> "Policy":
        """The bound name and the loopback names, plus what --allowed-host and --allowed-origin add."""
        bind = bind.strip("[]").lower()
        names = {*LOOPBACK_NAMES, *(h.strip().lower() for h in hosts)}
        if bind not in WILDCARDS:
            names.add(bind)
        return cls(frozenset(names - {"*"}), frozenset(o.strip().lower().rstrip("/") for o in origins),
                   ip_literals=bind in WILDCARDS, any_host="*" in hosts)


def host_name(header: str) -> str:
    """A Host header's name: 'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(policy: Policy, header: str | None) -> bool:
    if header is None or policy.any_host:  # no Host at all: an HTTP/1.0 script; every browser sends one
        return True
    name = host_name(header)
    # an IP literal cannot be rebound: a rebinding page's requests carry its own domain name
    return name in policy.hosts or (policy.ip_literals and is_ip(name))


def origin_allowed(policy: Policy, origin: str | None, host: str | None) -> bool:
    if origin is None:  # not a browser, or a browser's same-origin GET
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in policy.origins or "*" in policy.origins:
        return True
    scheme, _, authority = origin.partition("://")
    # same origin: a page this server served (the chat page) calling its own API ("null" never matches)
    return scheme in ("http", "https") and host is not None and authority == host.strip().lower()


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


def refusal(policy: Policy, method: str, headers: dict[str, str]) -> RequestError | None:
    """Why a request is refused before any route sees it, or None. `headers`: lower-case names."""
    host = headers.get("host")
    if not host_allowed(policy, host):
        return RequestError(f"Host {host!r} is not a name this server answers to; start it with --allowed-host "
                            f"NAME to accept it", 400)
    origin = headers.get("origin")
    if not origin_allowed(policy, origin, host):
        return RequestError(f"Origin {origin!r} may not call this server; start it with --allowed-origin "
                            f"{origin} to accept it", 403, "permission_error")
    if method in BODY_METHODS and not is_json(headers.get("content-type")):
        return RequestError(f"Content-Type must be application/json, not {headers.get('content-type')!r}", 415,
                            "unsupported_media_type")
    return None


class Guard:
    """ASGI middleware applying `refusal` to every HTTP request."""

    def __init__(self, app, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refused = refusal(self.policy, scope["method"], headers)
            if refused is not None:
                return await answer(send, refused)
        await self.app(scope, receive, send)


async def answer(send, error: RequestError) -> None:
    import orjson

    from ftq.openai.schema import error_body

    body = orjson.dumps(error_body(error))
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def protect(app, policy: Policy) -> None:
    """The guard, and CORS answers for the origins --allowed-origin lists (their pages need the preflight)."""
    if policy.origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sorted(policy.origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, policy=policy)


class KeyCheck:
    """The API key, where one is set: `Authorization: Bearer KEY`, compared in constant time."""

    def __init__(self, api_key: str | None):
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def keyed(self, request: Request) -> bool:
        return self.expected is None or hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                            self.expected)

    def authorize(self, request: Request) -> None:
        if not self.keyed(request):
            raise RequestError("missing or wrong API key (Authorization: Bearer ...)", 401, "authentication_error")


def add_openapi(app, key: KeyCheck) -> None:
    """/openapi.json behind the key (FastAPI's own is public): it lists every route the key protects."""
    from fastapi.responses import JSONResponse

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request):
        key.authorize(request)
        return JSONResponse(app.openapi())
