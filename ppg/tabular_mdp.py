"""A conversation small enough to enumerate: the ground truth for the partial policy gradient.

States are what the agent knows about the user (mood, topic), actions are kinds of reply, rewards are
stochastic per turn, and one optional action ends the conversation (so the policy decides the episode
length). The policy is a softmax table theta[S, A] shared by all turns, like an LLM's weights.

What the estimator is unbiased for: the agent at turn t, acting with its own copy theta_t of the
weights, maximises E[G_t]; the partial gradient is the sum of those per-turn gradients, evaluated at
theta_t = theta for all t:

    g_S(theta) = sum_t  d/d(theta_t) E[G_t](theta_0, ..., theta_{T-1})

For full planning with gamma = 1 this is the ordinary gradient of the expected return; for the other
classes it is the gradient that each turn's smaller objective asks for. Here it is computed exactly by
enumerating every trajectory; ``sample_gradient_estimates`` computes the Monte Carlo estimate through
the real ``Objective`` and ``policy_gradient_loss``, so the two can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ppg.loss import policy_gradient_loss
from ppg.objectives import (
    Custom,
    FullPlanning,
    Greedy,
    KStep,
    Objective,
    Segment,
    segment_ids_from_boundaries,
    valid_from_lengths,
)


@dataclass(frozen=True)
class TabularConversationMDP:
    init: Tensor  # [S] initial-state distribution (the "persona" the conversation starts from)
    transition: Tensor  # [S, A, S]
    reward_mean: Tensor  # [S, A]
    reward_std: Tensor  # [S, A] Gaussian noise of the judge
    horizon: int  # T, the most agent turns
    end_action: int | None = None  # this reply ends the conversation (after its reward)
    segment_boundaries: tuple[int, ...] = ()  # turns where a new topic starts

    @property
    def num_states(self) -> int:
        return self.init.shape[0]

    @property
    def num_actions(self) -> int:
        return self.reward_mean.shape[1]

    def segment_ids(self, lengths: Tensor) -> Tensor:
        """Segment ids [B, T]; boundaries past an episode's end do not apply to it."""
        starts = [[s for s in self.segment_boundaries if s < int(n)] for n in lengths]
        ids = segment_ids_from_boundaries(starts, lengths.tolist())
        return torch.nn.functional.pad(ids, (0, self.horizon - ids.shape[1]))


@dataclass(frozen=True)
class Episodes:
    states: Tensor  # [B, T] long (0 on padding)
    actions: Tensor  # [B, T] long (0 on padding)
    rewards: Tensor  # [B, T] float (0 on padding)
    valid: Tensor  # [B, T] bool
    group_ids: Tensor  # [B] long: episodes that share a start state ("persona") and batch


# --- Example MDPs -------------------------------------------------------------------------------


