"""The token-level loss: agent tokens only, the turn's advantage on each, and its two reductions."""

from __future__ import annotations

import pytest
import torch

from ppg.loss import (
    clipped_surrogate_loss,
    importance_weights,
    kl_penalty,
    policy_gradient_loss,
    token_logprobs,
    turn_logprobs,
)
from ppg.objectives import ObjectiveInputError

# One conversation, 8 tokens: [sys, user, A0, A0, user, A1, user, pad]
AGENT = torch.tensor([[False, False, True, True, False, True, False, False]])
TURN = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])


def test_token_logprobs_are_next_token_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    lp = token_logprobs(logits, ids)
    assert lp.shape == (2, 5) and torch.all(lp[:, 0] == 0)
    for b in range(2):
        for i in range(1, 5):
            assert torch.isclose(lp[b, i], torch.log_softmax(logits[b, i - 1], -1)[ids[b, i]])


def test_turn_logprobs_sum_only_the_agents_tokens_per_turn():
    lp = torch.tensor([[-9.0, -9.0, -1.0, -2.0, -9.0, -3.0, -9.0, -9.0]])
    assert turn_logprobs(lp, AGENT, TURN, 2).tolist() == [[-3.0, -3.0]]


def test_loss_by_hand_and_user_tokens_get_no_gradient():
    lp = torch.tensor([[-0.5, -0.7, -1.0, -2.0, -0.3, -3.0, -0.1, -0.2]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss = policy_gradient_loss(lp, AGENT, TURN, adv, "sequence_mean")
    assert torch.isclose(loss, -torch.tensor((-1.0 - 2.0) * 2.0 + (-3.0) * -1.0))
    loss.backward()
    assert lp.grad.tolist() == [[0.0, 0.0, -2.0, -2.0, 0.0, 1.0, 0.0, 0.0]]


def test_reductions():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 8, generator=g)
    agent = AGENT.expand(3, 8).clone()
    agent[2, 5] = False  # 3 + 3 + 2 agent tokens
    turn = TURN.expand(3, 8)
    adv = torch.randn(3, 2, generator=g)
    total = sum(lp[b, i] * adv[b, turn[b, i]] for b in range(3) for i in range(8) if agent[b, i])
    assert torch.isclose(policy_gradient_loss(lp, agent, turn, adv, "sequence_mean"), -total / 3)
    assert torch.isclose(policy_gradient_loss(lp, agent, turn, adv, "token_mean"), -total / 8)


def test_advantages_are_not_differentiated():
    lp = torch.zeros(1, 8, requires_grad=True)
    adv = torch.ones(1, 2, requires_grad=True)
    policy_gradient_loss(lp, AGENT, TURN, adv).backward()
    assert adv.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(logprobs=torch.zeros(8)), r"logprobs must be \[B, L\]"),
        (dict(agent_mask=AGENT[:, :4]), "agent_mask has shape"),
        (dict(agent_mask=AGENT.long()), "agent_mask must be bool"),
        (dict(token_turn=TURN[:, :3]), "token_turn has shape"),
        (dict(token_turn=TURN + 1), r"token_turn on agent tokens must lie in 0..1"),
        (dict(logprobs=torch.full((1, 8), float("-inf"))), "logprob of agent token 2"),
        (dict(reduction="mean"), "loss_reduction"),
    ],
)
def test_bad_token_batches(kwargs, message):
    args = dict(logprobs=torch.zeros(1, 8), agent_mask=AGENT, token_turn=TURN, advantages=torch.ones(1, 2))
    args.update(kwargs)
    with pytest.raises(ObjectiveInputError, match=message):
        policy_gradient_loss(**args)


def _expected_gradient(loss_of_action, theta: torch.Tensor) -> torch.Tensor:
    """E_{a ~ softmax(theta)}[grad loss(a)], by enumerating the actions (the sampling distribution
    itself is not differentiated: a loss is averaged over samples drawn from it)."""
    probs = torch.softmax(theta, -1).detach()
    total = torch.zeros_like(theta)
    for a in range(theta.numel()):
        (g,) = torch.autograd.grad(loss_of_action(a), theta)
        total += probs[a] * g
    return total


def test_kl_penalty_has_the_gradient_of_kl_pi_ref_and_reports_it_exactly_in_expectation():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.double, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.double), -1)
    one = torch.ones(1, dtype=torch.bool)

    def term(a: int, which: int) -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)[a].reshape(1)
        return kl_penalty(logp, ref[a].reshape(1), one)[which]

    pi = torch.softmax(theta, -1)
    kl = (pi * (torch.log(pi) - ref)).sum()  # KL(pi || ref), exactly
    (want,) = torch.autograd.grad(kl, theta)
    assert torch.allclose(_expected_gradient(lambda a: term(a, 0), theta), want, atol=1e-12)
    estimate = sum(pi[a].detach() * term(a, 1) for a in range(5))  # unbiased for KL(pi || ref)
    assert torch.isclose(estimate, kl.detach(), atol=1e-12)

    # the k3 estimate used as a loss would follow KL(ref || pi) instead: the bug this replaces
    def k3(a: int) -> torch.Tensor:
        d = ref[a] - torch.log_softmax(theta, -1)[a]
        return torch.exp(d) - d - 1

    reverse = (ref.exp() * (ref - torch.log_softmax(theta, -1))).sum()
    (other,) = torch.autograd.grad(reverse, theta)
    assert torch.allclose(_expected_gradient(k3, theta), other, atol=1e-12)
    assert not torch.allclose(other, want, atol=1e-3)


