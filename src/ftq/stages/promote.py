"""Stage `promote`: register every quantized build in the MLflow model registry and move the alias
`champion` to the best one by the policy in params.yaml `promote`.

- One model version per distinct build (the sha256 of its files): rerunning with nothing new
  registers nothing. A new build is first logged into MLflow's artifact store as an MLflow model
  (ftq.registry.package) and the version is created from that copy, never from a working-tree path,
  so a version never changes and deploys wherever the tracking server is reachable. Each version is
  tagged with the sha256 of every file (verified by `ftq serve` before loading), its method and
  options, every eval metric, and its lineage (data md5, base hash, params hash, git rev, DVC
  experiment, MLflow run ids).
- Policy: a primary metric and direction, minimum retention against `merged` on that metric, a size
  cap, required checks (the build passed its quantize check and was evaluated), tie-breakers.
  `champion` moves only to a candidate that passes and beats the current champion; `challenger`
  marks the runner-up. Concurrent promotes (experiments finishing together) take the registry lock
  and move `champion` by compare-and-set (ftq.registry.lock), so the later one decides against the
  earlier one's champion.
- reports/promotion.json lists every candidate with the reason it was chosen or rejected.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ftq.io import atomic_write_json
from ftq.params import ParamsError, block, params_hash, repo_root
from ftq.registry import ARTIFACT_TAG, FILES_TAG, MODEL_TAG, build_digest, files_tag

log = logging.getLogger(__name__)

REPORT = Path("reports/promotion.json")
# seconds to wait between reading the champion and moving it: widens the read-decide-write window so
# that a test can make two promotes overlap (see tests/registry/test_registry.py); 0 in normal use
DECIDE_DELAY_ENV = "FTQ_PROMOTE_DECIDE_DELAY"
CAS_ATTEMPTS = 5
DEFAULT_POLICY = {
    "metric": "task_json_field_accuracy",
    "direction": "max",
    "min_retention": 0.97,
    "max_size_bytes": None,
    "tie_breakers": ["size_bytes:min", "tokens_per_second:max"],
}


def policy_of(params: dict[str, Any]) -> dict[str, Any]:
    cfg = block(params, "promote")
    where = f"{params.get('_path', 'params.yaml')}: promote.policy"
    policy = {**DEFAULT_POLICY, **(cfg.get("policy") or {})}
    unknown = sorted(set(policy) - set(DEFAULT_POLICY))
    if unknown:
        raise ParamsError(f"{where}: unknown keys {unknown}")
    if policy["direction"] not in ("max", "min"):
        raise ParamsError(f"{where}.direction '{policy['direction']}': expected max or min")
    for breaker in policy["tie_breakers"]:
        if not isinstance(breaker, str) or breaker.rsplit(":", 1)[-1] not in ("min", "max"):
            raise ParamsError(f"{where}.tie_breakers: '{breaker}' must look like metric:min or metric:max")
    return policy


def candidates(root: Path, names: list[str]) -> list[dict]:
    found = []
    for name in names:
        manifest_path = root / "models" / "quantized" / name / "manifest.json"
        eval_path = root / "reports" / "eval" / f"{name}.json"
        found.append({
            "name": name,
            "manifest": json.loads(manifest_path.read_text()) if manifest_path.exists() else None,
            "metrics": json.loads(eval_path.read_text()) if eval_path.exists() else None,
        })
    return found


def retention(value: float, reference: float, direction: str) -> float:
    if direction == "max":
        return value / reference if reference else float("inf")
    return reference / value if value else 0.0


def judge(candidate: dict, merged: dict | None, policy: dict) -> list[str]:
    """Why a candidate may not be champion; empty if it passes the policy."""
    manifest, metrics, metric = candidate["manifest"], candidate["metrics"], policy["metric"]
    if manifest is None:
        return ["no build (models/quantized/<name>/manifest.json missing)"]
    if not manifest.get("check", {}).get("passed"):
        return ["its quantize check did not pass"]
    if metrics is None:
        return ["not evaluated (reports/eval/<name>.json missing)"]
    reasons = []
    value = metrics.get(metric)
    if not isinstance(value, (int, float)):
        return [f"no value for the primary metric {metric}"]
    if merged is not None and isinstance(merged.get(metric), (int, float)):
        kept = retention(value, merged[metric], policy["direction"])
        if kept < policy["min_retention"]:
            reasons.append(f"{metric} retention {kept:.1%} of merged < {policy['min_retention']:.0%}")
    cap = policy["max_size_bytes"]
    if cap is not None and manifest["size_bytes"] > cap:
        reasons.append(f"size {manifest['size_bytes']:,} bytes > max_size_bytes {int(cap):,}")
    return reasons


def sort_key(candidate: dict, policy: dict) -> tuple:
    """Larger is better for every element."""
    def signed(metric: str, direction: str) -> float:
        value = candidate["metrics"].get(metric)
        if value is None:
            value = candidate["manifest"].get(metric)
        if not isinstance(value, (int, float)):
            return float("-inf")
        return value if direction == "max" else -value

    keys = [signed(policy["metric"], policy["direction"])]
    keys += [signed(*breaker.rsplit(":", 1)) for breaker in policy["tie_breakers"]]
    return tuple(keys) + (candidate["name"],)


def run_ids(client, params: dict, name: str) -> dict[str, str]:
    from ftq.tracking import experiment_id

    exp = experiment_id(client, params)

    def latest(run_name: str) -> str:
        runs = client.search_runs([exp], f"attributes.run_name = '{run_name}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else ""

    return {"train": latest("train"), "merge": latest("merge"), "quantize": latest(f"quantize@{name}"),
            "evaluate": latest(f"evaluate@{name}")}


def version_tags(candidate: dict, params: dict, ids: dict[str, str]) -> dict[str, str]:
    import os

    from ftq.tracking import git_rev

    manifest = candidate["manifest"]
    lineage = manifest["source"].get("lineage", {})
    tags = {
        ARTIFACT_TAG: build_digest(manifest),
        "ftq.build": candidate["name"],
        "method": manifest["method"],
        "format": manifest.get("format", manifest["method"]),
        "options": json.dumps(manifest["options"], sort_keys=True),
        "size_bytes": manifest["size_bytes"],
        "lineage.data_md5": lineage.get("data_md5", ""),
        "lineage.base_sha256": lineage.get("base_sha256", ""),
        "lineage.params_hash": params_hash({k: params.get(k) for k in ("base", "data", "train", "merge", "quantize")}),
        "lineage.git_rev": git_rev(),
        "lineage.dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        **{f"run_id.{stage}": run_id for stage, run_id in ids.items()},
    }
    for key, value in (candidate["metrics"] or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"eval.{key}"] = value
    return {k: str(v) for k, v in tags.items()}


def existing_version(client, model_name: str, digest: str) -> str | None:
    found = [int(v.version) for v in client.search_model_versions(f"name = '{model_name}'")
             if v.tags.get(ARTIFACT_TAG) == digest]
    return str(min(found)) if found else None


def register(client, model_name: str, candidate: dict, root: Path, params: dict, exp_id: str) -> tuple[str, bool]:
    """The version holding this build; if no version has its bytes yet, the build is logged into the
    artifact store and a version is created from that logged copy."""
    from ftq.registry.lock import registry_lock
    from ftq.registry.package import log_build

    manifest, name = candidate["manifest"], candidate["name"]
    digest = build_digest(manifest)
    version = existing_version(client, model_name, digest)
    if version is not None:
        return version, False
    ids = run_ids(client, params, name)
    logged = log_build(client, exp_id, name, root / "models" / "quantized" / name, manifest, ids["quantize"],
                       root / ".ftq")
    tags = {**version_tags(candidate, params, ids), MODEL_TAG: logged.sha256, FILES_TAG: files_tag(logged.files)}
    with registry_lock(client, model_name):
        version = existing_version(client, model_name, digest)  # another promote registered these bytes meanwhile
        if version is not None:
            client.delete_logged_model(logged.model_id)
            return version, False
        created = client.create_model_version(model_name, logged.source, run_id=ids["quantize"] or None,
                                              model_id=logged.model_id, tags=tags,
                                              description=version_description(candidate, ids))
        link_version(client, logged.model_id, model_name, str(created.version))
    link_metrics(client, logged.model_id, ids["evaluate"], candidate["metrics"] or {})
    return str(created.version), True


def link_version(client, model_id: str, model_name: str, version: str) -> None:
    """The logged model's `mlflow.modelVersions` tag, as `mlflow.register_model` sets it (a tracking
    server sets it on its own; a sqlite store does not), so its page links to the version."""
    entry = {"name": model_name, "version": version}
    try:
        listed = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        if entry not in listed:
            client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(listed + [entry])})
    except Exception as exc:  # a convenience link: never fail a promotion for it
        log.warning("could not link logged model %s to %s version %s: %s", model_id, model_name, version, exc)


def version_description(candidate: dict, ids: dict[str, str]) -> str:
    manifest = candidate["manifest"]
    runs = ", ".join(f"{stage} run {run_id}" for stage, run_id in ids.items() if run_id)
    return (f"ftq build {candidate['name']} ({manifest['method']}, {json.dumps(manifest['options'], sort_keys=True)}), "
            f"{manifest['size_bytes']:,} bytes. Made by: {runs or 'runs not found in this tracking store'}.")


def link_metrics(client, model_id: str, evaluate_run_id: str, metrics: dict) -> None:
    """The build's evaluation metrics, linked to its logged model (shown with the model in MLflow 3),
    logged through the evaluate run that measured them."""
    from mlflow.entities import Metric

    if not evaluate_run_id:
        return
    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, 0, model_id=model_id) for key, value in metrics.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)]
    try:
        for start in range(0, len(items), 1000):
            client.log_batch(evaluate_run_id, metrics=items[start:start + 1000], synchronous=True)
    except Exception as exc:  # the version is registered; the link is a convenience
        log.warning("could not link metrics to logged model %s: %s", model_id, exc)


def current_champion(client, model_name: str) -> dict | None:
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except Exception:  # no alias yet
        return None
    return {"version": str(version.version), "tags": dict(version.tags)}


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.tracking import client as mlflow_client, experiment_id, stage_run

    cfg = block(params, "promote")
    model_name = str(cfg.get("model_name") or "ftq-model")
    policy = policy_of(params)
    root = repo_root()
    names = list(block(params, "quantize").get("enabled") or [])
    merged_path = root / "reports" / "eval" / "merged.json"
    merged = json.loads(merged_path.read_text()) if merged_path.exists() else None
    client = mlflow_client(params)
    with stage_run("promote", params) as tracked:
        ensure_registered_model(client, model_name)
        exp_id = experiment_id(client, params)
        rows = []
        for candidate in candidates(root, names):
            reasons = judge(candidate, merged, policy)
            version, created = (None, False)
            if candidate["manifest"] is not None and candidate["manifest"].get("check", {}).get("passed"):
                version, created = register(client, model_name, candidate, root, params, exp_id)
            rows.append({"candidate": candidate, "version": version, "registered_now": created, "reasons": reasons})
        eligible = sorted((r for r in rows if not r["reasons"]), key=lambda r: sort_key(r["candidate"], policy),
                          reverse=True)
        champion_before, decision = move_aliases(client, model_name, eligible, policy)
        report = promotion_report(model_name, policy, rows, eligible, champion_before, decision, merged)
        atomic_write_json(root / REPORT, report)
        tracked.log_artifact(root / REPORT)
        tracked.set_tags({"promote.model_name": model_name, "promote.champion": report["champion"]["version"] or ""})
        tracked.log_metrics({"candidates": len(rows), "eligible": len(eligible),
                             "registered_now": sum(r["registered_now"] for r in rows)})
    log.info("champion: %s", report["champion"])
    return report


def ensure_registered_model(client, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name, description="ftq quantized builds; alias champion = the best")
        except MlflowException as exc:  # a concurrent promote created it first
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise


def move_aliases(client, model_name: str, eligible: list[dict], policy: dict) -> tuple[dict | None, dict]:
    """Read the champion, decide, move it by compare-and-set, all under the registry lock; a champion
    moved by someone else since it was read (a conflict) means reading and deciding again."""
    from ftq.registry.lock import compare_and_set_alias, registry_lock

    with registry_lock(client, model_name):
        for _ in range(CAS_ATTEMPTS):
            before = current_champion(client, model_name)
            decision = decide(eligible, before, policy)
            delay = float(os.environ.get(DECIDE_DELAY_ENV) or 0)
            if delay > 0:
                time.sleep(delay)
            expected = (before or {}).get("version")
            if decision["champion"] is None or compare_and_set_alias(client, model_name, "champion", expected,
                                                                      decision["champion"]):
                break
            log.info("champion moved while deciding (conflict); reading it again")
        else:
            raise RuntimeError(f"{model_name}: the champion alias kept moving; {CAS_ATTEMPTS} attempts failed")
        if decision["challenger"] is not None:
            client.set_registered_model_alias(model_name, "challenger", decision["challenger"])
    return before, decision


def decide(eligible: list[dict], before: dict | None, policy: dict) -> dict:
    best = eligible[0] if eligible else None
    decision = {"champion": None, "challenger": None, "note": ""}
    if best is None:
        decision["note"] = "no candidate passes the policy; the alias stays where it was"
        return decision
    if before is None:
        decision.update(champion=best["version"], note="first champion")
    elif before["version"] == best["version"]:
        decision["note"] = "the best candidate is already champion"
    else:
        metric = policy["metric"]
        held = before["tags"].get(f"eval.{metric}")
        new = best["candidate"]["metrics"][metric]
        better = held is None or (new > float(held) if policy["direction"] == "max" else new < float(held))
        if better:
            decision.update(champion=best["version"],
                            note=f"{metric} {new} beats the champion's {held} (version {before['version']})")
        else:
            decision["note"] = (f"best candidate's {metric} {new} does not beat champion version "
                                f"{before['version']} ({held}); champion kept")
    champion_version = decision["champion"] or (before or {}).get("version")
    runner_up = next((r for r in eligible if r["version"] != champion_version), None)
    if runner_up is not None:
        decision["challenger"] = runner_up["version"]
    return decision


def promotion_report(model_name, policy, rows, eligible, before, decision, merged) -> dict:
    champion_version = decision["champion"] or (before or {}).get("version")
    ranking = {r["candidate"]["name"]: i + 1 for i, r in enumerate(eligible)}
    listed = []
    for row in rows:
        name, metrics = row["candidate"]["name"], row["candidate"]["metrics"] or {}
        if row["reasons"]:
            status, why = "rejected", row["reasons"]
        elif row["version"] == champion_version:
            status, why = "champion", [decision["note"] or "best by the policy"]
        elif row["version"] == decision["challenger"]:
            status, why = "challenger", [f"ranked {ranking[name]} by the policy"]
        else:
            status, why = "eligible", [f"ranked {ranking[name]} by the policy"]
        listed.append({"name": name, "version": row["version"], "registered_now": row["registered_now"],
                       "status": status, "reasons": why,
                       "metric": metrics.get(policy["metric"]), "size_bytes": metrics.get("size_bytes")})
    held = next((r for r in rows if r["version"] == champion_version), None)
    return {
        "model_name": model_name,
        "policy": policy,
        # False when the champion kept its alias only because nothing passes the policy now
        "champion_passes_policy": bool(held) and not held["reasons"],
        "merged_metric": (merged or {}).get(policy["metric"]),
        "champion": {"version": champion_version, "moved": decision["champion"] is not None, "note": decision["note"],
                     "previous": (before or {}).get("version")},
        "challenger": decision["challenger"],
        "candidates": listed,
    }
