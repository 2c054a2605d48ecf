"""
experiments/stats.py: the statistics behind every verdict, on per-image scores.

A gap compares two runs on the same test images (paired): alternate + finetune against full training,
image by image. Per seed it is summarised three ways: the mean of the per-image differences (the
paper's metric), the median image's difference, and a trimmed mean of the differences (TRIM of the
images cut at each end), which a few images worse than noise cannot move. Over seeds: the mean of the
per-seed values, a 95 % bootstrap interval that resamples seeds and, within each seed drawn, its
images (so the interval carries both the seed-to-seed spread and the images'), and a paired t-test over
the seeds. "Matches" is decided against a margin fixed before the results were seen: full training's own
seed-to-seed standard deviation of the same statistic (MARGIN_RULE).
"""
import math

import numpy as np
from scipy import stats as scipy_stats

TRIM = 0.01  # the fraction of the paired differences cut at each end for the robust gap
N_BOOT = 2000  # bootstrap replicates
MARGIN_RULE = "full training's seed-to-seed standard deviation of its trimmed-mean bits/dim at the budget"


def trimmed_mean(x, cut=TRIM, axis=-1):
    """The mean after cutting int(cut * n) values at each end (scipy.stats.trim_mean's definition)."""
    return scipy_stats.trim_mean(x, cut, axis=axis)


def nested_bootstrap(sizes, statistic, n_boot=N_BOOT, seed=0, extra=None):
    """A 95 % percentile interval of the mean over seeds of statistic(seed, images, draw). Each replicate
    draws the seeds with replacement and, within each seed drawn, its images (sizes[seed] of them, as
    indices) with replacement; extra(rng), if given, draws whatever else the statistic needs (timing)."""
    rng, k, reps = np.random.default_rng(seed), len(sizes), np.empty(n_boot)
    for b in range(n_boot):
        draw = extra(rng) if extra else None
        reps[b] = np.mean([statistic(s, rng.integers(0, sizes[s], sizes[s]), draw) for s in rng.integers(0, k, k)])
    return [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))]


def paired_t(values):
    """Two-sided one-sample t-test of the per-seed values against 0: (t, p); None for fewer than 2 seeds
    or no spread."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.std(values) == 0:
        return None
    t, p = scipy_stats.ttest_1samp(values, 0.0)
    return {"t": float(t), "p": float(p), "df": len(values) - 1}


def outlier_share(scores, n_bits):
    """What the images worse than uniform noise (above n_bits) add to the mean: the mean minus the mean
    without them (glow_parts.evaluate's test_outlier_share, from stored scores)."""
    scores = np.asarray(scores, dtype=float)
    worse = ~(scores <= n_bits)
    if not worse.any():
        return 0.0
    return float(scores.mean() - (scores[~worse].mean() if (~worse).any() else n_bits))


def verdict(interval, margin):
    """Matches (the interval lies within +-margin), worse or better (it lies beyond), or inconclusive."""
    lo, hi = interval
    if -margin < lo and hi < margin:
        return "matches"
    if lo > margin:
        return "worse"
    if hi < -margin:
        return "better"
    return "inconclusive"


def quiet_costs(timing, evaluation=False):
    """Per-epoch seconds {full, alternate, finetune} from a timing file (experiments/timing.py): medians,
    with the evaluation's cost added to each if evaluation."""
    e = timing["summary"]["evaluation"]["median"] if evaluation else 0.0
    return {p: timing["summary"][p]["median"] + e for p in ("full", "alternate", "finetune")}


def resample_costs(timing, evaluation, rng):
    """One bootstrap draw of the per-epoch costs: each phase's repeats resampled, their median taken."""
    def med(phase):
        s = np.asarray(timing["epoch_seconds"][phase])
        return float(np.median(s[rng.integers(0, len(s), len(s))]))
    e = med("evaluation") if evaluation else 0.0
    return {p: med(p) + e for p in ("full", "alternate", "finetune")}


def time_ratio(A, F, N, costs):
    """The cost of alternate A + finetune F epochs over full training's N epochs."""
    return (A * costs["alternate"] + F * costs["finetune"]) / (N * costs["full"])


def equal_time_epoch(A, F, costs):
    """The last epoch of full training that had finished after as much time as alternate A + finetune F."""
    return math.floor((A * costs["alternate"] + F * costs["finetune"]) / costs["full"] + 1e-9)


def equal_time_window(A, F, timing):
    """Every equal-time epoch of full training that a resample of the timing repeats can give."""
    s = timing["epoch_seconds"]
    lo = (A * min(s["alternate"]) + F * min(s["finetune"])) / max(s["full"])
    hi = (A * max(s["alternate"]) + F * max(s["finetune"])) / min(s["full"])
    return range(math.floor(lo + 1e-9), math.floor(hi + 1e-9) + 1)
