"""The statistics every promotion decision rests on, in one place and pure: per-example scores in, verdicts
with their numbers out (no files, no models), so each is tested in milliseconds and by simulation.

A build is compared with merged on the same examples (paired). The questions, and the test for each:

* **Is it faithful?** Non-inferiority at a margin declared before the data: H0 "build - merged <= -margin"
  against H1 "build - merged > -margin", one-sided at level alpha = 1 - confidence. Three outcomes:
  `faithful` (H0 rejected: the one-sided lower bound clears -margin), `worse` (the mirror test rejects
  "build - merged >= -margin": the one-sided upper bound lies below -margin) and `inconclusive` (neither:
  more examples are needed, and how many is estimated). Inconclusive never ships.
  - 0/1 scores on both sides: an exact unconditional test (no large-sample approximation). Its statistic
    is Tango's score statistic for a paired difference of proportions (Tango 1998, the standard for paired
    non-inferiority), its p-value the largest tail probability over the nuisance parameter (the share of
    examples merged gets right and the build wrong) on the null's boundary, from the exact trinomial of
    (wins, losses, ties). At margin 0 it is a test of "no worse"; McNemar's exact test is `superiority`.
  - other scores: a BCa bootstrap of the mean difference, which corrects for the bias and skew that
    sparse, lopsided differences have (a percentile bootstrap does not); its p-value is the achieved level
    that inverts the same bound. A studentized bootstrap was tried and dropped: resamples in which no
    example differs have no standard error, and with a few differing examples among many they decide the
    bound (tests/test_evidence.py and bench/decision_rule.py measure the chosen test's error rates).
  - a relative margin (the build keeps at least 1 - margin of merged's mean) tests the differences
    build - (1 - margin) * merged against 0, by the BCa bootstrap.
* **Does it beat another?** Superiority, H0 "no difference": McNemar's exact test (scipy's binomial test
  on the discordant pairs) for 0/1 scores, an exact sign-flip permutation test (scipy) otherwise.
* **One candidate's score**: the exact Clopper-Pearson interval for 0/1 scores, scipy's BCa bootstrap
  otherwise.

scipy has the binomial, permutation and BCa machinery and is used for them; neither scipy nor statsmodels
has a paired non-inferiority test with a margin, hence the two written here (checked by simulation in
tests/test_evidence.py and against the statistics' known values).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

FAITHFUL, WORSE, INCONCLUSIVE = "faithful", "worse", "inconclusive"
OUTCOMES = (FAITHFUL, WORSE, INCONCLUSIVE)
BOOTSTRAP_SAMPLES = 9999
NUISANCE_GRID = 200     # points of the nuisance parameter the exact test maximises over
BERGER_BOOS_GAMMA = 1e-3  # the exact test maximises over a 1 - gamma interval of the nuisance, adding gamma
POWER = 0.8             # the power `needed_examples` plans for


class PairingError(ValueError):
    """The two sides were not scored on the same examples."""


def pair(a: dict, b: dict, key: str, where: str) -> tuple[list[float], list[float]]:
    """The values of `key` for the examples both sides scored ({id: row}); the example sets must be equal
    and every row must have the key."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise PairingError(f"{where}: not scored on the same examples (only in one: {only_a}, only in the other: "
                           f"{only_b}); evaluate both on the current set")
    ids = sorted(i for i in a if key in a[i])
    if not ids or any(key not in b[i] for i in ids):
        raise PairingError(f"{where}: field '{key}' is missing from the per-example scores")
    return [float(a[i][key]) for i in ids], [float(b[i][key]) for i in ids]


def is_binary(*sides) -> bool:
    return all(set(np.unique(np.asarray(s, dtype=float))) <= {0.0, 1.0} for s in sides)


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(confidence))


# --- non-inferiority ------------------------------------------------------------------------------------

