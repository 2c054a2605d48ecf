"""
experiments/stats.py: the statistics behind every verdict, on per-image scores.

A gap compares two runs on the same test images (paired): alternate + finetune against full training,
image by image. Per seed it is summarised three ways: the mean of the per-image differences (the
paper's metric), the median image's difference, and a trimmed mean of the differences (TRIM of the
images cut at each end), which a few images worse than noise cannot move. Over seeds: the mean of the
per-seed values and its t interval (the seeds are the units; the images' own spread is far smaller).
The verdict is the pre-registered test (experiments/preregistration.md): two one-sided tests against
a practical margin. `coverage` measures by simulation how often an interval holds the true value;
`python experiments/stats.py` prints it for the t interval and for a bootstrap over seeds.
"""
import math
import sys

import numpy as np
from scipy import stats as scipy_stats

TRIM = 0.01  # the fraction of the paired differences cut at each end for the robust gap
PHASES = ("full", "alternate", "finetune", "evaluation")  # what a timing file times
MARGIN = 0.02  # bits/dim: the pre-registered practical margin (experiments/preregistration.md)


def trimmed_mean(x, cut=TRIM, axis=-1):
    """The mean after cutting int(cut * n) values at each end (scipy.stats.trim_mean's definition)."""
    return scipy_stats.trim_mean(x, cut, axis=axis)


def paired_t(values):
    """Two-sided one-sample t-test of the per-seed values against 0: (t, p); None for fewer than 2 seeds
    or no spread."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.std(values) == 0:
        return None
    t, p = scipy_stats.ttest_1samp(values, 0.0)
    return {"t": float(t), "p": float(p), "df": len(values) - 1}


def t_interval(values, level=0.95):
    """The t interval of the mean of the per-seed values, [lo, hi]; None for fewer than 2 seeds."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]


def tost(values, margin=MARGIN):
    """The pre-registered verdict on per-seed gaps: "equivalent" where the 90 % t interval lies within
    (-margin, +margin) (two one-sided tests at 5 %), "worse" ("better") where the 95 % interval lies above
    +margin (below -margin), else "inconclusive"; with both intervals. None for fewer than 2 seeds."""
    ci90, ci95 = t_interval(values, 0.90), t_interval(values, 0.95)
    if ci90 is None:
        return None
    verdict = ("equivalent" if -margin < ci90[0] and ci90[1] < margin else "worse" if ci95[0] > margin else
               "better" if ci95[1] < -margin else "inconclusive")
    return {"verdict": verdict, "ci90": ci90, "ci95": ci95, "margin": margin,
            "excludes_zero": ci95[0] > 0 or ci95[1] < 0}


def seed_bootstrap(values, level=0.95, n_boot=2000, seed=0):
    """A percentile bootstrap of the mean over seeds (what the earlier sweeps' nested bootstrap reduces to
    where the images add no spread): kept only to measure its coverage, which falls short with few seeds."""
    values = np.asarray(values, dtype=float)
    draws = values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))].mean(1)
    return [float(np.percentile(draws, 50 - 50 * level)), float(np.percentile(draws, 50 + 50 * level))]


def coverage(interval, n, reps=2000, seed=0):
    """How often interval(values) holds the true mean 0, over `reps` simulated experiments of n seeds whose
    gaps are drawn from N(0, 1) (the scale does not matter to either interval)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([lo <= 0 <= hi for lo, hi in (interval(rng.normal(0, 1, n)) for _ in range(reps))]))


def fisher_p(a, b, n):
    """Fisher's exact test, two-sided: a of n runs against b of n runs (say, runs that spiked)."""
    return float(scipy_stats.fisher_exact([[a, n - a], [b, n - b]])[1])


def fisher_power(n, p1, p2, alpha=0.05):
    """The power of fisher_p at level alpha with n runs a condition, where a run has chance p1 under the first
    and p2 under the second: the chance of p < alpha, summed exactly over every pair of counts."""
    chance = lambda k, p: scipy_stats.binom.pmf(k, n, p)  # noqa: E731
    return float(sum(chance(a, p1) * chance(b, p2) for a in range(n + 1) for b in range(n + 1)
                     if fisher_p(a, b, n) < alpha))


def quiet_costs(timing, evaluation=False):
    """Per-epoch seconds {full, alternate, finetune} from a timing file (experiments/timing.py): medians,
    with the evaluation's cost added to each if evaluation."""
    e = timing["summary"]["evaluation"]["median"] if evaluation else 0.0
    return {p: timing["summary"][p]["median"] + e for p in ("full", "alternate", "finetune")}


def time_ratio(A, F, N, costs):
    """The cost of alternate A + finetune F epochs over full training's N epochs."""
    return (A * costs["alternate"] + F * costs["finetune"]) / (N * costs["full"])


def equal_time_epoch(A, F, costs):
    """The last epoch of full training that had finished after as much time as alternate A + finetune F."""
    return math.floor((A * costs["alternate"] + F * costs["finetune"]) / costs["full"] + 1e-9)


def time_range(A, F, N, timing, evaluation=False):
    """The time ratio's range over the timing repeats: every phase at its fastest against full's slowest,
    and the reverse."""
    s, e = timing["epoch_seconds"], timing["epoch_seconds"]["evaluation"] if evaluation else [0.0]
    lo = (A * (min(s["alternate"]) + min(e)) + F * (min(s["finetune"]) + min(e))) / (N * (max(s["full"]) + max(e)))
    hi = (A * (max(s["alternate"]) + max(e)) + F * (max(s["finetune"]) + max(e))) / (N * (min(s["full"]) + min(e)))
    return [lo, hi]


if __name__ == "__main__":  # the coverage of a nominal 95 % interval, by simulation
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    for n in (3, 6, 11):
        print(f"{n:2d} seeds: t interval {coverage(t_interval, n, reps):.3f}, "
              f"bootstrap over seeds {coverage(seed_bootstrap, n, reps):.3f} ({reps} simulated experiments)")
