"""Serving: resolve a model reference (registry alias, version or local path), start the batching engine
its format needs (`ftq.engines`) behind an OpenAI-compatible gateway with a web chat page (`ftq serve`),
or chat in the terminal with the in-process runtime (`ftq chat`)."""

# the serving defaults, in one place (the CLI, `serve` and the gateway read them)
PARALLEL = 8  # requests the engine decodes together
MAX_QUEUED = 64  # requests that may wait for a slot before 503
CTX_SIZE = 4096  # tokens per sequence; the engine's KV cache holds PARALLEL x CTX_SIZE
API_KEY_ENV = "FTQ_API_KEY"  # the gateway's key, read from the environment (or a file) rather than a command line
