"""The promotion policy (params.yaml `promote.policy`), pure: per-example scores in, verdicts, rankings and a
decision out; no MLflow, no files, so it is tested in milliseconds on made-up scores. Every number comes
from ftq.evidence, the one module that owns the statistics.

- A build is *faithful* when it is shown within the policy's margin of merged on the policy's metric
  (non-inferiority, one-sided at `confidence`: `metric_test`) and, where a general-ability guard is set,
  within the guard's tolerance of merged on its standard task (`guard_test`); a guard whose data is
  absent fails closed. `judge` adds the size cap. Outcomes are faithful, worse or inconclusive;
  only faithful ships.
- `select: smallest_faithful` (the default): stage ladder tests the screened builds by fixed-sequence
  testing from the largest down (ftq.evidence.fixed_sequence: each test at the full level, the walk stops
  at the first build not shown faithful, the family-wise error of shipping an unfaithful build is at most
  1 - confidence) and ships the smallest build shown faithful. `select: best`: every screened build is
  evaluated, Holm's procedure decides which are shown faithful (the same error budget), and the best of
  them by the metric ships, size and speed breaking ties among those not shown worse than the best.
- The champion alias moves to the pick when there is no champion, when the champion no longer passes the
  policy, when the pick beats it (ftq.evidence.superiority), or (smallest_faithful) when both pass and
  the pick is smaller; (best) when it is not shown better than the pick and the pick wins the tie-breakers.

Words: a *candidate* is a build (or merged) with what evaluate measured; a *contender* is a candidate with
its registered version and verdict; the *incumbent* is the current champion scored on this run's examples;
*champion* is the registry alias and the version it points to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftq import evidence, schema

SELECT = ("smallest_faithful", "best")
# promote.policy.metric -> the per-example key of its rows (preference metrics score held-out pairs)
PREFERENCE_KEYS = {"pref_accuracy": "pref_accuracy", "pref_logp_accuracy": "logp_accuracy"}
FIXED_SEQUENCE = ("fixed-sequence testing from the largest build down (each test at the full level; the walk "
                  "stops at the first build not shown faithful; family-wise error at most 1 - confidence)")
HOLM = "Holm's step-down procedure over every evaluated build (family-wise error at most 1 - confidence)"


class PromotionError(ValueError):
    """The numbers cannot support a decision."""


def per_example_key(metric: str) -> str:
    from ftq.evaluation.forced import KEYS as FORCED_KEYS

    return PREFERENCE_KEYS.get(metric) or FORCED_KEYS.get(metric) or metric[len("task_"):]


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


@dataclass(frozen=True)
class Verdict:
    """Why a candidate may not be champion (`reasons`, empty when it passes), and the tests behind it."""
    reasons: list[str] = field(default_factory=list)
    metric_test: dict | None = None     # ftq.evidence.non_inferiority against merged on the policy's metric
    general_guard: dict | None = None   # the guard's test, where a guard task is set

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
    vs_best: dict   # ftq.evidence.superiority of the best over it
    tied: bool      # not shown worse than the best (the best does not beat it)

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
    procedure: str | None = None     # how several builds shared one error budget

    @property
    def champion_version(self) -> str | None:
        """The champion after this decision."""
        return self.moves_to or (self.incumbent.version if self.incumbent else None)


def policy_of(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml `promote.policy`, validated (its metric one scored per example: schema.PAIRED_METRICS; a
    teacher-forced metric read in its own direction, on the absolute scale: a KL divergence has no share of
    merged's, which is 0, and a log-probability is negative)."""
    from ftq.evaluation.forced import DIRECTIONS
    from ftq.params import ParamsError

    policy = schema.settings(params, "promote")["policy"]
    metric, where = policy["metric"], params.get("_path", "params.yaml")
    if metric in DIRECTIONS and policy["direction"] != DIRECTIONS[metric]:
        raise ParamsError(f"{where}: promote.policy.direction: {metric} is read with direction "
                          f"{DIRECTIONS[metric]}, not {policy['direction']}")
    if metric in DIRECTIONS and policy["margin_scale"] != "absolute":
        raise ParamsError(f"{where}: promote.policy.margin_scale: {metric} takes an absolute margin (nats per "
                          f"answer token), not {policy['margin_scale']}")
    return policy


