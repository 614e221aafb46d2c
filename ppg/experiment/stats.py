"""The few statistics the suite's report states: means with t-intervals over seeds, paired tests
over seeds, a bootstrap interval for pilot estimates, and how numbers are written in its tables."""

from __future__ import annotations

import math
import random
import statistics

from ppg.evaluate import mean_interval, t_test_p

NAN = float("nan")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (NaN half-width for one value)."""
    m = mean_interval(values)
    return m["mean"], NAN if m["half_width"] is None else m["half_width"]


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean of a[s] - b[s] over the seeds both have, its 95% interval and two-sided p-value."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return {"diff": statistics.fmean(diffs) if diffs else NAN, "ci95": NAN, "p": NAN, "n": len(diffs)}
    mean, sd, n = statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)
    t = mean / (sd / math.sqrt(n)) if sd > 0 else (math.inf if mean else 0.0)
    return {"diff": mean, "ci95": interval(diffs)[1], "p": t_test_p(t, n - 1) if mean or sd else 1.0, "n": n}


def mean_of(values: list[float]) -> float:
    return statistics.fmean(values) if values else NAN


def bootstrap_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (here: one pilot estimate per
    seed, each from its own pilot batch, so the seeds are independent draws). With 5 seeds the
    percentile interval is a little too narrow; it shows the spread that a single number hides."""
    if len(values) < 2:
        return NAN, NAN
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def fmt(x: float, digits: int = 3) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def fmt_g(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def with_interval(row: dict, name: str, form) -> str:
    low, high = row.get(f"{name}_lo", NAN), row.get(f"{name}_hi", NAN)
    interval_text = "" if math.isnan(low) else f" [{form(low)}, {form(high)}]"
    return form(row[name]) + interval_text


def signed(mean: float, half: float, p: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" if not math.isnan(half) else f"{mean:+.3f}"
    if p is not None and not math.isnan(p):
        text += f", p = {p:.3f}" + (" *" if p < 0.05 else "")
    return text
