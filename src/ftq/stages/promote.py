"""Stage `promote`: register every quantized build in the MLflow model registry and move the alias
`champion` to the best one by the policy in params.yaml `promote`. It composes rooms of one job each:

- ftq.promotion.candidates reads each build's manifest, evaluation and per-example scores;
- ftq.promotion.policy (pure) judges each against the policy (non-inferiority against merged at the
  policy's margin, the general-ability guard at its tolerance, the size cap) and decides (the smallest
  build shown faithful, as stage ladder's fixed-sequence walk found it; or, with select best, Holm's
  procedure and the best by the metric), every test paired on the same held-out examples
  (reports/eval/<name>.answers.jsonl; statistics from ftq.evidence);
- ftq.registry.versions registers one version per distinct build (uploaded, verified, tagged);
- ftq.promotion.reevaluation scores the current champion on this run's examples (its registered
  artifact re-evaluated when it is not one of these builds);
- ftq.registry.aliases moves `champion` by compare-and-set under the registry lock, so a concurrent
  promote decides against the champion the other left; `challenger` marks the runner-up;
- ftq.promotion.report writes reports/promotion.json: every candidate with the reason it was chosen or
  rejected.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ftq import layout, schema
from ftq.io import atomic_write_json
from ftq.params import repo_root
from ftq.provenance import stamp
from ftq.promotion.candidates import read_candidate, read_merged
from ftq.promotion.policy import Candidate, Contender, decide, judge, policy_of
from ftq.promotion.reevaluation import CHAMPION_ANSWERS, ChampionReevaluation
from ftq.promotion.report import promotion_report
from ftq.registry.aliases import move_champion
from ftq.registry.versions import ensure_registered_model, register

log = logging.getLogger(__name__)

REPORT = layout.PROMOTION


def registrable(candidate: Candidate) -> bool:
    """Builds that passed their screen and were evaluated are registered (the ladder leaves larger ones out)."""
    return candidate.manifest is not None and bool(candidate.manifest.get("check", {}).get("passed")) \
        and candidate.metrics is not None


def contender(client, model_name: str, candidate: Candidate, merged: Candidate | None, policy: dict, root: Path,
              params: dict, exp_id: str) -> Contender:
    """The candidate judged (first: a policy that cannot be applied stops before anything is registered)
    and registered where it can be."""
    verdict = judge(candidate, merged, policy)
    version, created = register(client, model_name, candidate, root, params, exp_id) \
        if registrable(candidate) else (None, False)
    return Contender(candidate, version, verdict, created)


def walk_tests(root: Path) -> dict[str, dict]:
    """Each build's test in stage ladder's walk (reports/ladder.json), by name; none where the ladder did
    not walk (select best evaluates every build in full, and promote tests them itself)."""
    import json

    path = root / layout.LADDER
    ladder = json.loads(path.read_text()) if path.exists() else {}
    if ladder.get("select") != "smallest_faithful":
        return {}
    return {r["name"]: r["test"] for r in ladder.get("rungs", []) if "test" in r}


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.tracking import client as mlflow_client, experiment_id, stage_run

    model_name = schema.settings(params, "promote")["model_name"]
    policy = policy_of(params)
    root = repo_root()
    names = schema.settings(params, "quantize")["enabled"]
    merged = read_merged(root, policy["metric"])
    client = mlflow_client(params)
    with stage_run("promote", params) as tracked:
        ensure_registered_model(client, model_name)
        exp_id = experiment_id(client, params)
        contenders = [contender(client, model_name, read_candidate(root, name, policy["metric"]), merged, policy,
                                root, params, exp_id) for name in names]
        (root / CHAMPION_ANSWERS).unlink(missing_ok=True)  # an earlier run's; written again if needed
        reevaluation = ChampionReevaluation(model_name, contenders, merged, policy, params, root)
        decision = move_champion(client, model_name,
                                 lambda champion: decide(contenders, reevaluation(champion), policy))
        report = promotion_report(model_name, policy, contenders, decision, merged, walk_tests(root))
        report = stamp(report)
        atomic_write_json(root / REPORT, report)
        tracked.log_artifact(root / REPORT)
        if reevaluation.answers_file is not None:
            tracked.log_artifact(reevaluation.answers_file)
        tracked.set_tags({"promote.model_name": model_name, "promote.champion": report["champion"]["version"] or ""})
        tracked.log_metrics({"candidates": len(contenders), "eligible": sum(c.passes for c in contenders),
                             "registered_now": sum(c.registered_now for c in contenders)})
    log.info("champion: %s", report["champion"])
    return report
