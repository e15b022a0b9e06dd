"""Serving: resolve a model reference (registry alias, version or local path), load it with the runtime
its format needs, and serve an OpenAI-compatible API and a web chat page (`ftq serve`), or chat in the
terminal (`ftq chat`)."""