def test_ppo_first_step_is_the_policy_gradient_and_clipped_tokens_get_none():
    """At r = 1 the clipped objective's gradient is the policy gradient's; once a token's ratio has
    left [1 - eps, 1 + eps] in its advantage's direction it gets no gradient, and against it it
    keeps r * A (PPO's pessimistic bound), by hand."""
    lp = torch.tensor([[-0.5, -0.7, -1.0, -2.0, -0.3, -3.0, -0.1, -0.2]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss, clipped = clipped_surrogate_loss(lp, lp.detach(), AGENT, TURN, adv, clip=0.2)
    loss.backward()
    assert lp.grad.tolist() == [[0.0, 0.0, -2.0, -2.0, 0.0, 1.0, 0.0, 0.0]] and clipped == 0

    # old log-probs such that r = 1.5 on token 2 (A = +2: clipped), r = 0.5 on token 3 (A = +2:
    # below the region, kept), r = 0.5 on token 5 (A = -1: clipped)
    log = torch.log
    now = torch.tensor(
        [[0.0, 0.0, log(torch.tensor(1.5)), log(torch.tensor(0.5)), 0.0, log(torch.tensor(0.5)), 0.0, 0.0]]
    )
    x = now.clone().requires_grad_(True)
    loss, clipped = clipped_surrogate_loss(x, torch.zeros(1, 8), AGENT, TURN, adv, clip=0.2)
    assert torch.isclose(loss, -torch.tensor(1.2 * 2.0 + 0.5 * 2.0 + 0.8 * -1.0))
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, 0.0, -0.5 * 2.0, 0.0, 0.0, 0.0, 0.0]]))
    assert torch.isclose(clipped, torch.tensor(2 / 3))


def test_sequence_importance_weights_correct_one_step_off_policy_exactly():
    """One-step off-policy (run.async_rollouts): episodes sampled by mu (the previous version), the
    update taken at pi. By enumeration of every 2-token reply over a 3-token vocabulary, the expected
    estimator on mu's samples with learner.importance_ratio=sequence (untruncated) equals the exact
    gradient of pi's expected reward; the per-token ratio does not (it ignores how the first token's
    probability moved the second token's context and the reward)."""
    torch.manual_seed(0)
    first = torch.randn(3, requires_grad=True)  # pi's logits for token 1
    second = torch.randn(3, 3, requires_grad=True)  # pi's logits for token 2, given token 1
    old_first, old_second = first.detach() + 0.5 * torch.randn(3), second.detach() + 0.5 * torch.randn(3, 3)
    reward = torch.randn(3, 3)
    replies = [(a, b) for a in range(3) for b in range(3)]

    def logp(f, s, a, b):  # [1, L=3]: position 0 is context (no action), then the 2 reply tokens
        return torch.stack([torch.zeros(()), f.log_softmax(0)[a], s[a].log_softmax(0)[b]])[None]

    exact = torch.autograd.grad(
        sum(logp(first, second, a, b).sum().exp() * reward[a, b] for a, b in replies), (first, second)
    )
    agent = torch.tensor([[False, True, True]])
    turn = torch.zeros(1, 3, dtype=torch.long)
    for ratio, exact_expected in (("sequence", True), ("token", False)):
        expected = [torch.zeros(3), torch.zeros(3, 3)]
        for a, b in replies:
            now, behaviour = logp(first, second, a, b), logp(old_first, old_second, a, b)
            w = importance_weights(now, behaviour, agent, torch.tensor([True]), float("inf"), ratio)
            loss = policy_gradient_loss(now, agent, turn, reward[a, b].reshape(1, 1), token_weights=w)
            grads = torch.autograd.grad(-loss, (first, second))
            mu = behaviour.sum().exp()  # the sampler's probability of this reply
            expected = [e + mu * g for e, g in zip(expected, grads, strict=True)]
        close = all(torch.allclose(e, x, atol=1e-6) for e, x in zip(expected, exact, strict=True))
        assert close == exact_expected, ratio


def test_importance_weights_are_truncated_and_leave_on_policy_episodes_alone():
    now = torch.log(torch.tensor([[0.0, 0.9, 0.9], [0.0, 0.9, 0.9]]).clamp(min=1e-9))
    behaviour = torch.log(torch.tensor([[1.0, 0.3, 0.3], [1.0, 0.3, 0.3]]))  # ratio 3 per token, 9 per reply
    agent = torch.tensor([[False, True, True], [False, True, True]])
    stale = torch.tensor([True, False])
    w = importance_weights(now, behaviour, agent, stale, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    untruncated = importance_weights(now, behaviour, agent, stale, clip=100.0)
    torch.testing.assert_close(untruncated[0, 1:], torch.tensor([9.0, 9.0]))
    torch.testing.assert_close(
        importance_weights(now, behaviour, agent, stale, 100.0, "token")[0, 1:], torch.tensor([3.0, 3.0])
    )
