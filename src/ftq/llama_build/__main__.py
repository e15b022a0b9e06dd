"""`python -m ftq.llama_build smoke [--model GGUF] [--server BINARY]`: make install's last step."""

from __future__ import annotations

import argparse
import sys

from ftq.llama_build import SmokeFailed, smoke


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftq.llama_build")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("smoke", help="evaluate a batch through llama-cpp-python and llama-server")
    check.add_argument("--model", help="a GGUF file (default: the embedded SmolLM2 model)")
    check.add_argument("--server", help="a llama-server binary (default: the venv's, or $FTQ_LLAMA_SERVER)")
    args = parser.parse_args(argv)
    try:
        probes = smoke(args.model, args.server)
    except SmokeFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for probe in probes:
        print(f"llama.cpp smoke test: {probe.name} evaluated {probe.tokens} tokens in one batch "
              f"({probe.tokens / max(probe.seconds, 1e-9):.0f} tok/s)")
    print(f"llama.cpp smoke test: both load {', '.join(p.rsplit('/', 1)[-1] for p in _libraries(probes[0]))} "
          f"from {probes[0].libraries and probes[0].libraries[0].rsplit('/', 1)[0]}")
    return 0


def _libraries(probe):
    from ftq.llama_build import _llama_libraries

    return _llama_libraries(probe.libraries)


if __name__ == "__main__":
    sys.exit(main())
