"""The pyfunc flavor of ftq's logged models: MLflow calls `_load_pyfunc` for
`mlflow.pyfunc.load_model("models:/NAME@champion")` and for
`mlflow models serve -m models:/NAME@champion --env-manager local`.

Chats are answered by ftq's own runtimes (llama.cpp for GGUF, transformers for HF/AWQ/GPTQ) and come
back in OpenAI's chat.completion shape; requests are validated exactly like `ftq serve`'s
`/v1/chat/completions`:

    model.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0})
    -> {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": ...}, ...}], "usage": ...}

A list of requests (or a DataFrame with a `messages` column) gives a list of responses.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any

from ftq.registry import differences, file_hashes


def _load_pyfunc(data_path: str) -> ChatModel:
    return ChatModel(Path(data_path))


def check_build(folder: Path, manifest: dict) -> None:
    """The build's files against its own manifest: catches a corrupt or partial copy. (`ftq serve`
    verifies against the registry's tags; MLflow's loader does not know which version it loads.)"""
    from mlflow.exceptions import MlflowException

    recorded = {path: f["sha256"] for path, f in manifest["files"].items()}
    problems = differences(file_hashes(folder, skip=("manifest.json",)), recorded, "manifest.json")
    if problems:
        raise MlflowException(f"{folder}: the downloaded model is corrupt: {'; '.join(problems)}")


class ChatModel:
    def __init__(self, folder: Path):
        from ftq.runtimes import open_model

        manifest = json.loads((folder / "manifest.json").read_text())
        check_build(folder, manifest)
        self.name = manifest.get("name") or folder.name
        self.runtime = open_model(folder / manifest.get("artifact", ""))
        atexit.register(self.runtime.close)  # before the interpreter tears down llama.cpp's bindings

    def predict(self, model_input: Any, params: dict | None = None) -> dict | list[dict]:
        import pandas

        if isinstance(model_input, pandas.DataFrame):
            return [self.answer({**row, **(params or {})}) for row in model_input.to_dict("records")]
        if isinstance(model_input, list):
            return [self.answer({**request, **(params or {})}) for request in model_input]
        return self.answer({**model_input, **(params or {})})

    def answer(self, request: dict) -> dict:
        from mlflow.exceptions import MlflowException

        from ftq.openai.schema import (ChatRequest, Limits, RequestError, chat_arguments, completion_response, new_id,
                                       validate)

        try:
            body = validate(ChatRequest, request)
            if body.stream:
                raise RequestError("stream: not supported through MLflow's pyfunc (use ftq serve for streaming)")
            arguments = chat_arguments(body, Limits())
        except ValueError as exc:  # RequestError, and stop_list's
            raise MlflowException.invalid_parameter_value(f"chat request: {exc}") from exc
        text = "".join(self.runtime.stream_chat(**arguments))
        return completion_response("chat.completion", new_id("chat.completion"), self.name, text,
                                   self.runtime.prompt_tokens(arguments["messages"]),
                                   self.runtime.count_tokens(text), arguments["max_new_tokens"])
