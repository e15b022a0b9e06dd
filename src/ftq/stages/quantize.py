"""Stage `quantize`: one build of models/merged, named in params.yaml `quantize.builds`.

dvc.yaml runs this once per name in `quantize.enabled` (foreach), so each build is its own stage
(`quantize@q4_0`), depends only on its own params and reruns alone. Outputs:
  models/quantized/<name>/          the build (a .gguf file, or an HF folder for AWQ/GPTQ) + manifest.json
  reports/quantize/<name>.json      size, compression, time, memory, KL divergence and top-1 agreement
                                    vs. merged, perplexity vs. merged, whether it passed the screen

Every build is screened by the quality check (ftq.quantize.check) before any full evaluation: loaded with
its own runtime it must answer a fixed prompt coherently, and its next-token distribution on the held-out
sample of stage `reference` must stay close to the merged model's (mean and 99th-percentile KL divergence
at most `max_kld_mean` / `max_kld_p99`, top-1 agreement at least `min_top1_agreement`). A build that fails
is recorded (its size and distances, in the report and in a manifest without the model file) and never
evaluated: stage `ladder` skips it and promote names why."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftq.memory import peak_memory, reset_cuda_peak
from ftq.io import atomic_dir, atomic_write_json, dir_size, file_sha256, tree_md5
from ftq import schema
from ftq.params import ParamsError, repo_root
from ftq.provenance import stamp
from ftq.stages import MERGED_DIR, merged_model

log = logging.getLogger(__name__)

OUTPUT_ROOT = Path("models/quantized")
REPORT_ROOT = Path("reports/quantize")
MANIFEST = "manifest.json"
REFERENCE_DIR = Path("models/reference")
IMATRIX_DIR = Path("models/imatrix")
@dataclass
class BuildSpec:
    name: str
    method: str
    options: dict[str, Any]
    check: dict[str, Any]
    calibration: dict[str, Any]


@dataclass
class QuantizeResult:
    output_dir: Path
    manifest: dict[str, Any]


def build_spec(params: dict[str, Any], name: str) -> BuildSpec:
    """One build: its options checked by its method's backend; the block's `check` and `calibration`
    (thresholds: see docs/pipeline.md#stage-quantize-awq-gptq-and-gguf-builds-screened), each overridable per build."""
    from ftq.quantize import backend

    cfg = schema.settings(params, "quantize")
    path = params.get("_path", "params.yaml")
    builds = cfg["builds"]
    if name not in builds:
        raise ParamsError(f"{path}: quantize.builds has no build '{name}' (defined: {', '.join(builds) or 'none'})")
    spec = dict(builds[name] or {})
    where = f"{path}: quantize.builds.{name}"
    if "method" not in spec:
        raise ParamsError(f"{where}: missing 'method' (gguf, awq or gptq)")
    method = str(spec.pop("method"))
    check, calibration = ({**cfg[part], **schema.part(f"quantize.{part}", spec.pop(part, None), path,
                                                      where=f"quantize.builds.{name}.{part}", fill=False)}
                          for part in ("check", "calibration"))
    options = backend(method, where).validate(spec, where)
    return BuildSpec(name, method, options, check, calibration)


def file_table(folder: Path) -> dict[str, dict]:
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def merged_reply(root: Path, check: dict) -> str:
    from ftq.runtimes import open_model

    runtime = open_model(root / MERGED_DIR)
    try:
        return runtime.chat([{"role": "user", "content": check["prompt"]}], max_new_tokens=check["max_new_tokens"])
    finally:
        runtime.close()


def check_build(folder: Path, reference, check: dict, merged_answer: str) -> dict:
    from ftq.quantize.check import judge
    from ftq.quantize.distance import divergence
    from ftq.runtimes import open_model

    started = time.time()
    longest = max(len(ids) for ids in reference.sequences.ids)
    runtime = open_model(folder, n_ctx=max(2048, longest + 8))
    runtime.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1)  # llama.cpp loads on first use
    load_seconds = time.time() - started
    try:
        started = time.time()
        reply = runtime.chat([{"role": "user", "content": check["prompt"]}], max_new_tokens=check["max_new_tokens"])
        generate_seconds = time.time() - started
        started = time.time()
        measured = divergence(runtime, reference)
        divergence_seconds = time.time() - started
    finally:
        runtime.close()
    verdict = judge(reply, merged_answer, measured, check)
    return {**verdict, "runtime": runtime.kind, "load_seconds": round(load_seconds, 3),
            "generate_seconds": round(generate_seconds, 3), "divergence_seconds": round(divergence_seconds, 3),
            "prompt": check["prompt"]}


