"""The current champion on this run's examples, so that every decision is a paired comparison: this
run's contender when the champion is one of these builds, otherwise its registered artifact downloaded
(verified, ftq.registry.resolve) and re-evaluated on the current examples, since its stored tags come from
another evaluation (other examples, perhaps another task set)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ftq import evidence, schema
from ftq.io import atomic_write_text
from ftq.evaluation.forced import KEYS as FORCED_KEYS
from ftq.promotion.policy import Candidate, Contender, Incumbent, PromotionError, judge
from ftq.registry.aliases import Registered
from ftq.promotion.policy import per_example_key

log = logging.getLogger(__name__)

# the champion's answers when it had to be re-evaluated on the current examples (absent otherwise), and its
# lm-eval rows (the general-ability guard scores the incumbent like every candidate)
CHAMPION_ANSWERS = Path(".ftq/promotion.champion.answers.jsonl")
CHAMPION_LM_EVAL = Path(".ftq/promotion.champion.lm_eval")


class ChampionReevaluation:
    """champion (the alias's registered version) -> the Incumbent scored on this run's examples; a version
    is re-evaluated at most once per run, however often a conflicting promote makes the caller decide again."""

    def __init__(self, model_name: str, contenders: list[Contender], merged: Candidate | None, policy: dict,
                 params: dict, root: Path):
        self.model_name, self.contenders, self.merged = model_name, contenders, merged
        self.policy, self.params, self.root = policy, params, root
        self.answers_file: Path | None = None  # written where a champion was re-evaluated
        self._done: dict[str, Incumbent] = {}

    def __call__(self, champion: Registered | None) -> Incumbent | None:
        if champion is None:
            return None
        for contender in self.contenders:
            if contender.version == champion.version:
                return Incumbent(contender, f"evaluated in this run as build {contender.name}")
        if self.policy["metric"] in FORCED_KEYS:
            # a teacher-forced score measures closeness to this run's merged: a champion made from another
            # merged model is far from it by construction, however good it is, so the two cannot be compared
            raise PromotionError(
                f"champion version {champion.version} is not among this run's builds, and promote.policy.metric "
                f"{self.policy['metric']} measures closeness to this run's merged model only: it cannot say whether "
                "this run's pick is as good as a champion made from another fine-tune. Decide against it on a task "
                "metric (promote.policy.metric task_* or pref_*), or move the alias by hand in MLflow "
                f"(the UI, or MlflowClient().set_registered_model_alias('{self.model_name}', 'champion', <version>))")
        if champion.version not in self._done:
            self._done[champion.version] = self._reevaluate(champion)
        return self._done[champion.version]

    def _reevaluate(self, champion: Registered) -> Incumbent:
        from ftq.registry.resolve import fetch, lookup
        from ftq.runtimes import open_model

        log.info("champion version %s is not among this run's builds: re-evaluating its registered artifact on the "
                 "current examples", champion.version)
        from ftq.evaluation.candidate import context_size

        resolved = fetch(lookup(f"models:/{self.model_name}/{champion.version}", self.params), self.params)
        runtime = open_model(resolved.path, n_ctx=context_size(schema.settings(self.params, "evaluate")))
        try:
            answers = self._answers(runtime)
            benchmark_rows = self._guard_rows(runtime)
        finally:
            runtime.close()
        self.answers_file = self.root / CHAMPION_ANSWERS
        atomic_write_text(self.answers_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answers))
        candidate = self._candidate(champion, answers, benchmark_rows)
        contender = Contender(candidate, champion.version, judge(candidate, self.merged, self.policy))
        return Incumbent(contender, f"not among this run's builds: its registered artifact was re-evaluated on the "
                                    f"current {len(answers)} examples ({CHAMPION_ANSWERS})")

    def _answers(self, runtime) -> list[dict]:
        """The champion's per-example rows of the policy's metric on this run's examples (its answers, its
        scores on the held-out pairs, or its teacher-forced scores against this run's merged)."""
        from ftq.evaluation.candidate import scored_rows

        return scored_rows(runtime, self.params, self.root, self.policy["metric"], "champion")

    def _guard_rows(self, runtime) -> list[dict] | None:
        """The champion's rows on the lm-eval tasks (the guard's among them), where a guard is set."""
        from ftq import layout
        from ftq.evaluation import harness

        if not self.policy["general_guard"]["task"]:
            return None
        cfg = schema.settings(self.params, "evaluate")["lm_eval"]
        plan = harness.plan(cfg, self.root, self.params.get("_path", "params.yaml"),
                            layout.read_benchmark_manifest(self.root))
        out = self.root / CHAMPION_LM_EVAL
        harness.run(runtime, "champion", plan, out)
        samples = out / "champion.samples.jsonl"
        return [json.loads(line) for line in samples.read_text().splitlines() if line.strip()] \
            if samples.exists() else None

    def _candidate(self, champion: Registered, answers: list[dict], benchmark_rows: list[dict] | None) -> Candidate:
        """The champion as a candidate: its registered metrics (tags eval.*) with the policy's metric
        replaced by this run's, its size from its tags; its check passed when it was registered."""
        key = per_example_key(self.policy["metric"])
        values = [r[key] for r in answers if key in r]
        metrics = {name[len("eval."):]: float(value) for name, value in champion.tags.items()
                   if name.startswith("eval.") and is_number(value)}
        metrics[self.policy["metric"]] = evidence.mean_interval(values)["mean"] if values else None
        return Candidate(name=f"v{champion.version} ({champion.tags.get('ftq.build', '?')})",
                         manifest={"size_bytes": int(champion.tags.get("size_bytes") or 0), "check": {"passed": True}},
                         metrics=metrics, scores={r["id"]: r for r in answers}, benchmark_rows=benchmark_rows)


def is_number(value: str) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
