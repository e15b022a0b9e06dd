"""Stage `promote`: register every quantized build in the MLflow model registry and move the alias
`champion` to the best one by the policy in params.yaml `promote`.

- One model version per distinct build (the sha256 of its files): rerunning with nothing new
  registers nothing. A new build is first logged into MLflow's artifact store as an MLflow model
  (ftq.registry.package), under the registry lock, read back and verified, or an earlier upload of
  it that no version references is reused (ftq.registry.upload); the version is created from that
  copy, never from a working-tree path, so a version never changes and deploys wherever the tracking
  server is reachable. Each version is tagged with the sha256 of every file (verified by `ftq serve`
  before loading), its method and options, every eval metric, and its lineage (data md5, base hash,
  params hash, git rev, DVC experiment, MLflow run ids).
- Policy: a primary task metric and direction, minimum retention against `merged`, a size cap,
  required checks (the build passed its quantize check and was evaluated), a confidence level and
  tie-breakers. Every decision is a paired comparison on the same held-out examples (per-example scores
  in reports/eval/<name>.answers.jsonl, seeded bootstrap; ftq.evaluation.paired):
    * a build is rejected when its retention interval lies wholly below min_retention (a merged score
      of 0 is an error: retention against it is undefined);
    * the best build, and every build whose difference from it has an interval reaching 0, are tied;
      the tie-breakers (size, then relative speed: see evaluate) pick among them;
    * the champion is scored on the same examples: from this run's evaluation when it is one of these
      builds, otherwise its registered artifact is downloaded and re-evaluated on the current set;
    * `champion` moves when the pick beats it (the interval of the difference lies above 0), or when
      the champion is itself tied with the best and the pick wins the tie-breakers over it.
  `challenger` marks the runner-up. Concurrent promotes (experiments finishing together) take the registry lock
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

from ftq.evaluation import paired
from ftq.io import atomic_write_json, atomic_write_text
from ftq import schema
from ftq.params import ParamsError, params_hash, repo_root
from ftq.registry import ARTIFACT_TAG, FILES_TAG, MODEL_TAG, build_digest, files_tag
from ftq.selection import PREFERENCE_KEYS, compare, per_example_key, smallest_tied

log = logging.getLogger(__name__)

REPORT = Path("reports/promotion.json")
# the champion's answers when it had to be re-evaluated on the current examples (absent otherwise)
CHAMPION_ANSWERS = Path(".ftq/promotion.champion.answers.jsonl")
# seconds to wait between reading the champion and moving it: widens the read-decide-write window so
# that a test can make two promotes overlap (see tests/registry/test_registry.py); 0 in normal use
DECIDE_DELAY_ENV = "FTQ_PROMOTE_DECIDE_DELAY"
CAS_ATTEMPTS = 5
# task metrics are scored per example (reports/eval/<name>.answers.jsonl): the ones a paired comparison can use
PAIRED_METRICS = ("task_exact_match", "task_rouge_l", "task_json_valid", "task_json_field_accuracy",
                  "task_tool_call_name_accuracy", "task_tool_call_exact", "task_tool_call_abstained",
                  # scored per held-out preference pair (reports/eval/<name>.preference.jsonl), where
                  # preference tuning ran: ftq.evaluation.preference
                  "pref_accuracy", "pref_logp_accuracy")


class PromotionError(ValueError):
    """The numbers cannot support a decision (e.g. retention against a reference that scored 0)."""


def policy_of(params: dict[str, Any]) -> dict[str, Any]:
    policy = schema.settings(params, "promote")["policy"]
    if policy["metric"] not in PAIRED_METRICS:
        raise ParamsError(f"{params.get('_path', 'params.yaml')}: promote.policy.metric '{policy['metric']}': promotion "
                          "compares builds example by example, so the metric must be scored per example: one of "
                          f"{', '.join(PAIRED_METRICS)}")
    return policy


def candidates(root: Path, names: list[str], metric: str) -> list[dict]:
    found = []
    for name in names:
        manifest_path = root / "models" / "quantized" / name / "manifest.json"
        found.append({"name": name,
                      "manifest": json.loads(manifest_path.read_text()) if manifest_path.exists() else None,
                      **evaluation(root, name, metric)})
    return found


def evaluation(root: Path, name: str, metric: str) -> dict:
    """reports/eval[/builds]/<name>.json and the per-example scores of `metric` (None where not evaluated): the
    answers' for a task metric, the held-out pairs' for a preference metric."""
    from ftq.stages.evaluate import report_dir

    folder = root / report_dir(name)
    eval_path = folder / f"{name}.json"
    suffix = "preference" if metric in PREFERENCE_KEYS else "answers"
    answers = folder / f"{name}.{suffix}.jsonl"
    samples = folder / "lm_eval" / f"{name}.samples.jsonl"
    return {"metrics": json.loads(eval_path.read_text()) if eval_path.exists() else None,
            "scores": paired.load_scores(answers) if eval_path.exists() and answers.exists() else None,
            "benchmark_rows": [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
            if eval_path.exists() and samples.exists() else None}


def general_guard(candidate: dict, merged: dict | None, guard: dict, confidence: float) -> dict:
    """The general-ability guard's verdict: a build whose paired difference from merged on a standard
    task (HellaSwag by default) lies wholly below -tolerance has lost general ability and is rejected.
    Skipped, and saying why, where the task was not scored (its file is absent) on both sides."""
    from ftq.evaluation import benchmark_scores

    task, metric, tolerance = guard["task"], guard["metric"], float(guard["tolerance"])
    verdict = {"task": task, "metric": metric, "tolerance": tolerance, "confidence": confidence}
    section = ((merged or {}).get("metrics") or {}).get("benchmarks", {}).get(task) or {}
    mine = benchmark_scores.per_item(candidate.get("benchmark_rows") or [], task, metric)
    theirs = benchmark_scores.per_item((merged or {}).get("benchmark_rows") or [], task, metric)
    if not mine or not theirs:
        why = section.get("status") if section.get("status", "ok") != "ok" else (
            f"{task} {metric} was not scored for {'merged' if not theirs else candidate['name']} "
            f"(evaluate.lm_eval.local_data)")
        return {**verdict, "status": "skipped", "reason": why}
    d = benchmark_scores.vs_merged(mine, theirs, confidence, f"{candidate['name']} vs merged on {task}")
    verdict.update(diff=d["diff"], interval=d["interval"], items=d["examples"])
    low, high = d["interval"]
    if high < -tolerance:
        return {**verdict, "status": "rejected",
                "reason": f"general ability lost: {task} {metric} {d['diff']:+.4f} vs merged [{low:+.4f}, {high:+.4f}] "
                          f"on {d['examples']} paired items lies wholly below -{tolerance:g} at {confidence:.0%} "
                          f"confidence (promote.policy.general_guard)"}
    return {**verdict, "status": "pass"}


def ci_key(name: str, confidence: float) -> str:
    return f"{name}_ci{round(confidence * 100):d}"


def retention(candidate: dict, merged: dict, policy: dict) -> dict:
    """The candidate's metric as a share of merged's, paired over the same examples, with its interval."""
    key = per_example_key(policy["metric"])
    mine, reference = paired.pair(candidate["scores"], merged["scores"], key, f"{candidate['name']} vs merged")
    if policy["direction"] == "min":
        mine, reference = reference, mine
    try:
        return paired.ratio(mine, reference, float(policy["confidence"]))
    except ZeroDivisionError:
        raise PromotionError(
            f"reports/eval/{'merged' if policy['direction'] == 'max' else candidate['name']}.json: "
            f"{policy['metric']} is 0, so retention against merged is undefined; a fine-tune that scores 0 on "
            "its own task cannot anchor a promotion (check the task data, or pick another promote.policy.metric)"
        ) from None


def judge(candidate: dict, merged: dict | None, policy: dict) -> list[str]:
    """Why a candidate may not be champion; empty if it passes the policy. Sets candidate['retention']
    and candidate['general_guard']."""
    manifest, metrics, metric = candidate["manifest"], candidate["metrics"], policy["metric"]
    if manifest is None:
        return ["no build (models/quantized/<name>/manifest.json missing)"]
    if not manifest.get("check", {}).get("passed"):
        return ["its quantize check did not pass"]
    if metrics is None or candidate["scores"] is None:
        return ["not evaluated (no reports/eval/builds/<name>.json: see reports/ladder.json for why)"]
    if not isinstance(metrics.get(metric), (int, float)):
        return [f"no value for the primary metric {metric}"]
    reasons = []
    if policy["min_retention"] <= 0:  # no retention asked: merged's score (even 0) anchors nothing
        pass
    elif merged is None or merged["scores"] is None:
        reasons.append("merged is not evaluated (reports/eval/merged.json): retention cannot be measured")
    else:
        kept = candidate["retention"] = retention(candidate, merged, policy)
        low, high = kept["interval"]
        if high < policy["min_retention"]:
            reasons.append(f"{metric} retention {kept['ratio']:.1%} of merged [{low:.1%}, {high:.1%}] is below "
                           f"{policy['min_retention']:.0%} at {policy['confidence']:.0%} confidence")
    guard = policy["general_guard"]
    if guard["task"]:
        verdict = candidate["general_guard"] = general_guard(candidate, merged, guard, float(policy["confidence"]))
        if verdict["status"] == "rejected":
            reasons.append(verdict["reason"])
    cap = policy["max_size_bytes"]
    if cap is not None and manifest["size_bytes"] > cap:
        reasons.append(f"size {manifest['size_bytes']:,} bytes > max_size_bytes {int(cap):,}")
    return reasons


def breaker_values(candidate: dict, policy: dict) -> tuple:
    """The tie-breakers, each signed so that larger is better."""
    def signed(metric: str, direction: str) -> float:
        value = (candidate["metrics"] or {}).get(metric)
        if value is None:
            value = (candidate["manifest"] or {}).get(metric)
        if not isinstance(value, (int, float)):
            return float("-inf")
        return value if direction == "max" else -value

    return tuple(signed(*breaker.rsplit(":", 1)) for breaker in policy["tie_breakers"])


def rank(eligible: list[dict], policy: dict, prefer: str | None = None) -> list[dict]:
    """Best first: the builds tied with the best (difference interval reaching 0) by tie-breakers (the
    version `prefer`, the current champion, winning exact ties), then the rest by the metric. Sets
    row['vs_best'] and row['tied']."""
    if not eligible:
        return []
    sign = 1 if policy["direction"] == "max" else -1
    best = max(eligible, key=lambda r: (sign * r["candidate"]["metrics"][policy["metric"]],
                                        breaker_values(r["candidate"], policy), r["candidate"]["name"]))
    for row in eligible:
        row["vs_best"] = compare(row["candidate"], best["candidate"], policy,
                                 f"{row['candidate']['name']} vs {best['candidate']['name']}")
        row["tied"] = row["vs_best"]["interval"][1] >= 0
    return sorted(eligible, key=lambda r: (r["tied"], breaker_values(r["candidate"], policy) if r["tied"] else (),
                                           r["version"] == prefer and prefer is not None,
                                           sign * r["candidate"]["metrics"][policy["metric"]], r["candidate"]["name"]),
                  reverse=True)


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
        "lineage.params_hash": params_hash({k: params.get(k) for k in ("base", "data", "train", "preference", "merge", "quantize")}),
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
    artifact store (or an earlier upload of it reused: ftq.registry.upload), read back and verified,
    and a version is created from that logged copy, all under the registry lock."""
    from ftq.registry.lock import registry_lock
    from ftq.registry.upload import upload_build

    manifest, name = candidate["manifest"], candidate["name"]
    digest = build_digest(manifest)
    version = existing_version(client, model_name, digest)
    if version is not None:
        return version, False
    ids = run_ids(client, params, name)
    with registry_lock(client, model_name):
        version = existing_version(client, model_name, digest)  # another promote registered these bytes meanwhile
        if version is not None:
            return version, False
        logged = upload_build(client, model_name, exp_id, name, root / "models" / "quantized" / name, manifest,
                              ids["quantize"], root / ".ftq")
        tags = {**version_tags(candidate, params, ids), MODEL_TAG: logged.sha256, FILES_TAG: files_tag(logged.files)}
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

    model_name = schema.settings(params, "promote")["model_name"]
    policy = policy_of(params)
    root = repo_root()
    names = schema.settings(params, "quantize")["enabled"]
    merged = {"name": "merged", **evaluation(root, "merged", policy["metric"])}
    if merged["metrics"] is None:
        merged = None
    client = mlflow_client(params)
    with stage_run("promote", params) as tracked:
        ensure_registered_model(client, model_name)
        exp_id = experiment_id(client, params)
        rows = []
        for candidate in candidates(root, names, policy["metric"]):
            reasons = judge(candidate, merged, policy)
            version, created = (None, False)
            # registered: builds that passed their screen and were evaluated (the ladder leaves larger ones out)
            if candidate["manifest"] is not None and candidate["manifest"].get("check", {}).get("passed") \
                    and candidate["metrics"] is not None:
                version, created = register(client, model_name, candidate, root, params, exp_id)
            rows.append({"candidate": candidate, "version": version, "registered_now": created, "reasons": reasons})
        (root / CHAMPION_ANSWERS).unlink(missing_ok=True)  # an earlier run's; written again if needed
        scorer = ChampionScorer(client, model_name, rows, merged, policy, params, root)
        champion_before, decision, ranked = move_aliases(client, model_name, rows, scorer, policy)
        report = promotion_report(model_name, policy, rows, ranked, champion_before, decision, merged)
        atomic_write_json(root / REPORT, report)
        tracked.log_artifact(root / REPORT)
        if scorer.answers_file is not None:
            tracked.log_artifact(scorer.answers_file)
        tracked.set_tags({"promote.model_name": model_name, "promote.champion": report["champion"]["version"] or ""})
        tracked.log_metrics({"candidates": len(rows), "eligible": sum(not r["reasons"] for r in rows),
                             "registered_now": sum(r["registered_now"] for r in rows)})
    log.info("champion: %s", report["champion"])
    return report