def run(params: dict[str, Any], name: str) -> QuantizeResult:
    from ftq.quantize import backend
    from ftq.quantize.calibration import sample
    from ftq.quantize.distance import load as load_reference
    from ftq.tracking import stage_run

    spec = build_spec(params, name)
    method = backend(spec.method)
    root = repo_root()
    merged = merged_model(root)
    out_dir = root / OUTPUT_ROOT / name
    calibration = None
    if method.NEEDS_CALIBRATION:
        cal = spec.calibration
        calibration = sample(root, cal["split"], int(cal["samples"]), int(cal["max_length"]), cal["seed"])
    reference = load_reference(root / REFERENCE_DIR)
    build_block = {"name": name, "method": spec.method, **spec.options, "check": spec.check}
    if calibration is not None:
        build_block["calibration"] = spec.calibration
    with stage_run("quantize", params, run_name=f"quantize@{name}", block_values=build_block) as tracked:
        with atomic_dir(out_dir) as tmp:
            started = time.time()
            reset_cuda_peak()  # the build's own CUDA peak: > 0 only where it ran (calibrated) on a GPU
            inputs = {"imatrix": root / IMATRIX_DIR / "imatrix.gguf", "converted": root / IMATRIX_DIR / "model-f16.gguf"} \
                if getattr(method, "USES_IMATRIX", False) else {}
            built = method.build(merged, tmp, spec.options, calibration, **inputs)
            build_seconds = time.time() - started
            memory = peak_memory()
            build_peak = memory["peak_memory_bytes"]  # the build's device (RAM or CUDA)
            built["build_cuda_peak_bytes"] = memory["peak_cuda_bytes"]
            same_prompt = (reference.meta.get("prompt"), reference.meta.get("max_new_tokens")) == (
                spec.check["prompt"], spec.check["max_new_tokens"])
            answer = reference.meta["reply"] if same_prompt else merged_reply(root, spec.check)
            check = check_build(tmp / built.get("artifact", ""), reference, spec.check, answer)
            manifest = describe(root, tmp, spec, built, calibration, reference, check, build_seconds, build_peak,
                                method.versions())
            if not check["passed"]:
                # screened out: recorded, never evaluated; the model itself is not kept
                for item in list(tmp.iterdir()):
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
                manifest.update(artifact=None, kept=False)
            atomic_write_json(tmp / MANIFEST, manifest)
        report = summary(manifest)
        atomic_write_json(root / REPORT_ROOT / f"{name}.json", stamp(report))
        tracked.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
        tracked.set_tags({"quantize.build": name, "quantize.method": spec.method,
                          "quantize.screen": "passed" if check["passed"] else "failed",
                          "quantize.artifact": str(out_dir / manifest["artifact"]) if manifest["artifact"] else "",
                          "lineage.merged_md5": manifest["source"]["md5"]})
        tracked.log_artifact(out_dir / MANIFEST)
        tracked.log_artifact(root / REPORT_ROOT / f"{name}.json")
    log.info("build %s (%s): %s bytes (%.2fx smaller), KLD mean %.4f p99 %.3f, top-1 %.1f %%, perplexity %.3fx "
             "merged, %.1f s: %s", name, spec.method, f"{report['size_bytes']:,}", report["compression_ratio"],
             report["kld_mean"], report["kld_p99"], 100 * report["top1_agreement"], report["perplexity_ratio"],
             report["build_seconds"], "passed the screen" if check["passed"] else
             "FAILED the screen, not kept and never evaluated: " + "; ".join(check["failures"]))
    return QuantizeResult(out_dir, manifest)


def describe(root, folder, spec, built, calibration, reference, check, build_seconds, build_peak, versions) -> dict:
    merged = root / MERGED_DIR
    merge_info_path = merged / "ftq_merge.json"
    merge_info = json.loads(merge_info_path.read_text()) if merge_info_path.exists() else {}
    files = file_table(folder)
    size = sum(f["bytes"] for f in files.values())
    merged_size = dir_size(merged)
    return {
        "name": spec.name,
        "method": spec.method,
        "options": spec.options,
        "artifact": built.get("artifact", ""),
        "format": spec.method if spec.method == "gguf" else built.get("format", spec.method),
        "calibration": None if calibration is None else {**calibration.describe(), **spec.calibration},
        "imatrix": imatrix_of(root) if built.get("imatrix") else None,
        "reference": {"path": REFERENCE_DIR.as_posix(), "sha256": reference.meta["sha256"],
                      "positions": reference.positions, "sequences": reference.meta["sequences"]},
        "source": {"path": MERGED_DIR.as_posix(), "md5": tree_md5(merged), "size_bytes": merged_size,
                   "lineage": merge_info.get("lineage", {})},
        "tool_versions": {**versions, **{m: importlib.metadata.version(m) for m in ("torch", "transformers")}},
        "files": files,
        "size_bytes": size,
        "compression_ratio": round(merged_size / size, 3) if size else None,
        "build_seconds": round(build_seconds, 2),
        "peak_memory_bytes": build_peak,
        "check": check,
        "backend": {k: v for k, v in built.items() if k not in ("artifact",)},
    }


def imatrix_of(root: Path) -> dict:
    """Which importance matrix a build used (stage imatrix's record of it)."""
    info = json.loads((root / IMATRIX_DIR / "imatrix.json").read_text())
    return {"path": (IMATRIX_DIR / "imatrix.gguf").as_posix(), "sha256": info["sha256"], "chunks": info["chunks"],
            "tokens": info["tokens"], "settings": info["settings"]}


def summary(manifest: dict) -> dict:
    check = manifest["check"]
    return {
        "method": manifest["method"],
        "type": manifest["options"].get("type"),
        "imatrix": manifest.get("imatrix") is not None,
        "size_bytes": manifest["size_bytes"],
        "compression_ratio": manifest["compression_ratio"],
        "build_seconds": manifest["build_seconds"],
        "peak_memory_bytes": manifest["peak_memory_bytes"],
        "kld_mean": round(check["kld_mean"], 6),
        "kld_median": round(check["kld_median"], 6),
        "kld_p99": round(check["kld_p99"], 5),
        "kld_max": round(check["kld_max"], 4),
        "top1_agreement": round(check["top1_agreement"], 5),
        "positions": check["positions"],
        "perplexity": round(check["perplexity"], 4),
        "merged_perplexity": round(check["merged_perplexity"], 4),
        "perplexity_ratio": round(check["perplexity_ratio"], 4),
        "load_seconds": check["load_seconds"],
        "check_passed": check["passed"],
        "check_failures": check["failures"],
    }
