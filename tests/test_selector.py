"""The selector's gradient statistics (ppg/experiment/selector.py) against exact answers: autograd
for the per-turn gradients, brute-force pairwise formulas for the unbiased moments, and a pick
recomputed on each pilot-minus-one-fold for the jackknife agreement."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import scripted_episodes
from transformers import AutoModelForCausalLM

from ppg.episode import collate
from ppg.experiment.selector import (
    ClassGradientStats,
    PilotGradients,
    _Moments,
    gradient_moments,
    per_turn_gradients,
    select_class,
)
from ppg.learner.update import global_advantages
from ppg.loss import policy_gradient_loss, token_logprobs
from ppg.models import resolve_model
from ppg.objectives import FullPlanning, Greedy, GroupMean, Objective


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("embedded:tiny")


@pytest.fixture(scope="module")
def episodes(model_path):
    return scripted_episodes("myopic", num_personas=3, num_turns=3)


def test_moments_match_torch_covariance_and_mean():
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    m = _Moments()
    for row in x:
        m.add(row)
    assert m.trace_cov() == pytest.approx(float(torch.cov(x.T).trace()), rel=1e-10)
    assert torch.allclose(m.mean(), x.mean(0))


def test_per_turn_gradients_combine_into_the_loss_gradient_exactly(model_path, episodes):
    """sum_t A[t] G[t] for one episode equals -grad of the learner's loss with advantages A (B=1)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    params = list(model.parameters())
    episode = episodes[0]
    G = per_turn_gradients(model, episode, params)
    assert G.shape == (episode.num_turns, sum(p.numel() for p in params))
    advantages = torch.tensor([[0.5, -1.0, 2.0]])
    batch = collate([episode])
    logits = model(input_ids=batch.token_ids, attention_mask=batch.attention_mask.long()).logits
    loss = policy_gradient_loss(
        token_logprobs(logits, batch.token_ids), batch.agent_mask, batch.token_turn, advantages
    )
    grads = torch.autograd.grad(loss, params)
    expected = -torch.cat([g.reshape(-1) for g in grads])
    assert torch.allclose(advantages[0] @ G, expected, atol=1e-5, rtol=1e-4)


def test_gradient_stats_reference_has_no_bias_and_matches_a_direct_computation(model_path, episodes):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    params = [model.lm_head.weight]  # a slice keeps the direct check cheap
    classes = {"full": FullPlanning(), "greedy": Greedy()}
    objective = Objective(baseline=GroupMean())
    stats = gradient_moments(model, episodes, classes, objective, parameters=params).stats()
    assert stats["full"].bias_sq == 0.0 and stats["greedy"].episodes == len(episodes)
    # direct: per-episode gradient vectors, then per-coordinate variances
    per_episode = {k: [] for k in classes}
    for k, c in classes.items():
        adv = global_advantages(episodes, objective.model_copy(update={"policy_class": c}))
        for i, e in enumerate(episodes):
            per_episode[k].append(adv[i, : e.num_turns] @ per_turn_gradients(model, e, params))
    for k in classes:
        X = torch.stack(per_episode[k]).double()
        assert stats[k].variance == pytest.approx(float(X.var(0).sum()), rel=1e-4)  # tr Cov
    F, Gr = torch.stack(per_episode["full"]).double(), torch.stack(per_episode["greedy"]).double()
    n = len(episodes)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]  # products of means, distinct episodes
    align = sum(float(Gr[i] @ F[j]) for i, j in pairs) / len(pairs)
    assert stats["greedy"].alignment == pytest.approx(align, rel=1e-6)
    assert stats["full"].full_norm_sq == pytest.approx(
        sum(float(F[i] @ F[j]) for i, j in pairs) / len(pairs), rel=1e-6
    )
    assert stats["full"].alignment == pytest.approx(stats["full"].full_norm_sq, rel=1e-9)
    D = (torch.stack(per_episode["greedy"]) - torch.stack(per_episode["full"])).double()
    unbiased = float(D.mean(0).pow(2).sum()) - float(D.var(0).sum()) / len(episodes)
    assert stats["greedy"].bias_sq == pytest.approx(max(0.0, unbiased), rel=1e-4, abs=1e-9)


