"""Swapping the served model (`--watch`) with one model in memory at a time: requests stop being admitted
(503 with Retry-After), the ones holding the old model finish, the old engine stops, then the new one
starts. Two engines side by side would need twice the memory (the KV cache too) for the whole swap.

`Occupancy` counts the requests that hold the served model and closes the door for a swap; `Holding`
(ASGI middleware) gives each request its model back when its answer, streamed or not, is complete."""

from __future__ import annotations

import threading

from ftq.openai.schema import RequestError


class Swapping(RequestError):
    def __init__(self, retry_after: int):
        super().__init__(f"the served model is being swapped for a new version; retry in {retry_after} s", 503,
                         "server_busy")
        self.retry_after = retry_after


class Occupancy:
    """Requests holding the served model; thread-safe (the swap runs in the watch thread)."""

    def __init__(self):
        self._changed = threading.Condition()
        self.held = 0
        self.swapping = False

    def enter(self) -> bool:
        """False while a swap is under way: the request must not start on either model."""
        with self._changed:
            if self.swapping:
                return False
            self.held += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self.held -= 1
            self._changed.notify_all()

    def drain(self, timeout: float) -> bool:
        """Closes the door and waits until no request holds the model; False if some still did at the timeout."""
        with self._changed:
            self.swapping = True
            return self._changed.wait_for(lambda: self.held == 0, timeout)

    def reopen(self) -> None:
        with self._changed:
            self.swapping = False


HELD = "ftq.held"  # the scope key under which a request keeps what it must give back


class Holding:
    """ASGI middleware: whatever a request took (`hold`) is given back once its response is complete,
    including a stream's last chunk, a client that left, or an error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        releases = scope[HELD] = []
        try:
            await self.app(scope, receive, send)
        finally:
            for release in releases:
                release()


def hold(scope, release) -> None:
    scope[HELD].append(release)
