"""The promotion policy (params.yaml `promote.policy`), pure: per-example scores in, verdicts, rankings and a
decision out; no MLflow, no files, so it is tested in milliseconds on made-up scores.

- A candidate may be champion when it was made, passed its quantize check, was evaluated, keeps
  `min_retention` of merged's metric (the whole retention interval below it rejects), passes the
  general-ability guard, and fits `max_size_bytes` (`judge`). A merged score of 0 is an error: retention
  against it is undefined.
- `rank`: the best by the metric, and every contender whose paired difference from it has an interval
  reaching 0, are tied; the tie-breakers (size, then relative speed) order them, the incumbent winning
  exact ties.
- `decide`: `select: best` takes the top of the ranking; `smallest_tied` (ftq.selection) the smallest build
  tied with merged. The champion alias moves when the pick beats the incumbent (the interval of the
  difference lies above 0), when the incumbent is tied with the best and the pick wins the tie-breakers
  over it, or when the incumbent no longer passes the policy.

Words: a *candidate* is a build (or merged) with what evaluate measured; a *contender* is a candidate with
its registered version and verdict; the *incumbent* is the current champion scored on this run's examples;
*champion* is the registry alias and the version it points to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftq import schema
from ftq.evaluation import benchmark_scores, paired
from ftq.selection import difference, per_example_key, smallest_tied

class PromotionError(ValueError):
    """The numbers cannot support a decision (e.g. retention against a reference that scored 0)."""


@dataclass(frozen=True, eq=False)
class Candidate:
    """A build (or merged) and what evaluate measured of it; None where it was not made or not evaluated."""
    name: str
    manifest: dict | None = None               # models/quantized/<name>/manifest.json
    metrics: dict | None = None                # reports/eval[/builds]/<name>.json
    scores: dict[str, dict] | None = None      # the policy metric's per-example rows, by example id
    benchmark_rows: list[dict] | None = None   # lm-eval samples: the general-ability guard's items

    @property
    def size_bytes(self) -> int:
        return (self.manifest or {}).get("size_bytes") or 0

    def scored(self) -> dict:
        """The view ftq.selection compares: name, per-example scores, size."""
        return {"name": self.name, "scores": self.scores, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class Verdict:
    """Why a candidate may not be champion (`reasons`, empty when it passes), and the measurements behind it."""
    reasons: list[str] = field(default_factory=list)
    retention: dict | None = None       # {ratio, interval, ...} against merged, where min_retention asks for it
    general_guard: dict | None = None   # the guard's verdict, where a guard task is set

    @property
    def passes(self) -> bool:
        return not self.reasons


@dataclass(frozen=True, eq=False)
class Contender:
    """A candidate in the competition: its registry version (None where it was not registered) and verdict."""
    candidate: Candidate
    version: str | None
    verdict: Verdict
    registered_now: bool = False

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def passes(self) -> bool:
        return self.verdict.passes


@dataclass(frozen=True)
class Incumbent:
    """The current champion scored on this run's examples, and how (this run's evaluation or a re-evaluation)."""
    contender: Contender
    evaluation: str

    @property
    def version(self) -> str | None:
        return self.contender.version


@dataclass(frozen=True, eq=False)
class Ranked:
    """A contender's place against the best by the metric."""
    contender: Contender
    vs_best: dict   # its paired difference from the best {diff, interval, examples}
    tied: bool      # that interval reaches 0: not shown worse than the best

    @property
    def version(self) -> str | None:
        return self.contender.version


@dataclass(frozen=True)
class Decision:
    """Where the champion alias goes, and why."""
    moves_to: str | None        # the version the champion alias moves to; None: it stays where it was
    challenger: str | None      # the runner-up's version
    note: str
    ranking: list[Ranked]       # the pick first
    incumbent: Incumbent | None
    vs_champion: dict | None = None  # the decisive paired comparison against the incumbent, where one was made

    @property
    def champion_version(self) -> str | None:
        """The champion after this decision."""
        return self.moves_to or (self.incumbent.version if self.incumbent else None)


