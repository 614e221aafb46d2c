"""Which policy class to train with: how well each class's batch gradient points where the full
return's gradient points, measured on a pilot batch.

A policy class trades bias for variance. Against the gradient of the whole conversation's return
(full planning: unbiased), a smaller reward subset drops terms: if those terms carry no signal on a
problem (myopic rewards), it loses nothing and removes their noise; if they do (a question that pays
off later), its gradient points elsewhere.

What the learner does with a batch gradient is follow its *direction*: AdamW and gradient clipping
make the step nearly independent of the gradient's scale. So a class is scored by the expected
cosine between its batch gradient (N episodes) and the true full-return gradient mu_full:

    score_c(N) = (mu_c . mu_full) / ( ||mu_full|| * sqrt(||mu_c||^2 + tr Cov(g_c) / N) )

(the cosine of the expectations: E[g_hat . mu_full] over the root of E||g_hat||^2). It is
invariant to the scale of g_c, a zero gradient scores 0, and less noise or more alignment both raise
it. An earlier version picked the smallest mean squared error ||E g_hat_c - mu_full||^2 in raw
parameter scale; under that score the zero vector (no update at all) beat the chosen class on most
pilots, because shrinking a gradient lowers its error: it rewarded small gradients, not good
directions.

Per-turn gradients G[t] = grad log pi(a_t | s_t) are computed once per episode and combined per class
as g_c = sum_t A_c[t] G[t] (A_c: the class's advantages, same baseline). From the n pilot episodes,
every term is estimated without bias: products of means use pairs of distinct episodes,

    mu_c . mu_f  ~  (S_c . S_f - sum_i g_c,i . g_f,i) / (n (n - 1)),    S = sum_i g_i

and tr Cov by the usual n - 1 formula. Variance and bias^2 against full planning are reported too
(per episode), since they explain a score.

A ratio of unbiased estimates is not bounded like a cosine: where the full-return gradient is mostly
noise at the pilot's size, ||mu_full||^2 comes out near (or below) 0 and "cosines" above 1 appear.
So the reported cosine is clipped to [-1, 1] (NaN when ||mu_full||^2 <= 0), the ranking uses the
scale-free part alignment / sqrt(second moment) (||mu_full|| is common to every class: the same
picks), and each pilot says how far to trust its pick: ``full_signal_to_noise`` (||mu_full||^2
against the noise tr Cov / n of its own estimate: below ~1 the pilot cannot resolve the direction)
and ``pick_agreement``, the share of delete-one-fold jackknife replicates (the pilot split into
``folds`` contiguous blocks, so a group's episodes stay together) that pick the same class. Episodes are treated as independent (leave-one-out
baselines couple a group's episodes a little; the estimate ignores it). Memory is O(turns x
parameters) per episode, streamed: fine for small policies; for a large one, restrict
``parameters`` to a slice (e.g. the last block and the head).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch

from ppg.episode import Episode, collate
from ppg.loss import token_logprobs, turn_logprobs
from ppg.objectives import Objective, PolicyClass


@dataclass(frozen=True)
class ClassGradientStats:
    label: str
    variance: float  # tr Cov of one episode's gradient
    bias_sq: float  # ||E g_c - E g_full||^2
    mean_norm_sq: float  # ||E g_c||^2, unbiased (can come out below 0 when the signal is below noise)
    alignment: float  # E g_c . E g_full, unbiased
    full_norm_sq: float  # ||E g_full||^2, unbiased
    episodes: int
    full_variance: float = math.nan  # tr Cov of one episode's full-return gradient

    def mse(self, batch_size: int) -> float:
        """Mean squared error of the batch gradient against the full-return gradient (reported)."""
        return self.bias_sq + self.variance / batch_size

    def score(self, batch_size: int) -> float:
        """The selector's ranking: E[g_hat . mu_full] / sqrt(E||g_hat||^2), the expected cosine times
        ||mu_full|| (common to every class, so it orders them the same, and it stays defined
        when the estimate of ||mu_full||^2 does not)."""
        second_moment = max(self.mean_norm_sq, 0.0) + self.variance / batch_size
        return self.alignment / math.sqrt(second_moment) if second_moment > 0 else 0.0

    def expected_cosine(self, batch_size: int) -> float:
        """Cosine of the batch gradient with the full-return gradient (reported): clipped to [-1, 1],
        since noise can push the ratio of estimates past it; NaN when ||mu_full||^2 estimates <= 0."""
        if self.full_norm_sq <= 0:
            return math.nan
        return max(-1.0, min(1.0, self.score(batch_size) / math.sqrt(self.full_norm_sq)))

    def full_signal_to_noise(self) -> float:
        """||mu_full||^2 over the noise of its pilot estimate (tr Cov_full / n, from ``full_variance``):
        below ~1 the pilot cannot resolve the full-return gradient's direction."""
        noise = self.full_variance / self.episodes
        return self.full_norm_sq / noise if noise > 0 else math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def per_turn_gradients(model, episode: Episode, parameters: list[torch.Tensor]) -> torch.Tensor:
    """[T, P]: row t is grad log pi(a_t | s_t) for this episode, flattened over ``parameters``."""
    batch = collate([episode])
    logits = model(input_ids=batch.token_ids, attention_mask=batch.attention_mask.long()).logits
    per_turn = turn_logprobs(
        token_logprobs(logits, batch.token_ids), batch.agent_mask, batch.token_turn, episode.num_turns
    )[0]
    rows = []
    for t in range(episode.num_turns):
        grads = torch.autograd.grad(per_turn[t], parameters, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, parameters, strict=True)
                ]
            )
        )
    return torch.stack(rows)