def non_inferiority(build, reference, margin: float, confidence: float = 0.95, relative: bool = False,
                    lower_is_better: bool = False, seed: int = 0, bounds: bool = True,
                    resamples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Is `build` (per-example scores, larger is better unless `lower_is_better`) within `margin` of
    `reference` (the same examples in the same order)? Returns the test's name, the examples, the observed
    difference, the one-sided
    bounds at `confidence` (`lower`, `upper`), the p-value of H0 "worse by the margin or more", the
    p-value of the mirror H0 ("not worse by the margin"), the outcome, and for an inconclusive one the
    examples that would decide it (`needed_examples`). `bounds=False` leaves out the exact test's bounds
    (a bisection, for reports; decisions rest on the p-values) and `resamples` sets the bootstrap's size:
    both for simulations that repeat the decision thousands of times."""
    x, y = np.asarray(build, dtype=float), np.asarray(reference, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise PairingError(f"non-inferiority needs two equal, non-empty lists of paired scores (got {x.shape} and "
                           f"{y.shape})")
    if not 0 <= margin < 1 or not 0.5 <= confidence < 1:
        raise ValueError(f"margin {margin} must be in [0, 1) and confidence {confidence} in [0.5, 1)")
    factor = 1 + margin if lower_is_better else 1 - margin  # relative: the build keeps `factor` of merged
    if lower_is_better:  # flipped so that larger is better (0/1 scores stay 0/1)
        x, y = (1 - x, 1 - y) if is_binary(x, y) and not relative else (-x, -y)
    span = max(1.0, float(np.abs(np.concatenate([x, y])).max()))  # the scores' range (0..1 for every metric)
    if relative:
        result = _bca(x - factor * y, 0.0, confidence, seed, resamples, span)
        result.update(test=f"BCa bootstrap of build - {factor:g} x merged ({resamples} resamples)",
                      margin_scale="relative", diff=_round(x.mean() - y.mean()))
    elif is_binary(x, y):
        wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        result = _exact_paired_binary(wins, losses, len(x), margin, confidence, bounds)
    else:
        result = _bca(x - y, margin, confidence, seed, resamples, span)
        result["test"] = f"BCa bootstrap of the mean difference ({resamples} resamples)"
    alpha = 1 - confidence
    outcome = FAITHFUL if result["p_value"] <= alpha else WORSE if result["p_worse"] <= alpha else INCONCLUSIVE
    result.update(margin=margin, confidence=confidence, outcome=outcome)
    result.setdefault("margin_scale", "absolute")
    if outcome == INCONCLUSIVE:
        result["needed_examples"] = needed_examples(result, margin, confidence)
    return result


def needed_examples(result: dict, margin: float, confidence: float, power: float = POWER) -> int | None:
    """Paired examples that would show non-inferiority with `power`, if the true difference and the spread
    of the per-example differences are the ones observed (normal approximation); None where the observed
    difference is already at or beyond the margin (no number of examples would show it faithful)."""
    gap = result["diff_tested"] + (0 if result.get("margin_scale") == "relative" else margin)
    if gap <= 0:
        return None
    if result["sd"] == 0:  # no example differed: the examples at which none differing shows the margin
        return max(result["examples"] + 1, math.ceil(math.log(1 - confidence) / math.log(1 - min(gap, 0.999))))
    return max(result["examples"] + 1, math.ceil(((_z(confidence) + _z(power)) * result["sd"] / gap) ** 2))


def _round(v: float) -> float:
    """Four decimals, or three significant digits where that keeps more (a KL divergence of a few millionths)."""
    v = float(v)
    return round(v, 4) if abs(v) >= 1e-3 or not math.isfinite(v) else float(f"{v:.3g}")


def _unvaried(mean: float, n: int, margin: float, confidence: float, span: float) -> dict:
    """Every one of n paired differences equal to `mean`: no resampling can say how rare a different one
    is. Distribution-free and exact instead: if a share q of examples differed from the rest, by at most
    `span` (the scores' range) each, seeing none of them in n has probability (1 - q)^n, so q is at most
    1 - alpha^(1/n) and the true mean at least mean - span (1 - alpha^(1/n)). The p-value of "worse by the
    margin or more" is then (1 - (mean + margin) / span)^n (1 where the observed mean is already beyond it)."""
    alpha = 1 - confidence
    reach = span * (1 - alpha ** (1 / n))
    gap = (mean + margin) / span
    return {"lower": _round(mean - reach), "upper": _round(mean + reach),
            "p_value": float((1 - gap) ** n) if 0 < gap <= 1 else 0.0 if gap > 1 else 1.0,
            "p_worse": float((1 + gap) ** n) if -1 <= gap < 0 else 0.0 if gap < -1 else 1.0,
            "note": f"all {n} paired differences are {mean:+.4g}: bounded by the scores' range, not resampled"}


def _bca(d: np.ndarray, margin: float, confidence: float, seed: int, resamples: int = BOOTSTRAP_SAMPLES,
         span: float = 1.0) -> dict:
    """The BCa bootstrap (Efron 1987) of mean(d) against -margin: its one-sided bounds at `confidence` and
    both one-sided p-values, the achieved significance levels that invert the same bounds (so a p-value at
    most alpha and a bound clearing -margin always agree). Bias correction z0 from the resampled means
    (ties counted half), acceleration from the jackknife; the bounds agree with scipy.stats.bootstrap's BCa
    (tests/test_evidence.py), which gives intervals but no p-values."""
    from scipy.stats import norm

    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    base = {"examples": n, "diff": _round(mean), "diff_tested": mean, "sd": sd}
    if sd == 0:  # every difference equal: nothing varies to resample
        return {**base, **_unvaried(mean, n, margin, confidence, span)}
    rng = np.random.default_rng(seed)
    means = np.sort(np.concatenate([d[rng.integers(0, n, size=(min(1000, resamples - start), n))].mean(axis=1)
                                    for start in range(0, resamples, 1000)]))  # in chunks: n x 1000 at a time

    def below(value: float) -> float:  # the share of resampled means below `value`, ties counted half
        low, high = np.searchsorted(means, value, "left"), np.searchsorted(means, value, "right")
        share = (low + (high - low) / 2) / len(means)
        return min(max(share, 0.5 / len(means)), 1 - 0.5 / len(means))

    z0 = float(norm.ppf(below(mean)))
    jackknife = (d.sum() - d) / (n - 1)
    spread = jackknife.mean() - jackknife
    denominator = 6 * float((spread ** 2).sum()) ** 1.5
    a = float((spread ** 3).sum()) / denominator if denominator > 0 else 0.0

    def bound(level: float) -> float:  # the BCa percentile for a one-sided level (lower tail)
        u = z0 + float(norm.ppf(level))
        return float(np.quantile(means, norm.cdf(z0 + u / (1 - a * u))))

    def p_at_most(theta: float) -> float:  # achieved level of "mean <= theta": the level whose bound is theta
        v = float(norm.ppf(below(theta))) - z0
        return float(norm.cdf(v / (1 + a * v) - z0))

    alpha = 1 - confidence
    p = p_at_most(-margin)
    return {**base, "lower": _round(bound(alpha)), "upper": _round(bound(confidence)), "p_value": p,
            "p_worse": 1 - p}


def tango_statistic(wins, losses, n: int, delta: float):
    """Tango's score statistic for H0 "p(win) - p(loss) = delta" from paired 0/1 outcomes (vectorised over
    wins and losses): (wins - losses - n delta) over its standard error at the constrained maximum-likelihood
    estimate of p(loss). At delta 0 it is McNemar's z, (wins - losses) / sqrt(wins + losses)."""
    b, c = np.asarray(wins, dtype=float), np.asarray(losses, dtype=float)
    a2 = 2.0 * n
    bb = -b - c + (2.0 * n - b + c) * delta
    cc = -c * delta * (1 - delta)
    p_loss = (np.sqrt(np.maximum(bb * bb - 4 * a2 * cc, 0.0)) - bb) / (2 * a2)
    variance = n * (2 * p_loss + delta * (1 - delta))
    numerator = b - c - n * delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(variance > 0, numerator / np.sqrt(np.where(variance > 0, variance, 1)),
                     np.where(numerator == 0, 0.0, np.sign(numerator) * np.inf))
    return z


@lru_cache(maxsize=4096)
def exact_p_value(wins: int, losses: int, n: int, delta: float) -> float:
    """The exact unconditional p-value of H0 "p(win) - p(loss) <= delta" against "> delta" from n paired
    0/1 outcomes: the probability of a Tango statistic at least the observed one, maximised over the
    nuisance parameter (the discordance p(win) + p(loss)) on the null's boundary, Berger and Boos's way:
    over its 1 - BERGER_BOOS_GAMMA Clopper-Pearson interval only, adding BERGER_BOOS_GAMMA to the maximum
    (still exact; it keeps the computation to the outcomes that interval makes possible)."""
    from scipy.special import gammaln
    from scipy.stats import binom, binomtest

    z_obs = float(tango_statistic(wins, losses, n, delta))
    ci = binomtest(wins + losses, n).proportion_ci(confidence_level=1 - BERGER_BOOS_GAMMA, method="exact")
    low, high = max(ci.low, abs(delta)), min(ci.high, 1.0)
    if low > high:  # no discordance the data allow can put the truth on the null's boundary
        return BERGER_BOOS_GAMMA
    most = int(binom.isf(1e-12, n, high)) + 1  # more discordant pairs than this: under 1e-12 at any grid point
    most = min(n, most)
    discordant = np.repeat(np.arange(most + 1), np.arange(most + 1) + 1)
    losses_ = np.concatenate([np.arange(m + 1) for m in range(most + 1)])
    wins_ = discordant - losses_
    extreme = tango_statistic(wins_, losses_, n, delta) >= z_obs - 1e-9
    w, l = wins_[extreme], losses_[extreme]
    t = n - w - l
    log_coef = gammaln(n + 1) - gammaln(w + 1) - gammaln(l + 1) - gammaln(t + 1)
    q = np.linspace(low, high, NUISANCE_GRID)[None, :]
    p_win, p_loss = (q + delta) / 2, (q - delta) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = (log_coef[:, None] + _xlogy(w[:, None], p_win) + _xlogy(l[:, None], p_loss)
                + _xlogy(t[:, None], 1 - q))
    tail = float(np.exp(logp).sum(axis=0).max()) if len(w) else 0.0
    return min(1.0, tail + BERGER_BOOS_GAMMA + 1e-12)


def _xlogy(k, p):
    return np.where(k > 0, k * np.log(np.where(p > 0, p, 1.0)), 0.0) + np.where((k > 0) & (p <= 0), -np.inf, 0.0)


def _bound(wins: int, losses: int, n: int, alpha: float) -> float:
    """The one-sided lower confidence bound of p(win) - p(loss): the largest delta the exact test still
    rejects at alpha (bisection on a monotone p-value, to 1e-4)."""
    low, high = -1.0, (wins - losses) / n  # the test rejects near -1, never at the estimate itself
    for _ in range(15):
        middle = (low + high) / 2
        if exact_p_value(wins, losses, n, middle) <= alpha:
            low = middle
        else:
            high = middle
    return low


def _exact_paired_binary(wins: int, losses: int, n: int, margin: float, confidence: float,
                         bounds: bool = True) -> dict:
    alpha = 1 - confidence
    diff = (wins - losses) / n
    discordance = (wins + losses) / n
    return {"test": "exact unconditional test of paired 0/1 scores (Tango's score statistic, Berger-Boos)",
            "examples": n, "wins": wins, "losses": losses, "diff": _round(diff), "diff_tested": diff,
            "sd": math.sqrt(max(discordance - diff * diff, 0.0)),
            "lower": _round(_bound(wins, losses, n, alpha)) if bounds else None,
            "upper": _round(-_bound(losses, wins, n, alpha)) if bounds else None,
            "p_value": exact_p_value(wins, losses, n, -margin),
            # the mirror: is "win - loss >= -margin" rejected, i.e. loss - win > margin shown?
            "p_worse": exact_p_value(losses, wins, n, margin) if margin < 1 else 1.0}


# --- superiority -----------------------------------------------------------------------------------------

def superiority(a, b, confidence: float = 0.95, seed: int = 0) -> dict:
    """Is `a` better than `b` on the same examples (larger is better)? H0 "no difference", one-sided:
    McNemar's exact test for 0/1 scores, an exact sign-flip permutation test of the mean difference
    otherwise (random sign flips, seeded, where the differing examples are more than 16). `better`:
    the p-value is at most 1 - confidence."""
    from scipy.stats import binomtest, permutation_test

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = x - y
    nonzero = d[d != 0]
    base = {"examples": len(d), "diff": _round(d.mean()), "confidence": confidence}
    if is_binary(x, y):
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
        test = "McNemar's exact test (binomial on the discordant pairs)"
        base.update(wins=wins, losses=losses)
    elif len(nonzero) == 0:
        p, test = 1.0, "sign-flip permutation test (no example differs)"
    elif len(nonzero) == 1:  # two sign flips: the observed one and its mirror
        p, test = (0.5 if nonzero[0] > 0 else 1.0), "sign-flip permutation test of the mean difference"
        base.update(wins=int(nonzero[0] > 0), losses=int(nonzero[0] < 0))
    else:
        exact = len(nonzero) <= 16
        p = permutation_test((nonzero,), np.mean, permutation_type="samples", alternative="greater",
                             n_resamples=2 ** len(nonzero) if exact else BOOTSTRAP_SAMPLES, vectorized=False,
                             rng=np.random.default_rng(seed)).pvalue
        test = "sign-flip permutation test of the mean difference" + ("" if exact else f" ({BOOTSTRAP_SAMPLES} "
                                                                                           "random flips)")
        base.update(wins=int((nonzero > 0).sum()), losses=int((nonzero < 0).sum()))
    return {**base, "test": test, "p_value": float(p), "better": float(p) <= 1 - confidence}


# --- a difference, described ----------------------------------------------------------------------------

def difference(a, b, confidence: float = 0.95, seed: int = 0) -> dict:
    """a - b on the same examples, described rather than decided: the mean difference with its two-sided
    interval at `confidence` (the exact test's bounds for 0/1 scores, the BCa bootstrap's otherwise) and the
    two-sided p-value of "no difference" (McNemar's exact test, or the exact sign-flip
    permutation test); {diff, interval, p_value, test, examples}."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise PairingError(f"a paired difference needs two equal, non-empty lists of scores (got {x.shape} and "
                           f"{y.shape})")
    one_sided = (1 + confidence) / 2
    if is_binary(x, y):
        wins, losses, n = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum()), len(x)
        interval = [_bound(wins, losses, n, 1 - one_sided), -_bound(losses, wins, n, 1 - one_sided)]
    else:
        bounds = _bca(x - y, 0.0, one_sided, seed)
        interval = [bounds["lower"], bounds["upper"]]
    better, worse = superiority(x, y, confidence, seed), superiority(y, x, confidence, seed)
    return {"diff": _round(x.mean() - y.mean()), "interval": [_round(v) for v in interval],
            "p_value": min(1.0, 2 * min(better["p_value"], worse["p_value"])), "test": better["test"],
            "examples": len(x)}


# --- one candidate's score -------------------------------------------------------------------------------

def mean_interval(values, confidence: float = 0.95, seed: int = 0) -> dict:
    """A candidate's mean score with its two-sided interval: exact (Clopper-Pearson) for 0/1 scores, BCa
    bootstrap otherwise (scipy); {mean, interval, examples, method}."""
    from scipy.stats import binomtest, bootstrap

    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        raise PairingError("no scores to summarise")
    if is_binary(v):
        ci = binomtest(int(v.sum()), n).proportion_ci(confidence_level=confidence, method="exact")
        low, high, method = ci.low, ci.high, "Clopper-Pearson (exact)"
    elif np.all(v == v[0]):
        low = high = v[0]
        method = "all scores equal"
    else:
        ci = bootstrap((v,), np.mean, confidence_level=confidence, method="BCa", n_resamples=BOOTSTRAP_SAMPLES,
                       rng=np.random.default_rng(seed)).confidence_interval
        low, high, method = ci.low, ci.high, "BCa bootstrap"
    return {"mean": _round(v.mean()), "interval": [_round(low), _round(high)], "examples": n, "method": method}


def ratio(a, b) -> float:
    """mean(a) / mean(b), a descriptive retention figure (decisions use `non_inferiority` with a relative
    margin); b's mean must not be 0."""
    denominator = float(np.mean(b))
    if denominator == 0:
        raise ZeroDivisionError("the reference's mean is 0: a ratio against it is undefined")
    return _round(float(np.mean(a)) / denominator)


# --- several builds: one error budget --------------------------------------------------------------------

def fixed_sequence(order: list[str], test) -> tuple[list[dict], str | None]:
    """Fixed-sequence (hierarchical) testing: the hypotheses "build i is not faithful" are tested in the
    order given, each at the full level, and the walk stops at the first that is not rejected; the
    family-wise error (shipping any build that is not faithful) is then at most alpha, because no build
    after the first truly unfaithful one can be reached without that one being (wrongly) rejected.
    `test(name)` returns a dict with `outcome`; returns every test made, in order, and the last build shown
    faithful (None: the first one was not)."""
    records, last = [], None
    for name in order:
        record = {"name": name, **test(name)}
        records.append(record)
        if record["outcome"] != FAITHFUL:
            break
        last = name
    return records, last


def holm(p_values: dict[str, float], alpha: float) -> dict[str, bool]:
    """Holm's step-down procedure: which hypotheses are rejected with the family-wise error at most alpha."""
    rejected, ordered = {}, sorted(p_values.items(), key=lambda kv: (kv[1], kv[0]))
    stopped = False
    for k, (name, p) in enumerate(ordered):
        stopped = stopped or p > alpha / (len(ordered) - k)
        rejected[name] = not stopped
    return rejected
