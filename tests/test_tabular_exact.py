"""The estimator against exact answers on a conversation MDP small enough to enumerate.

Every trajectory of a 3-state, 3-action, 4-turn MDP (with an action that ends the conversation, so the
policy decides the length) is enumerated to get J_S and its partial gradient exactly; the Monte Carlo
estimate goes through the real Objective and policy_gradient_loss. Agreement is judged against the
estimator's own standard error, and a deliberately wrong pairing must be caught by the same test.
"""

from __future__ import annotations

import pytest
import torch

from ppg.objectives import (
    Custom,
    FullPlanning,
    Greedy,
    GroupMean,
    KStep,
    NoBaseline,
    Objective,
    Segment,
    TurnMean,
)
from ppg.tabular_mdp import (
    delayed_mdp,
    enumerate_trajectories,
    exact_partial_gradient,
    myopic_mdp,
    random_mdp,
    reference_policy,
    sample_episodes,
    sample_gradient_estimates,
)

# 15 (class, baseline) pairs x 9 gradient entries = 135 z-scores; P(max |Z| > 4.5) ~ 135 * 6.8e-6 ~ 1e-3
# under the null, so 4.5 standard errors is a bound the estimator's own noise sets, not a loose constant.
Z_BOUND = 4.5
BATCHES, GROUPS, GROUP_SIZE = 2000, 2, 4

POLICY_CLASSES = [
    FullPlanning(),
    Greedy(),
    KStep(k=2),
    Segment(),
    Custom(matrix=[[1, 0, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]]),
]
BASELINES = [NoBaseline(), TurnMean(), GroupMean()]


@pytest.fixture(scope="module")
def mdp():
    return random_mdp(seed=0)


@pytest.fixture(scope="module")
def theta(mdp):
    return reference_policy(mdp)


def z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = estimates.mean(0)
    stderr = estimates.std(0) / estimates.shape[0] ** 0.5
    return (mean - exact) / stderr, stderr


def test_enumeration_is_a_distribution_with_ragged_lengths(mdp, theta):
    states, actions, lengths = enumerate_trajectories(mdp)
    assert set(lengths.tolist()) == {1, 2, 3, 4}  # the end action makes lengths policy-dependent
    J_const, _ = exact_partial_gradient(
        mdp,
        theta,
        Objective(policy_class=Custom(matrix=[[1, 0, 0, 0]] + [[0] * 4] * 3), baseline=NoBaseline()),
    )
    # J of "reward of turn 0 only" is E[r_0] = sum_s init(s) sum_a pi(a|s) r(s, a): checks the probabilities.
    expected = (mdp.init[:, None] * torch.softmax(theta, -1) * mdp.reward_mean).sum()
    assert abs(J_const - expected.item()) < 1e-12


def test_full_planning_partial_gradient_is_the_ordinary_gradient(mdp, theta):
    """With gamma = 1, sum_t d/d(theta_t) E[G_t] must equal d/d(theta) E[sum_t r_t] for shared theta."""
    states, actions, lengths = enumerate_trajectories(mdp)
    T = mdp.horizon
    valid = torch.arange(T)[None, :] < lengths[:, None]
    shared = theta.clone().requires_grad_(True)
    logpi = torch.log_softmax(shared, -1)[states, actions]
    trans = mdp.transition[states[:, :-1], actions[:, :-1], states[:, 1:]].log()
    log_p = (
        mdp.init[states[:, 0]].log() + (logpi * valid).sum(1) + torch.where(valid[:, 1:], trans, 0.0).sum(1)
    )
    expected_return = (log_p.exp() * (mdp.reward_mean[states, actions] * valid).sum(1)).sum()
    (true_grad,) = torch.autograd.grad(expected_return, shared)
    _, g = exact_partial_gradient(mdp, theta, Objective(policy_class=FullPlanning(), gamma=1.0))
    assert torch.allclose(g, true_grad, atol=1e-12)


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: b.type)
@pytest.mark.parametrize("policy_class", POLICY_CLASSES, ids=lambda p: p.type)
def test_monte_carlo_mean_matches_the_exact_partial_gradient(mdp, theta, policy_class, baseline):
    objective = Objective(policy_class=policy_class, gamma=0.9, baseline=baseline)
    _, exact = exact_partial_gradient(mdp, theta, objective)
    estimates = sample_gradient_estimates(mdp, theta, objective, BATCHES, GROUPS, GROUP_SIZE, seed=1)
    z, stderr = z_scores(estimates, exact)
    assert stderr.max() < 0.1 * exact.abs().max(), "too few samples for the comparison to mean anything"
    assert z.abs().max() < Z_BOUND, f"bias: z-scores {z}"