def stats_of(label, variance, mean_norm_sq, alignment, full_norm_sq=1.0, bias_sq=0.0):
    return ClassGradientStats(label, variance, bias_sq, mean_norm_sq, alignment, full_norm_sq, episodes=64)


def test_selector_scores_direction_not_size():
    """The expected cosine with the full-return gradient: a noisy full gradient loses to a quiet,
    aligned one at small batches and wins at large ones; scaling a class's gradient changes nothing;
    and no update at all (the zero vector, which had the smallest MSE) never wins."""
    full = stats_of("full", variance=100.0, mean_norm_sq=1.0, alignment=1.0)
    greedy = stats_of("greedy", variance=10.0, mean_norm_sq=0.5, alignment=0.5)  # cosine 0.707 at N=inf
    assert greedy.expected_cosine(32) == pytest.approx(0.5 / math.sqrt(0.5 + 10 / 32))
    assert select_class({"full": full, "greedy": greedy}, batch_size=32) == "greedy"
    assert select_class({"full": full, "greedy": greedy}, batch_size=10_000) == "full"
    scaled = stats_of("greedy", variance=10.0 * 1e-6, mean_norm_sq=0.5e-6, alignment=0.5e-3)
    assert scaled.expected_cosine(32) == pytest.approx(greedy.expected_cosine(32))
    zero = stats_of("zero", variance=0.0, mean_norm_sq=0.0, alignment=0.0, bias_sq=1.0)
    assert zero.mse(32) < full.mse(32)  # the old criterion's failure
    assert select_class({"full": full, "zero": zero}, batch_size=32) == "full"


# ---- trusting a pick: clipping, signal to noise, jackknife over folds ------------------------------
def brute_stats(vectors: dict[str, torch.Tensor], reference: str) -> dict[str, ClassGradientStats]:
    """The statistics by their definitions, from every pair of distinct episodes (``vectors[c]``:
    [n, P], one row per episode)."""
    F = vectors[reference].double()
    n = F.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def mean_dot(X, Y):
        return sum(float(X[i] @ Y[j]) for i, j in pairs) / len(pairs)

    out = {}
    for label, X in vectors.items():
        X = X.double()
        D = X - F
        out[label] = ClassGradientStats(
            label,
            variance=float(X.var(0).sum()),
            bias_sq=0.0 if label == reference else max(0.0, mean_dot(D, D)),
            mean_norm_sq=mean_dot(X, X),
            alignment=mean_dot(X, F),
            full_norm_sq=mean_dot(F, F),
            episodes=n,
            full_variance=float(F.var(0).sum()),
        )
    return out


