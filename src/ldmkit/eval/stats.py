"""Statistics of ablations repeated over seeds: means, standard errors, paired intervals and one verdict rule.

An ablation trains every arm (variant) once per seed; the seed sets the run's ``seed`` key, so it changes the
weight initialisation, the data order, the noise draws and the evaluation noise alike. For one arm and one
metric with values x_1..x_k over k seeds:

    mean = (1/k) Σ x_s
    se   = sd(x, ddof=1) / sqrt(k)                      (None when k = 1)

A single score that is a proportion (an accuracy over n generated samples) also has its binomial standard
error ``sqrt(p (1 - p) / n)``: the sampling noise of that one evaluation, which ``se`` over seeds already
contains together with the training noise.

Arms are compared with the baseline arm by PAIRED differences: d_s = x_arm,s − x_baseline,s over the seeds
both have (the same seed means the same data order and the same evaluation noise, so pairing removes that
shared part of the noise), and a two-sided 95% interval from the t distribution with k − 1 degrees of freedom:

    d̄ ± t_{0.975, k−1} · sd(d, ddof=1) / sqrt(k)

THE VERDICT RULE (one rule for every claim, metric and arm; ``verdict``):
- ``n/a``          fewer than 2 paired seeds (no interval can be formed);
- ``—``            the claim states no expected direction for this arm and metric;
- ``reproduced``   the interval excludes 0 on the side the paper expects (``higher``: lo > 0; ``lower``: hi < 0);
- ``opposite``     the interval excludes 0 on the other side;
- ``within noise`` otherwise (the interval contains 0).

An interval that touches 0 (lo == 0 or hi == 0) counts as containing it. No correction for multiple
comparisons is made: with many arms and metrics, about 2.5% of the comparisons of a true null come out
``reproduced`` by chance (and 2.5% ``opposite``), so a claim resting on one comparison among many is weak.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

DIRECTIONS = ("higher", "lower")
VERDICTS = ("reproduced", "opposite", "within noise", "n/a", "—")
CONFIDENCE = 0.95


def _finite(values: Iterable[Any], what: str) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{what}: expected finite numbers, got {v!r}")
        out.append(float(v))
    return out


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, ``se`` (sample standard deviation / sqrt(k); None for k = 1), ``sd`` and ``k`` of ``values``."""
    x = _finite(values, "mean_se")
    k = len(x)
    if k == 0:
        raise ValueError("mean_se: no values")
    m = sum(x) / k
    if k == 1:
        return {"mean": m, "se": None, "sd": None, "k": 1}
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (k - 1))
    return {"mean": m, "se": sd / math.sqrt(k), "sd": sd, "k": k}


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of a proportion ``p`` measured on ``n`` independent samples."""
    (p,) = _finite([p], "binomial_se")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_se: p must lie in [0, 1], got {p}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"binomial_se: n must be an integer >= 1, got {n!r}")
    return math.sqrt(p * (1.0 - p) / int(n))


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    return float(t.ppf(0.5 + confidence / 2.0, df))


def paired_difference(arm: dict[int, float], baseline: dict[int, float],
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Paired difference arm − baseline over the seeds both have (``{seed: value}`` each).

    Returns ``diff`` (mean difference), ``se``, ``lo``/``hi`` (the ``confidence`` t interval; None with fewer
    than 2 paired seeds), ``df``, ``k`` and the ``seeds`` used.
    """
    seeds = sorted(set(arm) & set(baseline))
    if not seeds:
        return {"diff": None, "se": None, "lo": None, "hi": None, "df": 0, "k": 0, "seeds": []}
    d = _finite([arm[s] - baseline[s] for s in seeds], "paired_difference")
    stats = mean_se(d)
    out = {"diff": stats["mean"], "se": stats["se"], "lo": None, "hi": None, "df": len(d) - 1, "k": len(d),
           "seeds": seeds}
    if len(d) >= 2:
        half = t_quantile(len(d) - 1, confidence) * stats["se"]
        out["lo"], out["hi"] = stats["mean"] - half, stats["mean"] + half
    return out


def verdict(lo: float | None, hi: float | None, expected: str | None) -> str:
    """The module's verdict rule for a difference interval [lo, hi] and the paper's direction (or None)."""
    if lo is None or hi is None:
        return "n/a"
    if expected is None:
        return "—"
    if expected not in DIRECTIONS:
        raise ValueError(f"verdict: expected must be one of {DIRECTIONS} or None, got {expected!r}")
    if lo > hi:
        raise ValueError(f"verdict: empty interval [{lo}, {hi}]")
    if lo > 0:
        return "reproduced" if expected == "higher" else "opposite"
    if hi < 0:
        return "reproduced" if expected == "lower" else "opposite"
    return "within noise"