class ChampionScorer:
    """The current champion as a row scored on this run's examples: this run's row when the champion
    is one of these builds, otherwise its registered artifact re-evaluated on the current set."""

    def __init__(self, client, model_name, rows, merged, policy, params, root):
        self.client, self.model_name, self.rows, self.merged = client, model_name, rows, merged
        self.policy, self.params, self.root = policy, params, root
        self.answers_file: Path | None = None
        self._cache: dict[str, dict] = {}

    def __call__(self, before: dict | None) -> dict | None:
        if before is None:
            return None
        version = before["version"]
        for row in self.rows:
            if row["version"] == version:
                return {**row, "evaluation": f"evaluated in this run as build {row['candidate']['name']}"}
        if version not in self._cache:
            self._cache[version] = self._reevaluate(before)
        return self._cache[version]

    def _reevaluate(self, before: dict) -> dict:
        from ftq.registry.resolve import fetch, lookup
        from ftq.stages.evaluate import answer_all, preference_rows, task_examples
        from ftq.runtimes import open_model

        version, tags = before["version"], before["tags"]
        reference = f"models:/{self.model_name}/{version}"
        resolved = fetch(lookup(reference, self.params), self.params)
        cfg = schema.settings(self.params, "evaluate")
        examples = task_examples(self.root, cfg)
        log.info("champion version %s is not among this run's builds: re-evaluating it on the current %d examples",
                 version, len(examples))
        runtime = open_model(resolved.path)
        try:
            if self.policy["metric"] in PREFERENCE_KEYS:  # the champion on this run's held-out pairs
                answers = preference_rows(runtime, self.params, self.root)
            else:
                answers = answer_all(runtime, examples, int(cfg["max_new_tokens"]))
        finally:
            runtime.close()
        self.answers_file = self.root / CHAMPION_ANSWERS
        atomic_write_text(self.answers_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answers))
        key = per_example_key(self.policy["metric"])
        values = [r[key] for r in answers if key in r]
        metrics = {name[len("eval."):]: float(value) for name, value in tags.items()
                   if name.startswith("eval.") and _is_number(value)}
        metrics[self.policy["metric"]] = round(sum(values) / len(values), 4) if values else None
        candidate = {"name": f"v{version} ({tags.get('ftq.build', '?')})",
                     "manifest": {"size_bytes": int(tags.get("size_bytes") or 0), "check": {"passed": True}},
                     "metrics": metrics, "scores": {r["id"]: r for r in answers}}
        reasons = judge(candidate, self.merged, self.policy)
        return {"candidate": candidate, "version": version, "registered_now": False, "reasons": reasons,
                "evaluation": f"not among this run's builds: its registered artifact was re-evaluated on the current "
                              f"{len(answers)} examples ({CHAMPION_ANSWERS})"}