def policy_of(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml `promote.policy`, validated (its metric one scored per example: schema.PAIRED_METRICS)."""
    return schema.settings(params, "promote")["policy"]


def general_guard(candidate: Candidate, merged: Candidate | None, guard: dict, confidence: float) -> dict:
    """The general-ability guard's verdict: a build whose paired difference from merged on a standard
    task (HellaSwag by default) lies wholly below -tolerance has lost general ability and is rejected.
    Skipped, and saying why, where the task was not scored (its file is absent) on both sides."""
    task, metric, tolerance = guard["task"], guard["metric"], float(guard["tolerance"])
    verdict = {"task": task, "metric": metric, "tolerance": tolerance, "confidence": confidence}
    section = ((merged.metrics if merged else None) or {}).get("benchmarks", {}).get(task) or {}
    mine = benchmark_scores.per_item(candidate.benchmark_rows or [], task, metric)
    theirs = benchmark_scores.per_item((merged.benchmark_rows if merged else None) or [], task, metric)
    if not mine or not theirs:
        why = section.get("status") if section.get("status", "ok") != "ok" else (
            f"{task} {metric} was not scored for {'merged' if not theirs else candidate.name} "
            f"(evaluate.lm_eval.local_data)")
        return {**verdict, "status": "skipped", "reason": why}
    d = benchmark_scores.vs_merged(mine, theirs, confidence, f"{candidate.name} vs merged on {task}")
    verdict.update(diff=d["diff"], interval=d["interval"], items=d["examples"])
    low, high = d["interval"]
    if high < -tolerance:
        return {**verdict, "status": "rejected",
                "reason": f"general ability lost: {task} {metric} {d['diff']:+.4f} vs merged [{low:+.4f}, {high:+.4f}] "
                          f"on {d['examples']} paired items lies wholly below -{tolerance:g} at {confidence:.0%} "
                          f"confidence (promote.policy.general_guard)"}
    return {**verdict, "status": "pass"}


def retention(candidate: Candidate, merged: Candidate, policy: dict) -> dict:
    """The candidate's metric as a share of merged's, paired over the same examples, with its interval."""
    key = per_example_key(policy["metric"])
    mine, reference = paired.pair(candidate.scores, merged.scores, key, f"{candidate.name} vs merged")
    if policy["direction"] == "min":
        mine, reference = reference, mine
    try:
        return paired.ratio(mine, reference, float(policy["confidence"]))
    except ZeroDivisionError:
        raise PromotionError(
            f"reports/eval/{'merged' if policy['direction'] == 'max' else candidate.name}.json: "
            f"{policy['metric']} is 0, so retention against merged is undefined; a fine-tune that scores 0 on "
            "its own task cannot anchor a promotion (check the task data, or pick another promote.policy.metric)"
        ) from None


def unmeasured(candidate: Candidate, metric: str) -> str | None:
    """Why the candidate cannot be measured at all (not made, failed its check, not evaluated), or None."""
    manifest, metrics = candidate.manifest, candidate.metrics
    if manifest is None:
        return "no build (models/quantized/<name>/manifest.json missing)"
    if not manifest.get("check", {}).get("passed"):
        return "its quantize check did not pass"
    if metrics is None or candidate.scores is None:
        return "not evaluated (no reports/eval/builds/<name>.json: see reports/ladder.json for why)"
    if not isinstance(metrics.get(metric), (int, float)):
        return f"no value for the primary metric {metric}"
    return None


def judge(candidate: Candidate, merged: Candidate | None, policy: dict) -> Verdict:
    """The candidate against the policy: why it may not be champion (none: it passes), with its retention
    against merged and the general-ability guard's verdict where they were measured."""
    metric = policy["metric"]
    missing = unmeasured(candidate, metric)
    if missing is not None:
        return Verdict([missing])
    reasons, kept, guarded = [], None, None
    if policy["min_retention"] <= 0:  # no retention asked: merged's score (even 0) anchors nothing
        pass
    elif merged is None or merged.scores is None:
        reasons.append("merged is not evaluated (reports/eval/merged.json): retention cannot be measured")
    else:
        kept = retention(candidate, merged, policy)
        low, high = kept["interval"]
        if high < policy["min_retention"]:
            reasons.append(f"{metric} retention {kept['ratio']:.1%} of merged [{low:.1%}, {high:.1%}] is below "
                           f"{policy['min_retention']:.0%} at {policy['confidence']:.0%} confidence")
    guard = policy["general_guard"]
    if guard["task"]:
        guarded = general_guard(candidate, merged, guard, float(policy["confidence"]))
        if guarded["status"] == "rejected":
            reasons.append(guarded["reason"])
    cap, size = policy["max_size_bytes"], candidate.manifest["size_bytes"]
    if cap is not None and size > cap:
        reasons.append(f"size {size:,} bytes > max_size_bytes {int(cap):,}")
    return Verdict(reasons, kept, guarded)


def breaker_values(candidate: Candidate, policy: dict) -> tuple:
    """The tie-breakers, each signed so that larger is better (a value missing everywhere ranks last)."""
    def signed(metric: str, direction: str) -> float:
        value = (candidate.metrics or {}).get(metric)
        if value is None:
            value = (candidate.manifest or {}).get(metric)
        if not isinstance(value, (int, float)):
            return float("-inf")
        return value if direction == "max" else -value

    return tuple(signed(*breaker.rsplit(":", 1)) for breaker in policy["tie_breakers"])


def versus(a: Contender, b: Contender, policy: dict, where: str) -> dict:
    """a minus b on the policy's metric, example by example, with its interval."""
    return difference(a.candidate.scores, b.candidate.scores, policy, where)


def rank(contenders: list[Contender], policy: dict, prefer: str | None = None) -> list[Ranked]:
    """Best first: the contenders tied with the best (difference interval reaching 0) by tie-breakers (the
    version `prefer`, the incumbent, winning exact ties), then the rest by the metric."""
    if not contenders:
        return []
    metric, sign = policy["metric"], 1 if policy["direction"] == "max" else -1
    best = max(contenders, key=lambda c: (sign * c.candidate.metrics[metric], breaker_values(c.candidate, policy),
                                          c.name))
    ranking = []
    for c in contenders:
        d = versus(c, best, policy, f"{c.name} vs {best.name}")
        ranking.append(Ranked(c, d, d["interval"][1] >= 0))
    return sorted(ranking, key=lambda r: (r.tied, breaker_values(r.contender.candidate, policy) if r.tied else (),
                                          r.version == prefer and prefer is not None,
                                          sign * r.contender.candidate.metrics[metric], r.contender.name),
                  reverse=True)


def select_smallest_tied(ranking: list[Ranked], merged: Candidate | None, policy: dict) -> tuple[list[Ranked], str]:
    """`select: smallest_tied` (ftq.selection): the ranking with the smallest build tied with merged (or a
    larger one significantly better than every smaller) first, and why; the ranking as it was, and why,
    when merged is not evaluated or no build is tied with it."""
    if merged is None or merged.scores is None:
        return ranking, "merged is not evaluated, so no build can be tied with it: the best by the metric"
    builds = [{**r.contender.candidate.scored(), "ranked": r} for r in ranking]
    pick, why = smallest_tied(builds, merged.scored(), policy)
    if pick is None:
        return ranking, f"{why}: the best by the metric"
    return [pick["ranked"], *[r for r in ranking if r is not pick["ranked"]]], why


def decide(contenders: list[Contender], incumbent: Incumbent | None, policy: dict,
           merged: Candidate | None = None) -> Decision:
    """The incumbent competes with this run's contenders that pass the policy, on the same examples; the
    pick is the top of the ranking (`select: best`) or the smallest build tied with merged (`smallest_tied`)."""
    eligible = [c for c in contenders if c.passes]
    competing = list(eligible)
    # a re-evaluated incumbent (not one of this run's builds) competes too, where it still passes the policy
    if incumbent is not None and incumbent.contender.passes and all(c.version != incumbent.version for c in eligible):
        competing.append(incumbent.contender)
    ranking = rank(competing, policy, prefer=incumbent.version if incumbent else None)
    if not eligible:
        return Decision(None, None, "no candidate passes the policy; the alias stays where it was", ranking, incumbent)
    why = None
    if policy["select"] == "smallest_tied":
        ranking, why = select_smallest_tied(ranking, merged, policy)
    moves_to, note, vs_champion = against_incumbent(ranking, incumbent, policy, why)
    champion = moves_to or (incumbent.version if incumbent else None)
    runner_up = next((r.version for r in ranking if r.version != champion and r.version is not None), None)
    return Decision(moves_to, runner_up, note, ranking, incumbent, vs_champion)


def interval_text(d: dict) -> str:
    return f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]"