def test_the_comparison_catches_a_wrong_estimator(mdp, theta):
    """Power check: greedy's estimates are *not* an estimate of full planning's gradient."""
    _, full_exact = exact_partial_gradient(mdp, theta, Objective(policy_class=FullPlanning(), gamma=0.9))
    greedy = Objective(policy_class=Greedy(), gamma=0.9)
    estimates = sample_gradient_estimates(mdp, theta, greedy, BATCHES, GROUPS, GROUP_SIZE, seed=1)
    z, _ = z_scores(estimates, full_exact)
    assert z.abs().max() > 3 * Z_BOUND


def test_token_mean_is_a_rescaled_sequence_mean_for_fixed_length_episodes():
    mdp = myopic_mdp(horizon=3)
    theta = reference_policy(mdp)
    objective = Objective(policy_class=KStep(k=2), baseline=NoBaseline())
    seq = sample_gradient_estimates(mdp, theta, objective, 50, 2, 2, seed=4, reduction="sequence_mean")
    tok = sample_gradient_estimates(mdp, theta, objective, 50, 2, 2, seed=4, reduction="token_mean")
    assert torch.allclose(tok, seq / 3)  # one agent token per turn, 3 turns per episode


def test_smaller_subsets_have_lower_variance_where_rewards_are_myopic():
    """Future rewards do not depend on today's reply: every class has the same gradient, and
    each extra turn in the subset only adds the judge's noise."""
    mdp = myopic_mdp(horizon=5, noise=2.0)
    theta = reference_policy(mdp)
    variance, gradients = {}, {}
    for policy_class in (FullPlanning(), KStep(k=2), Greedy()):
        objective = Objective(policy_class=policy_class, baseline=NoBaseline())
        gradients[policy_class.type] = exact_partial_gradient(mdp, theta, objective)[1]
        estimates = sample_gradient_estimates(mdp, theta, objective, 2000, 1, 1, seed=2)
        variance[policy_class.type] = estimates.var(0).sum().item()
    assert torch.allclose(gradients["greedy"], gradients["full"], atol=1e-12)
    assert torch.allclose(gradients["k_step"], gradients["full"], atol=1e-12)
    # The sample variance of 2000 estimates is within ~10% of the truth; the gaps are far larger.
    assert variance["greedy"] < 0.75 * variance["k_step"] < 0.75 * variance["full"]


def test_where_rewards_are_delayed_only_planning_learns_to_ask():
    """Elicitation: 'ask' (action 0) pays nothing now but enables a large later reward."""
    mdp = delayed_mdp(horizon=4)
    theta = torch.zeros(2, 3, dtype=torch.double)
    grad = {
        pc.type: exact_partial_gradient(mdp, theta, Objective(policy_class=pc))[1]
        for pc in (FullPlanning(), KStep(k=2), Greedy())
    }
    ask_uninformed = (0, 0)
    assert grad["full"][ask_uninformed] > 0
    assert grad["k_step"][ask_uninformed] > 0
    assert grad["greedy"][ask_uninformed] < 0


def test_group_episodes_share_their_start_state():
    mdp = random_mdp(seed=3)
    episodes = sample_episodes(mdp, reference_policy(mdp), 50, 4, torch.Generator().manual_seed(0))
    starts = episodes.states[:, 0].view(50, 4)
    assert (starts == starts[:, :1]).all()
    assert episodes.group_ids.tolist() == [g for g in range(50) for _ in range(4)]
