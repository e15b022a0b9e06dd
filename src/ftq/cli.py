"""The `ftq` command line. Each stage has a thin subcommand over its `run(params)`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ftq import __version__

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _params(args):
    from ftq.params import load_params

    return load_params(args.params)


def _params_if_any(args) -> dict:
    """serve and chat also run outside a project (a second machine that only reaches the tracking
    server): no params.yaml there means no params."""
    from ftq.params import repo_root

    if args.params or (repo_root() / "params.yaml").exists():
        return _params(args)
    return {}


def cmd_run(args) -> int:
    from ftq.pipeline import run_pipeline

    return run_pipeline(args.targets, args.exp, args.set_param, args.name, args.force)


def cmd_params(args) -> int:
    from ftq.defaults import effective, explain, parse_overrides, render

    if args.explain:
        print(explain(args.blocks))
        return 0
    print(render(effective(_params(args), parse_overrides(args.set_param), args.blocks or None)))
    return 0


def cmd_base_run(args) -> int:
    from ftq.stages import base

    base.run(_params(args))
    return 0


def cmd_base_ask(args) -> int:
    from ftq.stages import base

    folder = Path(args.model_dir) if args.model_dir else None
    info = base.info(folder)
    print(f"model: {info['source']} ({info['architecture']}, {info['num_parameters']:,} parameters, {info['dtype']})")
    print(f"user: {args.prompt}")
    print(f"assistant: {base.ask(args.prompt, folder, args.max_new_tokens)}")
    return 0


def cmd_prepare(args) -> int:
    from ftq.stages import prepare

    result = prepare.run(_params(args))
    report = result.report
    print(
        f"prepared {report['train']['examples']} train / {report['eval']['examples']} eval examples "
        f"({report['rejected']} rejected, {report['duplicates']} duplicates) -> {result.output_dir}"
    )
    return 0


def cmd_train(args) -> int:
    from ftq.stages import train

    argv = ["train"] + (["--params", str(Path(args.params).resolve())] if args.params else [])
    result = train.run(_params(args), argv)
    if result is not None:
        report = result.report
        print(
            f"trained {report['steps']} steps ({report['method']}): train loss {report['train_loss_first_tenth']} -> "
            f"{report['train_loss_last_tenth']} (first/last tenth), eval loss {report['initial_eval_loss']} -> "
            f"{report['eval_loss']}, {report['real_tokens_per_second']} real tokens/s -> {result.output_dir}"
        )
    return 0


def cmd_preference(args) -> int:
    from ftq.stages import preference

    result = preference.run(_params(args))
    report = result.report
    if report["objective"] == "none":
        print("preference.objective none: nothing to tune; merge takes train's output")
        return 0
    held = report["held_out"] or {}
    accuracy = held.get("pref_accuracy", {})
    print(f"{report['objective']} ({report['method']}, from {report['start_from']}): {report['steps']} steps, loss "
          f"{report['first_loss']} -> {report['final_loss']}; held-out pref_accuracy {accuracy.get('mean')} "
          f"{accuracy.get('interval')} on {held.get('pairs', 0)} pairs -> {result.output_dir}")
    return 0


def cmd_merge(args) -> int:
    from ftq.stages import merge

    report = merge.run(_params(args)).report
    print(
        f"merged ({report['method']}, {report['dtype']}, {report['shards']} shard(s), {report['size_bytes']:,} bytes): "
        f"residual {report['merge_residual_max_abs']:.3g} = {100 * report['residual_ratio']:.3g} % of the adapter's "
        f"effect {report['adapter_effect_max_abs']:.3g} (allowed {100 * report['max_residual_ratio']:g} %), top-1 agreement "
        f"{report['top1_agreement']:.4f} -> models/merged"
    )
    return 0


def cmd_reference(args) -> int:
    from ftq.stages import reference

    meta = reference.run(_params(args))
    print(f"reference: merged's next-token distribution at {meta['positions']} answer positions "
          f"({meta['sequences']['samples']} held-out examples, top {meta['top_k']}), perplexity "
          f"{meta['perplexity']:.3f} -> models/reference")
    return 0


def cmd_imatrix(args) -> int:
    from ftq.stages import imatrix

    info = imatrix.run(_params(args))
    print(f"imatrix: {info['chunks']} chunks from {info['sample']['samples']} training conversations "
          f"({info['tokens']} tokens), {info['seconds']:.1f} s -> models/imatrix/{imatrix.MATRIX}")
    return 0


def cmd_benchmark_data(args) -> int:
    from ftq.stages import benchmark_data

    for task, entry in benchmark_data.run(_params(args)).items():
        print(f"{task}: {entry['path']}, {entry['items']} items, {len(entry['indices'])} sampled, sha256 "
              f"{entry['sha256'][:12]}" if entry["present"] else f"{task}: {entry['note']}")
    print(f"-> {benchmark_data.MANIFEST}")
    return 0


def cmd_machine(args) -> int:
    from ftq import layout
    from ftq.stages import machine

    recorded = machine.run(_params(args))
    print(f"{recorded['device']}, native bf16: {recorded['native_bf16']} -> {layout.MACHINE}")
    return 0


def cmd_quantize(args) -> int:
    from ftq import schema
    from ftq.stages import quantize

    params = _params(args)
    names = args.builds or schema.settings(params, "quantize")["enabled"]
    if not names:
        from ftq.errors import UsageError

        raise UsageError("no build named and quantize.enabled is empty")
    for name in names:
        manifest = quantize.run(params, name).manifest
        check = manifest["check"]
        print(
            f"{name} ({manifest['method']}): {manifest['size_bytes']:,} bytes ({manifest['compression_ratio']}x smaller), "
            f"KL divergence from merged mean {check['kld_mean']:.4f} / p99 {check['kld_p99']:.3f}, top-1 agreement "
            f"{100 * check['top1_agreement']:.1f} %, perplexity {check['perplexity_ratio']:.3f}x merged, "
            f"{manifest['build_seconds']} s -> models/quantized/{name}"
        )
    return 0


def cmd_evaluate(args) -> int:
    from ftq import layout
    from ftq.stages import evaluate

    for name in args.candidates:
        report = evaluate.run(_params(args), name)
        task = ", ".join(f"{k[5:]} {v}" for k, v in report.items() if k.startswith("task_") and not k.endswith("examples")
                         and not k.endswith("_ci95"))
        print(f"{name} ({report['runtime']}): {task}; perplexity {report['perplexity']}; "
              f"{report['tokens_per_second']} tok/s, TTFT {report['ttft_seconds_p50']} s -> {layout.eval_dir(name) / name}.json")
    return 0


def cmd_ladder(args) -> int:
    from ftq.stages import ladder

    report = ladder.run(_params(args))
    for rung in report["rungs"]:
        test = rung.get("test")
        state = (f"{test['outcome']} (p = {test['p_value']:.3g})" if test else
                 rung.get("why") or ("evaluated in full" if rung["evaluated"] else "not evaluated"))
        print(f"{rung['name']}: {rung['size_bytes']:,} bytes, KLD {rung['kld_mean']:.4f}: {state}")
    print(f"pick: {report['walk'].get('pick', '-')} ({report['walk']['procedure']}) -> {ladder.REPORT}")
    return 0


def cmd_compare(args) -> int:
    from ftq.stages import compare

    result = compare.run(_params(args))
    print(f"compared {', '.join(result['candidates'])} -> reports/compare.md, reports/compare.html")
    return 0


def cmd_promote(args) -> int:
    from ftq.stages import promote

    report = promote.run(_params(args))
    for row in report["candidates"]:
        print(f"{row['name']}: version {row['version']}, {row['status']}: {'; '.join(row['reasons'])}")
    champion = report["champion"]
    print(f"models:/{report['model_name']}@champion -> version {champion['version']} ({champion['note']})")
    return 0


def cmd_serve(args) -> int:
    from ftq.openai.schema import Limits
    from ftq.serve.guard import Policy
    from ftq.serve.server import COMMAND_LINE_KEY, api_key_of, serve

    if args.api_key:
        print(f"warning: {COMMAND_LINE_KEY}", file=sys.stderr)
    api_key = api_key_of(args.api_key, args.api_key_file)
    limits = Limits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                    max_body_bytes=args.max_body_bytes)
    policy = Policy.for_bind(args.host, args.allowed_host, args.allowed_origin)
    serve(args.model, args.host, args.port, api_key, args.watch, _params_if_any(args), limits, args.threads,
          args.parallel, args.max_queued, args.ctx_size, policy)
    return 0


def cmd_chat(args) -> int:
    from ftq.serve.chat import chat

    return chat(args.model, args.system, args.max_tokens, args.temperature, _params_if_any(args))


def cmd_data_check(args) -> int:
    from ftq.data.check import check_file
    from ftq.data.formats import FormatSpec

    from ftq.errors import UsageError

    try:
        columns = json.loads(args.columns) if args.columns else None
        tags = json.loads(args.tags) if args.tags else None
        spec = FormatSpec.build(args.format, columns, tags)
    except ValueError as exc:
        raise UsageError(f"--columns/--tags: {exc}") from exc
    result = check_file(args.file, spec)
    for error in result.errors[: args.max_errors]:
        print(error)
    if len(result.errors) > args.max_errors:
        print(f"... and {len(result.errors) - args.max_errors} more errors")
    summary = result.summary()
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["rejects_by_reason"].items())) or "none"
    print(
        f"{args.file}: {summary['records']} records, {summary['valid']} valid, {summary['rejected']} rejected "
        f"({reasons}), duplicates dropped: {summary['duplicates']}"
    )
    return 1 if result.errors else 0


def cmd_data_make_default(args) -> int:
    from ftq.data import default_set, preference_set, tool_set

    for path in default_set.write(args.out, args.seed):
        print(path)
    if args.pairs_from and not (Path(args.pairs_from) / "config.json").exists():
        from ftq.errors import UsageError

        raise UsageError(f"--pairs-from {args.pairs_from}: no model folder there (run `dvc repro merge` first)")
    for path in preference_set.write(args.out, args.seed, args.pairs_from):
        print(path)
    for path in tool_set.write(args.tools_out, args.seed):
        print(path)
    if args.replay:
        from ftq.data import replay
        from ftq.errors import UsageError

        base = Path(args.base)
        if not (base / "config.json").exists():
            raise UsageError(f"--base {base}: no model folder there (run `dvc repro base` first)")
        print(replay.write(args.out, base))
    return 0


def cmd_ui(args) -> int:
    from ftq.pipeline import ui

    return ui(args.host, args.port)


def cmd_registry_gc(args) -> int:
    from ftq import schema
    from ftq.registry.gc import gc
    from ftq.registry.resolve import registry_client

    params = _params_if_any(args)
    model_name = args.model_name or schema.settings(params, "promote")["model_name"]
    decided = gc(registry_client(params), model_name, keep=args.keep, delete=args.delete)
    verb = "deleted" if args.delete else "delete"
    for version, why in sorted(decided.kept.items(), key=lambda item: int(item[0])):
        print(f"version {version}: keep ({why})")
    for version, why in sorted(decided.versions.items(), key=lambda item: int(item[0])):
        print(f"version {version}: {verb} ({why})")
    for model_id, why in sorted(decided.logged_models.items()):
        print(f"logged model {model_id}: {verb} ({why})")
    if not args.delete and (decided.versions or decided.logged_models):
        print("dry run: nothing was deleted (--delete deletes the above)")
    return 0


def cmd_tracking_server(args) -> int:
    from ftq.tracking_server import serve_forever

    return serve_forever(Path(args.dir), args.port, args.pg_port, args.host)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftq",
        description="Reproducible fine-tune -> merge -> quantize -> evaluate -> register -> serve pipeline.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"ftq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def params_option(sub):
        sub.add_argument("--params", default=None, help="params file (default: params.yaml at the project root)")

    run = commands.add_parser(
        "run", help="run the pipeline (dvc repro / dvc exp run) under one MLflow pipeline run", formatter_class=FORMATTER
    )
    run.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    run.add_argument("--exp", action="store_true", help="run as a DVC experiment (dvc exp run)")
    run.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE", help="param override (with --exp)")
    run.add_argument("--name", default=None, help="experiment / MLflow run name")
    run.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    run.set_defaults(func=cmd_run)

    shown = commands.add_parser(
        "params", help="the effective settings of params.yaml's blocks, each with its source (-S, params.yaml, default)",
        formatter_class=FORMATTER)
    shown.add_argument("blocks", nargs="*", help="blocks to show, e.g. train evaluate (default: all)")
    shown.add_argument("--explain", action="store_true",
                       help="instead of the values, what each setting does: its default, what it accepts and its "
                            "help (params.yaml's comment on it); a block may be any dotted prefix, e.g. train.lora")
    shown.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                       help="an override, as `ftq run --exp -S` / `dvc exp run -S` would apply it")
    params_option(shown)
    shown.set_defaults(func=cmd_params)

    base = commands.add_parser("base", help="stage base: materialize the base model", formatter_class=FORMATTER)
    base_commands = base.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    base_run = base_commands.add_parser("run", help="build models/base from params.yaml base.source", formatter_class=FORMATTER)
    params_option(base_run)
    base_run.set_defaults(func=cmd_base_run)
    # `ask`, not `check`: it answers a prompt and judges nothing (check means validation: data check,
    # merge.check, quantize.check)
    base_ask = base_commands.add_parser(
        "ask", help="load models/base and print its reply to a prompt", formatter_class=FORMATTER
    )
    base_ask.add_argument("--prompt", default="Who are you?", help="user message")
    base_ask.add_argument("--model-dir", default=None, help="model folder (default: models/base)")
    base_ask.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit")
    base_ask.set_defaults(func=cmd_base_ask)

    prepare = commands.add_parser(
        "prepare", help="stage prepare: validate, split and tokenize the datasets", formatter_class=FORMATTER
    )
    params_option(prepare)
    prepare.set_defaults(func=cmd_prepare)

    train = commands.add_parser(
        "train",
        help="stage train: full, LoRA or QLoRA fine-tuning (launches torchrun itself for several processes)",
        formatter_class=FORMATTER,
    )
    params_option(train)
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser(
        "preference", help="stage preference: DPO, ORPO, SimPO or KTO (TRL) after SFT or on the base "
                           "(preference.objective; none passes train's output on)", formatter_class=FORMATTER)
    params_option(tune)
    tune.set_defaults(func=cmd_preference)

    merge = commands.add_parser(
        "merge", help="stage merge: adapter + base -> models/merged (checked against base + adapter logits)",
        formatter_class=FORMATTER,
    )
    params_option(merge)
    merge.set_defaults(func=cmd_merge)

    bench_data = commands.add_parser(
        "benchmark-data", help="stage benchmark_data: record the local files of the standard benchmarks "
                               "(evaluate.lm_eval.local_data) in data/benchmarks.json", formatter_class=FORMATTER)
    params_option(bench_data)
    bench_data.set_defaults(func=cmd_benchmark_data)

    machine = commands.add_parser(
        "machine", help="stage machine: record the arithmetic this machine computes in (bf16 or not) in "
                        "data/machine.json, an input of every stage whose numbers depend on it",
        formatter_class=FORMATTER)
    params_option(machine)
    machine.set_defaults(func=cmd_machine)

    reference = commands.add_parser(
        "reference", help="stage reference: merged's next-token distribution on held-out data, for the quantize check",
        formatter_class=FORMATTER,
    )
    params_option(reference)
    reference.set_defaults(func=cmd_reference)

    imatrix = commands.add_parser(
        "imatrix", help="stage imatrix: llama.cpp's importance matrix of merged, from the fine-tune's training data",
        formatter_class=FORMATTER,
    )
    params_option(imatrix)
    imatrix.set_defaults(func=cmd_imatrix)

    quantize = commands.add_parser(
        "quantize", help="stage quantize: make builds of models/merged (AWQ, GPTQ, GGUF) and check each",
        formatter_class=FORMATTER,
    )
    quantize.add_argument("builds", nargs="*", help="names in quantize.builds (default: quantize.enabled)")
    params_option(quantize)
    quantize.set_defaults(func=cmd_quantize)

    evaluate = commands.add_parser(
        "evaluate", help="stage evaluate: task accuracy, perplexity and speed of base, merged or a build",
        formatter_class=FORMATTER,
    )
    evaluate.add_argument("candidates", nargs="+", help="base, merged or a name in models/quantized/")
    params_option(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    ladder = commands.add_parser(
        "ladder", help="stage ladder: the builds that passed their screen, tested for non-inferiority to merged "
                       "from the largest down until one is not shown faithful", formatter_class=FORMATTER,
    )
    params_option(ladder)
    ladder.set_defaults(func=cmd_ladder)

    compare = commands.add_parser(
        "compare", help="stage compare: reports/compare.md and .html over every evaluated candidate",
        formatter_class=FORMATTER,
    )
    params_option(compare)
    compare.set_defaults(func=cmd_compare)

    promote = commands.add_parser(
        "promote", help="stage promote: register builds in the MLflow registry, move alias champion by policy",
        formatter_class=FORMATTER,
    )
    params_option(promote)
    promote.set_defaults(func=cmd_promote)

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible API + web chat for a registry alias, version or local model",
        formatter_class=FORMATTER,
    )
    serve.add_argument("--model", required=True,
                       help="models:/NAME@champion, models:/NAME/3, or a path (HF folder, AWQ/GPTQ folder, .gguf)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs an API key")
    serve.add_argument("--port", type=int, default=8000, help="port")
    serve.add_argument("--api-key-file", default=None, metavar="PATH",
                       help="require 'Authorization: Bearer KEY', the key read from this file (default: $FTQ_API_KEY)")
    serve.add_argument("--api-key", default=None,
                       help="the key itself: works, with a warning, as it is visible to every local user in /proc")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="accept this Host name besides the bound one and localhost (repeatable; '*': any)")
    serve.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                       help="let web pages from this origin (https://app.example:8443) call the API (repeatable)")
    serve.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                       help="poll the registry and reload when the alias moves (0: off)")
    from ftq.openai.schema import Limits
    from ftq.serve import CTX_SIZE, MAX_QUEUED, PARALLEL

    serve.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens,
                       help="largest max_tokens a request may ask")
    serve.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens,
                       help="longest prompt accepted, in tokens")
    serve.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                       help="larger request bodies get 413 before they are read")
    serve.add_argument("--parallel", type=int, default=PARALLEL,
                       help="requests decoded together (engine slots); more wait in the queue")
    serve.add_argument("--max-queued", type=int, default=MAX_QUEUED,
                       help="requests that may wait for a slot; beyond that, 503 with Retry-After")
    serve.add_argument("--ctx-size", type=int, default=CTX_SIZE,
                       help="tokens per sequence (prompt + answer); the engine's KV cache holds parallel x this")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads for the engine (default: all)")
    params_option(serve)
    serve.set_defaults(func=cmd_serve)

    chat = commands.add_parser("chat", help="chat with a model in the terminal (streaming, /reset, /exit)",
                               formatter_class=FORMATTER)
    chat.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/3, or a path")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="reply length limit")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    params_option(chat)
    chat.set_defaults(func=cmd_chat)

    data = commands.add_parser("data", help="data tools", formatter_class=FORMATTER)
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_commands.add_parser(
        "check", help="validate a data file without running the pipeline", formatter_class=FORMATTER
    )
    check.add_argument("file", help="json, jsonl, csv or parquet file")
    check.add_argument("--format", default="alpaca", choices=["alpaca", "sharegpt", "openai"], help="record format")
    check.add_argument("--columns", default=None, help='column mapping as JSON, e.g. \'{"messages": "conversations"}\'')
    check.add_argument("--tags", default=None, help='role tags as JSON, e.g. \'{"user_tag": "user"}\'')
    check.add_argument("--max-errors", type=int, default=50, help="errors to print")
    check.set_defaults(func=cmd_data_check)
    make_default = data_commands.add_parser(
        "make-default", help="regenerate the embedded default instruction set", formatter_class=FORMATTER
    )
    make_default.add_argument("--out", default="data/raw/ftq_default", help="output folder")
    make_default.add_argument("--tools-out", default="data/raw/ftq_tools",
                              help="output folder of the tool-calling set (ftq.data.tool_set)")
    make_default.add_argument("--seed", type=int, default=0, help="generator seed")
    make_default.add_argument("--replay", action="store_true",
                              help="also write replay.json: the base model's own answers to the general prompts "
                                   "(ftq.data.replay; several minutes on CPU)")
    make_default.add_argument("--pairs-from", metavar="MODEL", default=None,
                              help="the training preference pairs reject this model's own wrong answers (the "
                                   "demo's SFT model: models/merged; ~2 min on CPU); without it, synthetic mistakes")
    make_default.add_argument("--base", default="models/base", help="the base model folder that answers (--replay)")
    make_default.set_defaults(func=cmd_data_make_default)

    ui = commands.add_parser("ui", help="MLflow UI over the project's tracking store", formatter_class=FORMATTER)
    ui.add_argument("--host", default="127.0.0.1", help="bind address")
    ui.add_argument("--port", type=int, default=5000, help="port")
    ui.set_defaults(func=cmd_ui)

    registry = commands.add_parser("registry", help="registry maintenance", formatter_class=FORMATTER)
    registry_commands = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    registry_gc = registry_commands.add_parser(
        "gc", formatter_class=FORMATTER,
        help="list (--delete: delete) the versions and logged models no alias needs, beyond the newest per build")
    from ftq.registry.gc import KEEP

    registry_gc.add_argument("--keep", type=int, default=KEEP, help="newest versions kept per build, besides aliased ones")
    registry_gc.add_argument("--delete", action="store_true",
                             help="delete them (versions, logged models and their files); without it, only list")
    registry_gc.add_argument("--model-name", default=None, help="registered model (default: promote.model_name)")
    params_option(registry_gc)
    registry_gc.set_defaults(func=cmd_registry_gc)

    server = commands.add_parser(
        "tracking-server", formatter_class=FORMATTER,
        help="team tracking server: mlflow server --serve-artifacts over PostgreSQL, in the foreground")
    server.add_argument("--dir", default=".ftq/tracking", help="PostgreSQL cluster, artifacts and logs")
    server.add_argument("--host", default="127.0.0.1",
                        help="bind address of mlflow server (it has no authentication: keep it on a trusted network)")
    server.add_argument("--port", type=int, default=5000, help="mlflow server port")
    server.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port (127.0.0.1 only)")
    server.set_defaults(func=cmd_tracking_server)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (params, data, sources, arguments): reported as one clear
    message, no traceback. Listed here, the one place that catches them all, so that no stage imports
    the others' modules for their error classes."""
    from ftq.data.errors import DataError
    from ftq.data.registry import RegistryError
    from ftq.data.tokenize import TemplateError
    from ftq.errors import MergeCheckError, QLoRAUnavailable, UsageError
    from ftq.evidence import PairingError
    from ftq.evaluation.harness import LmEvalError
    from ftq.params import ParamsError
    from ftq.promotion.policy import PromotionError
    from ftq.quantize.check import BuildCheckError
    from ftq.registry.lock import RegistryBusy
    from ftq.registry.package import ChangedBuildError
    from ftq.stages.base import SourceError
    from ftq.tracking_server import Unavailable as TrackingServerUnavailable

    return (DataError, RegistryError, TemplateError, ParamsError, SourceError, UsageError, QLoRAUnavailable,
            FileNotFoundError, MergeCheckError, BuildCheckError, LmEvalError, RegistryBusy, ChangedBuildError,
            TrackingServerUnavailable, PairingError, PromotionError)


