"""What keeps the gateway standing under ordinary clients: a bounded wait for the engine's slots (a full
queue answers 503 with Retry-After instead of growing without end), a request-body limit enforced before
anything is parsed (413), and streams that close their engine request when the client goes away."""

from __future__ import annotations

import asyncio
import json
import math

import anyio

from starlette.responses import StreamingResponse

from ftq.openai.schema import RequestError


class Gate:
    """`slots` requests run at once (the engine's parallel sequences), up to `max_queued` more wait."""

    def __init__(self, slots: int, max_queued: int):
        self.slots = slots
        self.max_queued = max_queued
        self.active = 0
        self.queued = 0
        self._free = asyncio.Semaphore(slots)
        self.mean_seconds = 1.0  # a running mean of how long a slot is held, for Retry-After

    def admit(self) -> "Ticket":
        if self.active + self.queued >= self.slots + self.max_queued:
            raise Busy(self.retry_after())
        self.queued += 1
        return Ticket(self)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.mean_seconds * (self.queued + 1) / self.slots))


class Busy(RequestError):
    def __init__(self, retry_after: int):
        super().__init__(f"server busy: every slot is taken and the wait queue is full; retry in {retry_after} s",
                         503, "server_busy")
        self.retry_after = retry_after


class Ticket:
    """A place in the queue; `async with ticket:` waits for a slot and holds it. A ticket that is never
    entered must be `drop`ped (the request failed before it ran)."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.waiting = True
        self.started = 0.0

    def drop(self) -> None:
        if self.waiting:
            self.waiting = False
            self.gate.queued -= 1

    async def __aenter__(self):
        try:
            await self.gate._free.acquire()
        finally:
            self.drop()  # cancelled (the client left) or admitted: no longer in the queue
        self.gate.active += 1
        self.started = asyncio.get_running_loop().time()
        return self

    async def __aexit__(self, *exc):
        gate = self.gate
        gate.active -= 1
        gate._free.release()
        held = asyncio.get_running_loop().time() - self.started
        gate.mean_seconds = 0.9 * gate.mean_seconds + 0.1 * held


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a declared Content-Length over the limit gets 413 before the body is read; a body
    that turns out larger while it is read (chunked uploads) is cut off with 413 as well."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self.refuse(send)

    async def refuse(self, send) -> None:
        body = json.dumps({"error": {"message": f"request body is larger than this server's limit of "
                                                f"{self.max_bytes} bytes", "type": "invalid_request_error",
                                     "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ClosingStream(StreamingResponse):
    """A streaming response that always closes its generator and gives its ticket back: Starlette cancels
    the sending task when the client disconnects, and a generator suspended at `yield` would otherwise
    keep its engine request (and slot) until the garbage collector happens to close it. A client that
    left before the first chunk has the sending task cancelled before it starts: the generator never
    runs, so its own `finally` cannot be what frees the place in the queue."""

    def __init__(self, content, ticket: "Ticket", **kwargs):
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.drop()  # still queued (or never started): the place is free at once
            with anyio.CancelScope(shield=True):  # cleanup must run even though the task is being cancelled
                await self.body_iterator.aclose()


async def until_disconnected(receive) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