def alpha(policy: dict) -> float:
    return 1 - float(policy["confidence"])


# --- the tests --------------------------------------------------------------------------------------------

def metric_test(mine: dict[str, dict], merged: dict[str, dict], policy: dict, where: str, **options) -> dict:
    """Non-inferiority of `mine` against merged on the policy's metric and margin, example by example
    (ftq.evidence.non_inferiority, `options` passed on; `diff` signed so that > 0 is better)."""
    a, b = evidence.pair(mine, merged, per_example_key(policy["metric"]), where)
    return {"metric": policy["metric"], **evidence.non_inferiority(
        a, b, float(policy["margin"]), float(policy["confidence"]), relative=policy["margin_scale"] == "relative",
        lower_is_better=policy["direction"] == "min", **options)}


def per_item(rows: list[dict], task: str, metric: str) -> dict[str, dict]:
    """{doc_id: {metric: value}} of one task's rows in an lm-eval samples file."""
    return {str(r["doc_id"]): {metric: float(r[metric])} for r in rows if r.get("task") == task and metric in r}


def guard_test(benchmark_rows: list[dict] | None, merged: Candidate | None, policy: dict, name: str,
               bounds: bool = True) -> dict | None:
    """The general-ability guard: non-inferiority against merged on a standard task (HellaSwag by default),
    item by item, at the guard's tolerance; None where the guard is switched off (task null). Where either
    side was not scored on it (its file absent) the outcome is `absent`: the guard fails closed."""
    guard = policy["general_guard"]
    task, metric, tolerance = guard["task"], guard["metric"], float(guard["tolerance"])
    if not task:
        return None
    head = {"task": task, "metric": metric, "tolerance": tolerance, "confidence": float(policy["confidence"])}
    mine = per_item(benchmark_rows or [], task, metric)
    theirs = per_item((merged.benchmark_rows if merged else None) or [], task, metric)
    if not mine or not theirs:
        section = ((merged.metrics if merged else None) or {}).get("benchmarks", {}).get(task) or {}
        status = section.get("status") if section.get("status", "ok") != "ok" else None
        who = "merged" if not theirs else name
        return {**head, "outcome": "absent",
                "reason": f"{task} {metric} was not scored for {who}" + (f" ({status})" if status else "") +
                          ": the guard fails closed (switch it off by name: promote.policy.general_guard.task: null)"}
    a, b = evidence.pair(mine, theirs, metric, f"{name} vs merged on {task}")
    return {**head, "items": len(a), **evidence.non_inferiority(a, b, tolerance, float(policy["confidence"]),
                                                                 bounds=bounds)}


def outcome_of(metric: dict, guard: dict | None) -> str:
    """A build is faithful only when every test says so (an intersection-union test: no adjustment needed)."""
    outcomes = [metric["outcome"]] + ([guard["outcome"]] if guard else [])
    if all(o == evidence.FAITHFUL for o in outcomes):
        return evidence.FAITHFUL
    return evidence.WORSE if evidence.WORSE in outcomes else "absent" if "absent" in outcomes \
        else evidence.INCONCLUSIVE


def p_value_of(metric: dict, guard: dict | None) -> float:
    """The intersection-union p-value of "not faithful": the largest of the tests' (1 where a guard is absent)."""
    return max(metric["p_value"], (guard.get("p_value", 1.0) if guard else 0.0))


def signed(value: float) -> str:
    """Four decimals, or three significant digits for a smaller value (a divergence of a few millionths)."""
    return f"{value:+.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:+.3g}"


