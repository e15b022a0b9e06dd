"""OpenAI's API as ftq speaks it: request schemas and limits (`schema`), exact-logprob completions from an
in-process runtime (`scoring`) and the small completions app lm-eval talks to (`completions`). The
gateway (`ftq serve`), the MLflow pyfunc and evaluation share these, so evaluation depends on them and on
the runtimes, never on the gateway."""
