"""Prometheus metrics for `ftq serve` (GET /metrics, text format), named like vLLM's where they mean
the same: requests by route and status, prompt and generated tokens, running and waiting requests,
request latency and time to first token."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, gate):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ftq_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.prompt_tokens = Counter("ftq_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.generation_tokens = Counter("ftq_generation_tokens", "Tokens generated", registry=r)
        self.disconnects = Counter("ftq_client_disconnects", "Generations stopped because the client left",
                                   registry=r)
        self.latency = Histogram("ftq_request_latency_seconds", "Generation request latency, admission to last token",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("ftq_time_to_first_token_seconds", "Admission to first generated text",
                                     buckets=LATENCY_BUCKETS, registry=r)
        Gauge("ftq_requests_running", "Requests holding an engine slot", registry=r).set_function(lambda: gate.active)
        Gauge("ftq_requests_waiting", "Requests waiting for a slot", registry=r).set_function(lambda: gate.queued)
        Gauge("ftq_slots", "Sequences the engine decodes together", registry=r).set_function(lambda: gate.slots)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class Counted:
    """ASGI middleware: every answer counted by route and status (a pure ASGI wrapper: Starlette's
    BaseHTTPMiddleware would sit between a streaming response and the client's disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")
                self.metrics.requests.labels(getattr(route, "path", "other"), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted_send)
