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
(per episode), since they explain a score. Episodes are treated as independent (leave-one-out
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

    def mse(self, batch_size: int) -> float:
        """Mean squared error of the batch gradient against the full-return gradient (reported)."""
        return self.bias_sq + self.variance / batch_size

    def expected_cosine(self, batch_size: int) -> float:
        """The selector's score: cosine of the batch gradient with the full-return gradient."""
        second_moment = max(self.mean_norm_sq, 0.0) + self.variance / batch_size
        if second_moment <= 0:
            return 0.0
        scale = math.sqrt(self.full_norm_sq) if self.full_norm_sq > 0 else 1.0
        return self.alignment / (scale * math.sqrt(second_moment))

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
    vector: enough for the trace of their covariance and unbiased products of means."""

    def __init__(self) -> None:
        self.n, self.total, self.sum_sq, self.sum_dot = 0, None, 0.0, 0.0

    def add(self, g: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        g = g.double()
        self.n += 1
        self.total = g.clone() if self.total is None else self.total + g
        self.sum_sq += float(g.pow(2).sum())
        if reference is not None:
            self.sum_dot += float(g @ reference.double())

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


def gradient_stats(
    model,
    episodes: list[Episode],
    classes: Mapping[str, PolicyClass],
    objective: Objective,
    parameters: Iterable[torch.Tensor] | None = None,
    reference: str | None = None,
) -> dict[str, ClassGradientStats]:
    """Per-class gradient variance and bias (vs ``reference``, default the full-planning entry) on a
    pilot batch; ``objective`` supplies the baseline and gamma shared by every class."""
    from ppg.learner.update import global_advantages

    if len(episodes) < 2:
        raise ValueError("gradient statistics need at least 2 pilot episodes")
    if reference is None:
        reference = next((k for k, c in classes.items() if c.type == "full"), None)
        if reference is None:
            raise ValueError("no full-planning class to measure bias against: add one or pass reference=")
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    advantages = {
        label: global_advantages(episodes, objective.model_copy(update={"policy_class": c}))
        for label, c in classes.items()
    }
    moments = {label: _Moments() for label in classes}
    differences = {label: _Moments() for label in classes}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the policy that sampled
    try:
        for i, episode in enumerate(episodes):
            G = per_turn_gradients(model, episode, params)  # [T, P]
            per_class = {label: a[i, : episode.num_turns].to(G.dtype) @ G for label, a in advantages.items()}
            for label, g in per_class.items():
                moments[label].add(g, reference=per_class[reference])
                differences[label].add(g - per_class[reference])
    finally:
        model.train(was_training)
    out = {}
    for label in classes:
        d = differences[label]
        bias_sq = 0.0 if label == reference else max(0.0, float(d.mean().pow(2).sum()) - d.trace_cov() / d.n)
        m, full = moments[label], moments[reference]
        out[label] = ClassGradientStats(
            label,
            variance=m.trace_cov(),
            bias_sq=bias_sq,
            mean_norm_sq=float(m.mean().pow(2).sum()) - m.trace_cov() / m.n,
            alignment=m.mean_dot(full),
            full_norm_sq=float(full.mean().pow(2).sum()) - full.trace_cov() / full.n,
            episodes=len(episodes),
        )
    return out


def select_class(stats: Mapping[str, ClassGradientStats], batch_size: int) -> str:
    """The class whose batch gradient is expected to point closest to the full-return gradient."""
    return max(stats, key=lambda label: stats[label].expected_cosine(batch_size))