# the pipeline's stages (dvc.yaml's commands)
STAGE_COMMANDS = {cmd_base_run, cmd_prepare, cmd_benchmark_data, cmd_machine, cmd_train, cmd_preference, cmd_merge, cmd_reference, cmd_imatrix, cmd_quantize,
                  cmd_evaluate, cmd_ladder,
                  cmd_compare, cmd_promote}


def main(argv: list[str] | None = None, supervise: bool = False) -> int:
    """`supervise` (python -m ftq, which DVC's stage commands run through bin/ftq): a stage runs in a
    child process watched by this one, which names a death by a signal (see ftq.processes.supervise)."""
    args = build_parser().parse_args(argv)
    if supervise and args.func in STAGE_COMMANDS:
        from ftq.processes import supervise as watch

        code = watch(" ".join(sys.argv[1:] if argv is None else argv))
        if code is not None:
            return code
        import faulthandler

        faulthandler.enable()  # a death in native code shows the Python frames that called it
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s ftq %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # torchao (pulled in by llm-compressor) logs every CUDA-only kernel it cannot load on a CPU box
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from ftq.processes import exit_code, stop_on_signals

    stop_on_signals()
    try:
        return args.func(args)
    except KeyboardInterrupt as stop:
        print(f"ftq: {stop or 'stopped by SIGINT'}; temporary outputs removed", file=sys.stderr)
        return exit_code(stop)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