def _is_number(value: str) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


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


def move_aliases(client, model_name: str, rows: list[dict], scorer, policy: dict) -> tuple[dict | None, dict, list]:
    """Read the champion, decide, move it by compare-and-set, all under the registry lock; a champion
    moved by someone else since it was read (a conflict) means reading and deciding again."""
    from ftq.registry.lock import compare_and_set_alias, registry_lock

    with registry_lock(client, model_name):
        for _ in range(CAS_ATTEMPTS):
            before = current_champion(client, model_name)
            champion = scorer(before)
            decision, ranked = decide(rows, champion, policy, scorer.merged)
            decision["champion_row"] = champion
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
    return before, decision, ranked


def standing(ranked: list[dict], champion: dict) -> dict:
    """The champion's row in the ranking (with vs_best and tied)."""
    return next((r for r in ranked if r["version"] == champion["version"]), {})


def select_smallest_tied(ranked: list[dict], merged: dict | None, policy: dict) -> tuple[list[dict], str]:
    """`select: smallest_tied` (ftq.selection): the ranking with the smallest build tied with merged (or a
    larger one significantly better than every smaller) first, and why; the ranking as it was, and why,
    when merged is not evaluated or no build is tied with it."""
    if merged is None or merged.get("scores") is None:
        return ranked, "merged is not evaluated, so no build can be tied with it: the best by the metric"
    contenders = [{"name": r["candidate"]["name"], "scores": r["candidate"]["scores"], "row": r,
                   "size_bytes": (r["candidate"]["manifest"] or {}).get("size_bytes") or 0} for r in ranked]
    pick, why = smallest_tied(contenders, merged, policy)
    if pick is None:
        return ranked, f"{why}: the best by the metric"
    return [pick["row"], *[r for r in ranked if r is not pick["row"]]], why


