"""Which policy class to train with: measured gradient variance and bias per class, from a pilot batch.

A policy class trades bias for variance. Against the gradient of the whole conversation's return
(full planning: unbiased), a smaller reward subset drops terms: if those terms carry no signal on a
problem (myopic rewards), it loses nothing and removes their noise; if they do (a question that pays
off later), its gradient points elsewhere. What matters for training with N episodes per update is
the mean squared error of the batch gradient against the full-return gradient:

    MSE_c(N) = ||E[g_c] - E[g_full]||^2  +  tr Cov(g_c) / N

where g_c is one episode's gradient under class c. Both terms are estimated from one pilot batch at
the current policy, with per-turn gradients G[t] = grad log pi(a_t | s_t) computed once per episode
and combined per class as g_c = sum_t A_c[t] G[t] (A_c: the class's advantages, same baseline):

    variance_c = unbiased tr Cov(g_c)                      (per-episode)
    bias_sq_c  = ||mean(g_c - g_full)||^2 - tr Cov(g_c - g_full) / n    (unbiased, clipped at 0)

The selector picks the class with the smallest MSE at the training batch size. Episodes are treated
as independent (leave-one-out baselines couple a group's episodes a little; the estimate ignores it).
Memory is O(turns x parameters) per episode, streamed: fine for small policies; for a large one,
restrict ``parameters`` to a slice (e.g. the last block and the head).
"""

from __future__ import annotations

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
    mean_norm_sq: float  # ||mean g_c||^2 (signal size, for scale)
    episodes: int

    def mse(self, batch_size: int) -> float:
        return self.bias_sq + self.variance / batch_size

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
    """Running sum and sum of squared norms of vectors: enough for the trace of their covariance."""

    def __init__(self) -> None:
        self.n, self.total, self.sum_sq = 0, None, 0.0

    def add(self, g: torch.Tensor) -> None:
        g = g.double()
        self.n += 1
        self.total = g.clone() if self.total is None else self.total + g
        self.sum_sq += float(g.pow(2).sum())

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
                moments[label].add(g)
                differences[label].add(g - per_class[reference])
    finally:
        model.train(was_training)
    out = {}
    for label in classes:
        d = differences[label]
        bias_sq = 0.0 if label == reference else max(0.0, float(d.mean().pow(2).sum()) - d.trace_cov() / d.n)
        out[label] = ClassGradientStats(
            label,
            moments[label].trace_cov(),
            bias_sq,
            float(moments[label].mean().pow(2).sum()),
            len(episodes),
        )
    return out


def select_class(stats: Mapping[str, ClassGradientStats], batch_size: int) -> str:
    """The class whose batch gradient has the smallest estimated MSE against the full-return gradient."""
    return min(stats, key=lambda label: stats[label].mse(batch_size))