def random_mdp(
    seed: int = 0,
    states: int = 3,
    actions: int = 3,
    horizon: int = 4,
    end_action: bool = True,
    boundaries: tuple[int, ...] = (2,),
) -> TabularConversationMDP:
    """A generic MDP: action-dependent transitions and rewards, noisy rewards, optional ending."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.double)  # noqa: E731
    return TabularConversationMDP(
        init=torch.softmax(randn(states), 0),
        transition=torch.softmax(2 * randn(states, actions, states), -1),
        reward_mean=randn(states, actions),
        reward_std=0.5 + torch.rand(states, actions, generator=g, dtype=torch.double),
        horizon=horizon,
        end_action=actions - 1 if end_action else None,
        segment_boundaries=boundaries,
    )


def myopic_mdp(horizon: int = 5, noise: float = 2.0) -> TabularConversationMDP:
    """Rewards depend only on the current reply and the topic drifts regardless of it.

    Future rewards do not depend on today's action, so every class has the *same* partial gradient
    here, and the smaller the subset, the less of the judge's noise enters the estimate: greedy wins.
    """
    S, A = 3, 3
    return TabularConversationMDP(
        init=torch.full((S,), 1 / S, dtype=torch.double),
        transition=torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6]], dtype=torch.double)[
            :, None, :
        ]
        .expand(S, A, S)
        .contiguous(),
        reward_mean=torch.tensor([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [-0.5, 0.0, 1.0]], dtype=torch.double),
        reward_std=torch.full((S, A), noise, dtype=torch.double),
        horizon=horizon,
    )


def delayed_mdp(horizon: int = 4, noise: float = 0.5) -> TabularConversationMDP:
    """Elicitation: 'ask' earns nothing now but moves to 'informed', where 'recommend' pays off.

    States: 0 = uninformed, 1 = informed. Actions: 0 = ask, 1 = recommend, 2 = chit-chat.
    A greedy policy never learns to ask; full planning (or K >= 2) does.
    """
    S, A = 2, 3
    transition = torch.zeros(S, A, S, dtype=torch.double)
    transition[0, 0, 1] = 1.0  # asking informs
    transition[0, 1:, 0] = 1.0
    transition[1, :, 1] = 1.0  # once informed, stays informed
    return TabularConversationMDP(
        init=torch.tensor([1.0, 0.0], dtype=torch.double),
        transition=transition,
        reward_mean=torch.tensor([[0.0, 0.3, 0.2], [0.0, 2.0, 0.2]], dtype=torch.double),
        reward_std=torch.full((S, A), noise, dtype=torch.double),
        horizon=horizon,
    )


# --- Exact: enumerate every trajectory ----------------------------------------------------------


def enumerate_trajectories(mdp: TabularConversationMDP) -> tuple[Tensor, Tensor, Tensor]:
    """All trajectories of non-zero probability: states [N, T], actions [N, T], lengths [N]."""
    T, out = mdp.horizon, []

    def extend(states: list[int], actions: list[int]) -> None:
        s = states[-1]
        for a in range(mdp.num_actions):
            if a == mdp.end_action or len(actions) + 1 == T:
                out.append((states, actions + [a]))
                continue
            for s_next in range(mdp.num_states):
                if mdp.transition[s, a, s_next] > 0:
                    extend(states + [s_next], actions + [a])

    for s0 in range(mdp.num_states):
        if mdp.init[s0] > 0:
            extend([s0], [])
    lengths = torch.tensor([len(a) for _, a in out])
    pad = lambda xs: xs + [0] * (T - len(xs))  # noqa: E731
    states = torch.tensor([pad(s) for s, _ in out])
    actions = torch.tensor([pad(a) for _, a in out])
    return states, actions, lengths


def subset_by_definition(policy_class, t: int, length: int, boundaries: tuple[int, ...]) -> list[int]:
    """S_t straight from the table in DESIGN.md, in plain Python: the oracle the masks are checked against."""
    if isinstance(policy_class, FullPlanning):
        return list(range(t, length))
    if isinstance(policy_class, Greedy):
        return [t]
    if isinstance(policy_class, KStep):
        return list(range(t, min(t + policy_class.k, length)))
    if isinstance(policy_class, Segment):
        end = min([b for b in boundaries if b > t] + [length])
        return list(range(t, end))
    if isinstance(policy_class, Custom):
        return [u for u in range(t, length) if policy_class.matrix[t][u]]
    raise TypeError(f"no definition for {policy_class!r}")


def exact_partial_gradient(
    mdp: TabularConversationMDP, theta: Tensor, objective: Objective
) -> tuple[float, Tensor]:
    """(J_S, g_S): the partial objective sum_t E[G_t] and its partial gradient [S, A], by enumeration."""
    states, actions, lengths = enumerate_trajectories(mdp)
    N, T = states.shape
    valid = valid_from_lengths(lengths, T)
    copies = theta.detach().double().expand(T, *theta.shape).clone().requires_grad_(True)  # [T, S, A]

    steps = torch.arange(T)
    logpi = torch.log_softmax(copies, -1)[steps, states, actions]  # [N, T]: turn t uses copy t
    log_init = mdp.init[states[:, 0]].log()
    log_trans = mdp.transition[states[:, :-1], actions[:, :-1], states[:, 1:]].log()  # [N, T-1]
    log_p = log_init + (logpi * valid).sum(1) + torch.where(valid[:, 1:], log_trans, 0.0).sum(1)
    p = log_p.exp()  # [N]

    mean_rewards = mdp.reward_mean[states, actions] * valid  # [N, T]
    returns = torch.zeros(N, T, dtype=torch.double)
    discount = objective.gamma ** turn_gaps(T)
    for length in lengths.unique().tolist():
        M = torch.zeros(T, T, dtype=torch.double)
        for t in range(length):
            M[t, subset_by_definition(objective.policy_class, t, length, mdp.segment_boundaries)] = 1.0
        rows = lengths == length
        returns[rows] = mean_rewards[rows] @ (M * discount).T

    expected_returns = p @ returns  # [T]: E[G_t]
    grad = torch.zeros_like(theta, dtype=torch.double)
    for t in range(T):
        grad += torch.autograd.grad(expected_returns[t], copies, retain_graph=True)[0][t]
    return float(expected_returns.sum().detach()), grad


def turn_gaps(T: int) -> Tensor:
    t = torch.arange(T)
    return (t[None, :] - t[:, None]).clamp(min=0).double()


# --- Monte Carlo: sample, then estimate through the real objective and loss ---------------------


def sample_episodes(
    mdp: TabularConversationMDP, theta: Tensor, num_groups: int, group_size: int, generator: torch.Generator
) -> Episodes:
    """num_groups start states ("personas"), each with group_size independent conversations."""
    B, T = num_groups * group_size, mdp.horizon
    s = torch.multinomial(mdp.init, num_groups, replacement=True, generator=generator)
    s = s.repeat_interleave(group_size)
    pi = torch.softmax(theta.detach().double(), -1)
    states = torch.zeros(B, T, dtype=torch.long)
    actions = torch.zeros(B, T, dtype=torch.long)
    rewards = torch.zeros(B, T, dtype=torch.double)
    valid = torch.zeros(B, T, dtype=torch.bool)
    alive = torch.ones(B, dtype=torch.bool)
    for t in range(T):
        a = torch.multinomial(pi[s], 1, generator=generator).squeeze(1)
        noise = torch.randn(B, dtype=torch.double, generator=generator)
        states[:, t], actions[:, t], valid[:, t] = s * alive, a * alive, alive
        rewards[:, t] = (mdp.reward_mean[s, a] + mdp.reward_std[s, a] * noise) * alive
        if mdp.end_action is not None:
            alive = alive & (a != mdp.end_action)
        s = torch.multinomial(mdp.transition[s, a], 1, generator=generator).squeeze(1)
    return Episodes(states, actions, rewards, valid, torch.arange(num_groups).repeat_interleave(group_size))


def sample_gradient_estimates(
    mdp: TabularConversationMDP,
    theta: Tensor,
    objective: Objective,
    num_batches: int,
    num_groups: int,
    group_size: int,
    seed: int = 0,
    reduction: str = "sequence_mean",
) -> Tensor:
    """num_batches independent gradient estimates [M, S, A], each from one batch of episodes.

    Each episode is laid out as tokens the way the learner sees a conversation: per turn a user token
    (context; its log-prob depends on theta too, so a wrong agent mask would show) then the agent's
    token. The estimate is -d(loss)/d(theta) of ``policy_gradient_loss``.
    """
    g = torch.Generator().manual_seed(seed)
    per_batch = num_groups * group_size
    ep = sample_episodes(mdp, theta, num_batches * num_groups, group_size, g)
    B, T = ep.states.shape
    batch_of = torch.arange(B) // per_batch
    thetas = theta.detach().double().expand(num_batches, *theta.shape).clone().requires_grad_(True)
    logpi = torch.log_softmax(thetas[batch_of], -1)  # [B, S, A]
    rows = torch.arange(B)[:, None]
    agent_lp = logpi[rows, ep.states, ep.actions]  # [B, T]
    user_lp = logpi[rows, ep.states, torch.zeros_like(ep.actions)]  # [B, T] context, must be masked out
    logprobs = torch.stack([user_lp, agent_lp], dim=2).reshape(B, 2 * T)  # [B, L]: user, agent, user, ...
    agent_mask = torch.stack([torch.zeros_like(ep.valid), ep.valid], dim=2).reshape(B, 2 * T)
    token_turn = torch.arange(T).repeat_interleave(2).expand(B, 2 * T)
    segment_ids = mdp.segment_ids(ep.valid.sum(1))

    total = torch.zeros((), dtype=torch.double)
    for m in range(num_batches):
        sl = slice(m * per_batch, (m + 1) * per_batch)
        adv = objective.advantages(ep.rewards[sl], ep.valid[sl], segment_ids[sl], ep.group_ids[sl])
        total = total + policy_gradient_loss(logprobs[sl], agent_mask[sl], token_turn[sl], adv, reduction)
    (grads,) = torch.autograd.grad(total, thetas)
    return -grads  # [M, S, A]


def reference_policy(mdp: TabularConversationMDP, seed: int = 0) -> Tensor:
    """A fixed, non-uniform policy to evaluate gradients at."""
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(mdp.num_states, mdp.num_actions, generator=g, dtype=torch.double)