def decide(rows: list[dict], champion: dict | None, policy: dict, merged: dict | None = None) -> tuple[dict, list[dict]]:
    """The champion competes with this run's eligible builds on the same examples. `select: best`: the top
    of the ranking (see `rank`) becomes champion, the current one winning exact ties; `smallest_tied`: the
    smallest build tied with merged (ftq.selection), the current champion among the builds. Returns the
    decision and the ranking (the pick first)."""
    eligible = [r for r in rows if not r["reasons"]]
    contenders = list(eligible)
    if champion is not None and not champion["reasons"] and all(r["version"] != champion["version"] for r in eligible):
        contenders.append(champion)
    ranked = rank(contenders, policy, prefer=(champion or {}).get("version"))
    decision = {"champion": None, "challenger": None, "note": "", "evaluation": None, "vs_champion": None}
    if champion is not None:
        decision["evaluation"] = champion["evaluation"]
    if not eligible:
        decision["note"] = "no candidate passes the policy; the alias stays where it was"
        return decision, ranked
    why = None
    if policy["select"] == "smallest_tied":
        ranked, why = select_smallest_tied(ranked, merged, policy)
    pick, metric = ranked[0], policy["metric"]
    level = f"{policy['confidence']:.0%}"
    if champion is None:
        decision.update(champion=pick["version"], note="first champion" + (f": {why}" if why else ""))
    elif why is not None and pick["version"] != champion["version"]:
        d = decision["vs_champion"] = compare(pick["candidate"], champion["candidate"], policy, "vs champion") \
            if champion["candidate"].get("scores") is not None else None
        versus = (f"; vs champion version {champion['version']}: {metric} {d['diff']:+.4f} "
                  f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]") if d else ""
        decision.update(champion=pick["version"], note=f"{pick['candidate']['name']}: {why}{versus}")
    elif why is not None:
        decision["note"] = f"the champion is still the pick: {why}"
    elif pick["version"] == champion["version"]:
        challenger = next((r for r in ranked if r["version"] != champion["version"]), None)
        if challenger is None:
            decision["note"] = "the best candidate is already champion"
        else:
            d = decision["vs_champion"] = compare(challenger["candidate"], champion["candidate"], policy, "vs champion")
            decision["note"] = (f"best candidate {challenger['candidate']['name']} does not beat champion version "
                                f"{champion['version']}: {metric} difference {d['diff']:+.4f} "
                                f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] at {level}; champion kept")
    elif champion["candidate"].get("scores") is None:  # e.g. the champion's build is enabled but failed evaluation
        decision.update(champion=pick["version"], note=f"champion version {champion['version']} has no scores on the "
                                                       f"current examples ({'; '.join(champion['reasons'])})")
    else:
        d = decision["vs_champion"] = compare(pick["candidate"], champion["candidate"], policy, "vs champion")
        diff = f"{metric} difference {d['diff']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] at {level}"
        if champion["reasons"]:
            why = f"champion version {champion['version']} no longer passes the policy ({'; '.join(champion['reasons'])})"
        elif d["interval"][0] > 0:
            why = f"{pick['candidate']['name']} beats champion version {champion['version']}: {diff}"
        elif standing(ranked, champion).get("tied"):
            why = (f"{pick['candidate']['name']} is tied with champion version {champion['version']} ({diff}) and "
                   f"wins the tie-breakers {policy['tie_breakers']}")
        else:
            below = standing(ranked, champion)["vs_best"]
            why = (f"champion version {champion['version']} is below the best build at {level} "
                   f"({below['diff']:+.4f} {below['interval']}); "
                   f"{pick['candidate']['name']} wins the tie-breakers among the builds tied with the best ({diff})")
        decision.update(champion=pick["version"], note=why)
    champion_version = decision["champion"] or (champion or {}).get("version")
    runner_up = next((r for r in ranked if r["version"] != champion_version and r["version"] is not None), None)
    if runner_up is not None:
        decision["challenger"] = runner_up["version"]
    return decision, ranked