def explain(test: dict, what: str) -> str:
    """One line a person can check: the outcome, the difference, the one-sided bound against the margin,
    the p-value, the test and the examples (and how many would decide an inconclusive one)."""
    if test["outcome"] == "absent":
        return test["reason"]
    margin = test.get("tolerance", test["margin"])
    against = (f"{signed(test['lower'])} of build - {1 - margin:g} x merged against 0" if test.get("margin_scale")
               == "relative" else f"{signed(test['lower'])} against margin -{margin:g}")
    line = (f"{what} {test['outcome']}: {signed(test['diff'])} vs merged, one-sided {test['confidence']:.0%} bound "
            f"{against}, p = {test['p_value']:.4g} ({test['test']}, {test['examples']} examples)")
    if test["outcome"] == evidence.INCONCLUSIVE:
        needed = test.get("needed_examples")
        line += (f"; about {needed} examples would show it faithful if the observed difference holds" if needed
                 else "; the observed difference is beyond the margin: more examples would not show it faithful")
    return line


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
    """The candidate against the policy: why it may not be champion (none: it is faithful on the metric and
    the guard and fits the size cap), with the tests behind it."""
    missing = unmeasured(candidate, policy["metric"])
    if missing is not None:
        return Verdict([missing])
    if merged is None or merged.scores is None:
        return Verdict(["merged is not evaluated (reports/eval/merged.json): faithfulness cannot be shown"])
    reasons = []
    metric = metric_test(candidate.scores, merged.scores, policy, f"{candidate.name} vs merged")
    if metric["outcome"] != evidence.FAITHFUL:
        reasons.append(explain(metric, policy["metric"]))
    guard = guard_test(candidate.benchmark_rows, merged, policy, candidate.name)
    if guard is not None and guard["outcome"] != evidence.FAITHFUL:
        reasons.append(explain(guard, f"general ability ({guard['task']} {guard['metric']})"))
    cap, size = policy["max_size_bytes"], candidate.manifest["size_bytes"]
    if cap is not None and size > cap:
        reasons.append(f"size {size:,} bytes > max_size_bytes {int(cap):,}")
    return Verdict(reasons, metric, guard)


# --- several builds, one error budget ------------------------------------------------------------------

def walk_order(rungs: list[dict]) -> list[str]:
    """The fixed sequence, set before any build is evaluated: largest first (the likeliest to be faithful);
    builds of one type (the same quantization with and without the importance matrix, a few bytes of
    metadata apart) in a place of their own, the one with the importance matrix first (a priori the more
    faithful), whatever their bytes say. Rungs: {name, size_bytes, type, imatrix}."""
    largest: dict = {}
    for r in rungs:
        largest[r.get("type") or r["name"]] = max(largest.get(r.get("type") or r["name"], 0), r["size_bytes"])
    return [r["name"] for r in sorted(rungs, key=lambda r: (-largest[r.get("type") or r["name"]],
                                                               r.get("type") or r["name"], not r.get("imatrix"),
                                                               r["name"]))]


def holm_verdicts(contenders: list[Contender], policy: dict) -> list[Contender]:
    """`select: best`: Holm's procedure over every tested build's intersection-union p-value (those that
    failed on their own count in the family too: leaving them out would spend the budget only on the
    winners); a build Holm does not reject gains a reason (its own test at the full level is not enough)."""
    tested = {c.name: p_value_of(c.verdict.metric_test, c.verdict.general_guard) for c in contenders
              if c.verdict.metric_test is not None}
    rejected = evidence.holm(tested, alpha(policy))
    out = []
    for c in contenders:
        if c.name in tested and not rejected[c.name] and c.passes:
            why = (f"not shown faithful once {len(tested)} builds share the error budget (Holm: p = "
                   f"{tested[c.name]:.4g})")
            c = Contender(c.candidate, c.version, Verdict([why], c.verdict.metric_test, c.verdict.general_guard),
                          c.registered_now)
        out.append(c)
    return out


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


def beats(a: Contender, b: Contender, policy: dict, where: str) -> dict:
    """Is a better than b on the policy's metric, example by example (ftq.evidence.superiority)?"""
    x, y = evidence.pair(a.candidate.scores, b.candidate.scores, per_example_key(policy["metric"]), where)
    if policy["direction"] == "min":
        x, y = [-v for v in x], [-v for v in y]
    return evidence.superiority(x, y, float(policy["confidence"]))