def against_incumbent(ranking: list[Ranked], incumbent: Incumbent | None, policy: dict,
                      why: str | None) -> tuple[str | None, str, dict | None]:
    """The pick (ranking[0]) against the incumbent: the version the alias moves to (None: it stays), the
    note saying why, and the decisive comparison. `why` is smallest_tied's reason for the pick, if it ran."""
    pick = ranking[0]
    if incumbent is None:
        return pick.version, "first champion" + (f": {why}" if why else ""), None
    if why is not None:
        return picked_smallest_tied(pick, incumbent, policy, why)
    if pick.version == incumbent.version:
        return kept_by_best(ranking, incumbent, policy)
    if incumbent.contender.candidate.scores is None:  # e.g. the champion's build is enabled but failed evaluation
        return pick.version, (f"champion version {incumbent.version} has no scores on the current examples "
                              f"({'; '.join(incumbent.contender.verdict.reasons)})"), None
    return overtaken(ranking, incumbent, policy)


def picked_smallest_tied(pick: Ranked, incumbent: Incumbent, policy: dict,
                         why: str) -> tuple[str | None, str, dict | None]:
    """smallest_tied picked a build: it replaces the incumbent unless it is the incumbent."""
    if pick.version == incumbent.version:
        return None, f"the champion is still the pick: {why}", None
    d = versus(pick.contender, incumbent.contender, policy, "vs champion") \
        if incumbent.contender.candidate.scores is not None else None
    against = (f"; vs champion version {incumbent.version}: {policy['metric']} {d['diff']:+.4f} {interval_text(d)}"
               if d else "")
    return pick.version, f"{pick.contender.name}: {why}{against}", d