def pilot_of(vectors: dict[str, torch.Tensor], reference: str, folds: int) -> PilotGradients:
    n = next(iter(vectors.values())).shape[0]
    moments = [{label: _Moments() for label in vectors} for _ in range(folds)]
    for i in range(n):
        for label, X in vectors.items():
            moments[i * folds // n][label].add(X[i], reference=vectors[reference][i])
    return PilotGradients(moments, reference)


def synthetic(seed: int, signal: float, n: int = 24, dim: int = 6) -> dict[str, torch.Tensor]:
    """Full planning: a signal plus much noise; greedy: a smaller, partly aligned signal plus
    little noise; k2: in between."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(dim, dtype=torch.float64)
    mu[0] = signal
    full = mu + 4.0 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    greedy = 0.5 * mu + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    k2 = 0.5 * (full + greedy)
    return {"full": full, "greedy": greedy, "k2": k2}


@pytest.mark.parametrize("leave_out", [None, 0, 3])
def test_fold_moments_give_the_same_statistics_as_the_episodes_they_hold(leave_out):
    """Merged folds = one pass over all episodes; a left-out fold = the pilot without its episodes."""
    vectors = synthetic(seed=0, signal=2.0)
    pilot = pilot_of(vectors, "full", folds=4)
    kept = [i for i in range(24) if leave_out is None or i * 4 // 24 != leave_out]
    expected = brute_stats({k: v[kept] for k, v in vectors.items()}, "full")
    for label, got in pilot.stats(leave_out=leave_out).items():
        want = expected[label]
        for field in ("variance", "bias_sq", "mean_norm_sq", "alignment", "full_norm_sq", "full_variance"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-9, abs=1e-9), field
        assert got.episodes == len(kept)


def test_a_grown_pilot_is_the_pilot_of_all_its_episodes():
    vectors = synthetic(seed=2, signal=1.0)
    first = pilot_of({k: v[:12] for k, v in vectors.items()}, "full", folds=3)
    more = pilot_of({k: v[12:] for k, v in vectors.items()}, "full", folds=3)
    grown, whole = first.extended(more).stats(), brute_stats(vectors, "full")
    for label in vectors:
        assert grown[label].alignment == pytest.approx(whole[label].alignment, rel=1e-9)
        assert grown[label].variance == pytest.approx(whole[label].variance, rel=1e-9)
    assert len(first.extended(more).folds) == 6
    with pytest.raises(ValueError, match="same classes"):
        first.extended(pilot_of({"full": vectors["full"]}, "full", folds=2))


def test_pick_agreement_is_the_share_of_folds_whose_removal_keeps_the_pick():
    vectors = synthetic(seed=1, signal=1.0)  # a weak full-return signal: picks wobble
    pilot = pilot_of(vectors, "full", folds=6)
    pick = select_class(brute_stats(vectors, "full"), batch_size=8)
    by_hand = []
    for k in range(6):
        kept = [i for i in range(24) if i * 6 // 24 != k]
        by_hand.append(select_class(brute_stats({c: v[kept] for c, v in vectors.items()}, "full"), 8) == pick)
    agreement = pilot.pick_agreement(["full", "greedy", "k2"], batch_size=8)
    assert agreement == pytest.approx(sum(by_hand) / 6) and 0 < agreement < 1
    strong = pilot_of(synthetic(seed=1, signal=40.0), "full", folds=6)
    assert strong.pick_agreement(["full", "greedy", "k2"], batch_size=8) == 1.0
    assert strong.stats()["full"].full_signal_to_noise() > 10


def test_a_full_gradient_lost_in_noise_gives_no_cosine_above_one_and_says_so():
    """Where ||mu_full||^2 is estimated near 0 the old ratio came out above 1 (2.24 on a pilot of
    the paper suite); now the cosine is clipped, undefined at <= 0, and the pick (by the scale-free
    score) is the same as the ratio's."""
    noise_full = stats_of("full", variance=400.0, mean_norm_sq=0.05, alignment=0.05, full_norm_sq=0.05)
    greedy = stats_of("greedy", variance=1.0, mean_norm_sq=0.3, alignment=1.2, full_norm_sq=0.05)
    assert 1.2 / math.sqrt(0.05 * (0.3 + 1 / 32)) > 1  # what the old score reported
    assert greedy.expected_cosine(32) == 1.0
    assert select_class({"full": noise_full, "greedy": greedy}, 32) == "greedy"
    below = stats_of("greedy", variance=1.0, mean_norm_sq=0.3, alignment=1.2, full_norm_sq=-0.4)
    assert math.isnan(below.expected_cosine(32)) and below.score(32) > 0
    lost = ClassGradientStats("full", 400.0, 0.0, 0.05, 0.05, 0.05, episodes=64, full_variance=400.0)
    assert lost.full_signal_to_noise() == pytest.approx(0.05 / (400.0 / 64))


def test_gradient_moments_split_the_pilot_into_folds_of_at_least_two_episodes(model_path, episodes):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    classes = {"full": FullPlanning(), "greedy": Greedy()}
    params = [model.lm_head.weight]
    pilot = gradient_moments(model, episodes, classes, Objective(), parameters=params, folds=8)
    assert len(episodes) == 6 and [f["full"].n for f in pilot.folds] == [2, 2, 2]
    one = gradient_moments(model, episodes, classes, Objective(), parameters=params, folds=1)
    assert len(one.folds) == 1  # folds split the sums, not the statistics of the whole pilot
    for field in ("alignment", "variance", "mean_norm_sq", "full_norm_sq"):
        assert getattr(pilot.stats()["greedy"], field) == pytest.approx(
            getattr(one.stats()["greedy"], field), rel=1e-9
        )
