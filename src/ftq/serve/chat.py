"""`ftq chat`: a multi-turn chat in the terminal, streaming, with /reset and /exit."""

from __future__ import annotations

import sys

from ftq.registry.resolve import resolve

HELP = "commands: /reset (new conversation), /exit (quit)"


def chat(model_uri: str, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7,
         params: dict | None = None, stdin=None, stdout=None) -> int:
    from ftq.runtimes import open_model

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    resolved = resolve(model_uri, params)
    runtime = open_model(resolved.path)
    version = f" version {resolved.version}" if resolved.version else ""
    stdout.write(f"ftq chat: {resolved.name}{version} ({runtime.kind}). {HELP}\n")
    history = [{"role": "system", "content": system}] if system else []
    try:
        while True:
            stdout.write("you> ")
            stdout.flush()
            line = stdin.readline()
            if not line:  # end of input
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history = history[:1] if system else []
                stdout.write("(new conversation)\n")
                continue
            if text.startswith("/"):
                stdout.write(f"unknown command {text}; {HELP}\n")
                continue
            history.append({"role": "user", "content": text})
            stdout.write("model> ")
            reply = ""
            for piece in runtime.stream_chat(history, max_new_tokens=max_tokens, temperature=temperature):
                reply += piece
                stdout.write(piece)
                stdout.flush()
            stdout.write("\n")
            history.append({"role": "assistant", "content": reply.strip()})
    finally:
        runtime.close()
    return 0