def kept_by_best(ranking: list[Ranked], incumbent: Incumbent, policy: dict) -> tuple[None, str, dict | None]:
    """The incumbent tops the ranking: it stays, and the note compares the best other contender with it."""
    challenger = next((r for r in ranking if r.version != incumbent.version), None)
    if challenger is None:
        return None, "the best candidate is already champion", None
    d = versus(challenger.contender, incumbent.contender, policy, "vs champion")
    return None, (f"best candidate {challenger.contender.name} does not beat champion version {incumbent.version}: "
                  f"{policy['metric']} difference {d['diff']:+.4f} {interval_text(d)} at {policy['confidence']:.0%}; "
                  "champion kept"), d


def overtaken(ranking: list[Ranked], incumbent: Incumbent, policy: dict) -> tuple[str, str, dict]:
    """Another contender tops the ranking: why it replaces the incumbent."""
    pick, level = ranking[0], f"{policy['confidence']:.0%}"
    name, version = pick.contender.name, incumbent.version
    d = versus(pick.contender, incumbent.contender, policy, "vs champion")
    diff = f"{policy['metric']} difference {d['diff']:+.4f} {interval_text(d)} at {level}"
    standing = next((r for r in ranking if r.version == version), None)
    if incumbent.contender.verdict.reasons:
        failed = "; ".join(incumbent.contender.verdict.reasons)
        why = f"champion version {version} no longer passes the policy ({failed})"
    elif d["interval"][0] > 0:
        why = f"{name} beats champion version {version}: {diff}"
    elif standing is not None and standing.tied:
        why = (f"{name} is tied with champion version {version} ({diff}) and wins the tie-breakers "
               f"{policy['tie_breakers']}")
    else:
        below = standing.vs_best
        why = (f"champion version {version} is below the best build at {level} "
               f"({below['diff']:+.4f} {below['interval']}); "
               f"{name} wins the tie-breakers among the builds tied with the best ({diff})")
    return pick.version, why, d