def promotion_report(model_name, policy, rows, ranked, before, decision, merged) -> dict:
    champion_version = decision["champion"] or (before or {}).get("version")
    position = {r["version"]: i + 1 for i, r in enumerate(ranked)}
    confidence, metric = float(policy["confidence"]), policy["metric"]
    # every candidate's paired difference from the champion it competed with (the new one if none was)
    baseline = decision["champion_row"] or next((r for r in ranked if r["version"] == champion_version), None)
    if baseline is not None and baseline["candidate"].get("scores") is None:
        baseline = next((r for r in ranked if r["version"] == champion_version), None)
    listed = []
    for row in rows:
        name, metrics = row["candidate"]["name"], row["candidate"]["metrics"] or {}
        ranked_row = next((r for r in ranked if r is row), None)
        if row["reasons"]:
            status, why = "rejected", row["reasons"]
        elif row["version"] == champion_version:
            status, why = "champion", [decision["note"] or "best by the policy"]
        elif row["version"] == decision["challenger"]:
            status, why = "challenger", [f"ranked {position[row['version']]} by the policy"]
        else:
            status, why = "eligible", [f"ranked {position[row['version']]} by the policy"]
        entry = {"name": name, "version": row["version"], "registered_now": row["registered_now"], "status": status,
                 "reasons": why, "metric": metrics.get(metric), "metric_ci95": metrics.get(f"{metric}_ci95"),
                 "size_bytes": metrics.get("size_bytes")}
        for breaker in policy["tie_breakers"]:
            key = breaker.rsplit(":", 1)[0]
            entry.setdefault(key, metrics.get(key))
        if row["candidate"].get("general_guard"):
            entry["general_guard"] = row["candidate"]["general_guard"]
        kept = row["candidate"].get("retention")
        if kept:
            entry.update(retention=kept["ratio"], **{ci_key("retention", confidence): kept["interval"]})
        if ranked_row is not None:
            entry.update(tied_with_best=ranked_row["tied"], diff_vs_best=ranked_row["vs_best"]["diff"],
                         **{ci_key("diff_vs_best", confidence): ranked_row["vs_best"]["interval"]})
        if baseline is not None and row["candidate"]["scores"] is not None and not row["reasons"]:
            d = compare(row["candidate"], baseline["candidate"], policy, f"{name} vs champion")
            entry.update(diff=d["diff"], **{ci_key("diff", confidence): d["interval"]})
        listed.append(entry)
    champion_row = next((r for r in ranked if r["version"] == (before or {}).get("version")), None)
    vs = decision["vs_champion"]
    return {
        "model_name": model_name,
        "policy": policy,
        # False when the champion kept its alias only because nothing passes the policy now
        "champion_passes_policy": any(r["version"] == champion_version for r in ranked),
        "merged_metric": ((merged or {}).get("metrics") or {}).get(metric),
        "merged_metric_ci95": ((merged or {}).get("metrics") or {}).get(f"{metric}_ci95"),
        "champion": {"version": champion_version, "moved": decision["champion"] is not None, "note": decision["note"],
                     "previous": (before or {}).get("version"),
                     # how the previous champion was scored on this run's examples
                     "previous_evaluation": decision["evaluation"],
                     "previous_metric": champion_row["candidate"]["metrics"].get(metric) if champion_row else None},
        # the decisive paired comparison: the pick (or the runner-up, when the champion stays) minus the champion
        "vs_champion": {"diff": vs["diff"], ci_key("diff", confidence): vs["interval"], "examples": vs["examples"]}
        if vs else None,
        "challenger": decision["challenger"],
        # `diff` and its interval in each candidate: the candidate minus this version, example by example
        "diff_against_version": (baseline or {}).get("version"),
        "candidates": listed,
        # the examples a comparison rests on: those scored on the metric (JSON answers for JSON metrics)
        "paired_examples": next((r["vs_best"]["examples"] for r in ranked), None),
    }