class _Moments:
    """Running sums of vectors, of their squared norms and of their products with a reference
    vector: enough for the trace of their covariance and unbiased products of means. Sums add up,
    so the moments of any set of folds are the ``merged`` moments of its folds."""

    def __init__(self) -> None:
        self.n, self.total, self.sum_sq, self.sum_dot = 0, None, 0.0, 0.0

    def add(self, g: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        g = g.double()
        self.n += 1
        self.total = g.clone() if self.total is None else self.total + g
        self.sum_sq += float(g.pow(2).sum())
        if reference is not None:
            self.sum_dot += float(g @ reference.double())

    @classmethod
    def merged(cls, parts: Iterable[_Moments]) -> _Moments:
        out = cls()
        for m in parts:
            if m.n:
                out.n += m.n
                out.total = m.total.clone() if out.total is None else out.total + m.total
                out.sum_sq += m.sum_sq
                out.sum_dot += m.sum_dot
        return out

    def mean_dot(self, other: _Moments) -> float:
        """E[x] . E[y] without bias, from pairs of distinct samples (``add(x, reference=y)``)."""
        n = self.n
        return (float(self.total @ other.total) - self.sum_dot) / (n * (n - 1))

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def trace_cov(self) -> float:
        if self.n < 2:
            return float("nan")
        return (self.sum_sq - float(self.total.pow(2).sum()) / self.n) / (self.n - 1)


def _class_stats(label: str, m: _Moments, full: _Moments, is_reference: bool) -> ClassGradientStats:
    """One class's statistics from its moments and the reference's (``m`` added with the reference
    as ``reference``, so ``m.sum_dot`` = sum_i g_c,i . g_f,i gives the differences' moments too)."""
    n = m.n
    diff_total = m.total - full.total
    diff_sum_sq = m.sum_sq - 2 * m.sum_dot + full.sum_sq  # sum_i ||g_c,i - g_f,i||^2
    diff_trace_cov = (diff_sum_sq - float(diff_total.pow(2).sum()) / n) / (n - 1)
    bias_sq = 0.0 if is_reference else max(0.0, float(diff_total.pow(2).sum()) / n**2 - diff_trace_cov / n)
    return ClassGradientStats(
        label,
        variance=m.trace_cov(),
        bias_sq=bias_sq,
        mean_norm_sq=float(m.mean().pow(2).sum()) - m.trace_cov() / n,
        alignment=m.mean_dot(full),
        full_norm_sq=float(full.mean().pow(2).sum()) - full.trace_cov() / n,
        episodes=n,
        full_variance=full.trace_cov(),
    )


@dataclass
class PilotGradients:
    """Each class's gradient moments on a pilot batch, kept per fold (contiguous blocks of
    episodes): the statistics of the whole pilot, and of the pilot without one fold (jackknife)."""

    folds: list[dict[str, _Moments]]
    reference: str

    def stats(self, leave_out: int | None = None) -> dict[str, ClassGradientStats]:
        kept = [f for k, f in enumerate(self.folds) if k != leave_out]
        merged = {label: _Moments.merged(f[label] for f in kept) for label in self.folds[0]}
        full = merged[self.reference]
        return {label: _class_stats(label, m, full, label == self.reference) for label, m in merged.items()}

    def extended(self, other: PilotGradients) -> PilotGradients:
        """This pilot and another batch's folds (a grown pilot): the same classes and reference."""
        if other.reference != self.reference or set(other.folds[0]) != set(self.folds[0]):
            raise ValueError("only a pilot of the same classes and reference can extend this one")
        return PilotGradients(self.folds + other.folds, self.reference)

    def pick_agreement(self, candidates: Iterable[str], batch_size: int) -> float:
        """Share of the delete-one-fold replicates whose pick is the whole pilot's pick: 1.0 = every
        fold agrees; near 1/len(candidates) = the pick is noise."""
        candidates = list(candidates)
        pick = select_class({c: s for c, s in self.stats().items() if c in candidates}, batch_size)
        if len(self.folds) < 2:
            return math.nan
        same = 0
        for k in range(len(self.folds)):
            stats = self.stats(leave_out=k)
            same += select_class({c: stats[c] for c in candidates}, batch_size) == pick
        return same / len(self.folds)


def gradient_moments(
    model,
    episodes: list[Episode],
    classes: Mapping[str, PolicyClass],
    objective: Objective,
    parameters: Iterable[torch.Tensor] | None = None,
    reference: str | None = None,
    folds: int = 8,
) -> PilotGradients:
    """Per-class gradient moments (vs ``reference``, default the full-planning entry) on a pilot
    batch, in ``folds`` contiguous folds; ``objective`` supplies the baseline and gamma shared by
    every class."""
    from ppg.learner.update import global_advantages

    if len(episodes) < 2:
        raise ValueError("gradient statistics need at least 2 pilot episodes")
    if reference is None:
        reference = next((k for k, c in classes.items() if c.type == "full"), None)
        if reference is None:
            raise ValueError("no full-planning class to measure bias against: add one or pass reference=")
    # every delete-one-fold replicate keeps >= 2 episodes
    folds = max(1, min(folds, len(episodes) // 2 if len(episodes) >= 4 else 1))
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    advantages = {
        label: global_advantages(episodes, objective.model_copy(update={"policy_class": c}))
        for label, c in classes.items()
    }
    moments = [{label: _Moments() for label in classes} for _ in range(folds)]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the policy that sampled
    try:
        for i, episode in enumerate(episodes):
            G = per_turn_gradients(model, episode, params)  # [T, P]
            per_class = {label: a[i, : episode.num_turns].to(G.dtype) @ G for label, a in advantages.items()}
            fold = moments[i * folds // len(episodes)]
            for label, g in per_class.items():
                fold[label].add(g, reference=per_class[reference])
    finally:
        model.train(was_training)
    return PilotGradients(moments, reference)


def select_class(stats: Mapping[str, ClassGradientStats], batch_size: int) -> str:
    """The class whose batch gradient is expected to point closest to the full-return gradient."""
    return max(stats, key=lambda label: stats[label].score(batch_size))