def rank(contenders: list[Contender], policy: dict, prefer: str | None = None) -> list[Ranked]:
    """Best first: the contenders the best does not beat (tied) ordered by the tie-breakers (the version
    `prefer`, the incumbent, winning exact ties), then the rest by the metric."""
    if not contenders:
        return []
    metric, sign = policy["metric"], 1 if policy["direction"] == "max" else -1
    best = max(contenders, key=lambda c: (sign * c.candidate.metrics[metric], breaker_values(c.candidate, policy),
                                          c.name))
    ranking = []
    for c in contenders:
        d = beats(best, c, policy, f"{best.name} vs {c.name}") if c is not best else {
            "p_value": 1.0, "better": False, "diff": 0.0}
        ranking.append(Ranked(c, d, not d["better"]))
    return sorted(ranking, key=lambda r: (r.tied, breaker_values(r.contender.candidate, policy) if r.tied else (),
                                          r.version == prefer and prefer is not None,
                                          sign * r.contender.candidate.metrics[metric], r.contender.name),
                  reverse=True)


def decide(contenders: list[Contender], incumbent: Incumbent | None, policy: dict) -> Decision:
    """The pick among this run's contenders that pass the policy (smallest_faithful: the smallest; best: the
    best by the metric after Holm), then the pick against the incumbent."""
    procedure = FIXED_SEQUENCE if policy["select"] == "smallest_faithful" else HOLM
    if policy["select"] == "best":
        contenders = holm_verdicts(contenders, policy)
    eligible = [c for c in contenders if c.passes]
    if not eligible:
        ranking = rank([incumbent.contender] if incumbent and incumbent.contender.passes else [], policy)
        return Decision(None, None, "no build is shown faithful by the policy; the alias stays where it was",
                        ranking, incumbent, procedure=procedure)
    if policy["select"] == "smallest_faithful":
        ordered = sorted(eligible, key=lambda c: (c.candidate.size_bytes, c.name))
        ranking = [Ranked(c, {}, True) for c in ordered]
        why = (f"the smallest build shown faithful ({explain(ordered[0].verdict.metric_test, policy['metric'])})")
    else:
        ranking = rank(eligible, policy, prefer=incumbent.version if incumbent else None)
        why = "the best build by the metric among those shown faithful"
    moves_to, note, vs_champion = against_incumbent(ranking, incumbent, policy, why)
    champion = moves_to or (incumbent.version if incumbent else None)
    runner_up = next((r.version for r in ranking if r.version != champion and r.version is not None), None)
    return Decision(moves_to, runner_up, note, ranking, incumbent, vs_champion, procedure)


def against_incumbent(ranking: list[Ranked], incumbent: Incumbent | None, policy: dict,
                      why: str) -> tuple[str | None, str, dict | None]:
    """The pick (ranking[0]) against the incumbent: the version the alias moves to (None: it stays), the
    note saying why, and the decisive comparison."""
    pick = ranking[0]
    name = pick.contender.name
    if incumbent is None:
        return pick.version, f"first champion: {name}, {why}", None
    if pick.version == incumbent.version:
        return None, f"the champion is still the pick: {name}, {why}", None
    version = incumbent.version
    if incumbent.contender.candidate.scores is None:
        return pick.version, (f"champion version {version} has no scores on the current examples "
                              f"({'; '.join(incumbent.contender.verdict.reasons)})"), None
    if not incumbent.contender.passes:
        return pick.version, (f"champion version {version} no longer passes the policy "
                              f"({'; '.join(incumbent.contender.verdict.reasons)}); {name}: {why}"), None
    d = beats(pick.contender, incumbent.contender, policy, "vs champion")
    shown = f"{policy['metric']} {d['diff']:+.4f} vs champion, p = {d['p_value']:.4g} ({d['test']})"
    if d["better"]:
        return pick.version, f"{name} beats champion version {version}: {shown}", d
    smaller = pick.contender.candidate.size_bytes < incumbent.contender.candidate.size_bytes
    if policy["select"] == "smallest_faithful" and smaller:
        return pick.version, (f"{name} and champion version {version} are both shown faithful and {name} is "
                              f"smaller ({shown})"), d
    if policy["select"] == "best":
        back = beats(incumbent.contender, pick.contender, policy, "champion vs pick")
        if not back["better"] and breaker_values(pick.contender.candidate, policy) > \
                breaker_values(incumbent.contender.candidate, policy):
            return pick.version, (f"{name} is not shown worse than champion version {version} ({shown}) and "
                                  f"wins the tie-breakers {policy['tie_breakers']}"), d
    return None, f"{name} does not beat champion version {version} ({shown}); champion kept", d
