"""Reward-subset masks, partial returns and baselines: exact small cases, properties, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ppg.objectives import (
    Custom,
    FullPlanning,
    Greedy,
    GroupMean,
    KStep,
    NoBaseline,
    Objective,
    ObjectiveInputError,
    Segment,
    TurnMean,
    partial_returns,
    segment_ids_from_boundaries,
    valid_from_lengths,
)
from ppg.tabular_mdp import subset_by_definition


def subsets(mask: torch.Tensor, b: int = 0) -> list[list[int]]:
    """Mask row t -> the list of turns u credited to turn t."""
    return [row.nonzero().flatten().tolist() for row in mask[b]]


VALID4 = torch.ones(1, 4, dtype=torch.bool)


def test_each_policy_class_is_its_subset_on_a_4_turn_episode():
    assert subsets(FullPlanning().mask(VALID4)) == [[0, 1, 2, 3], [1, 2, 3], [2, 3], [3]]
    assert subsets(Greedy().mask(VALID4)) == [[0], [1], [2], [3]]
    assert subsets(KStep(k=2).mask(VALID4)) == [[0, 1], [1, 2], [2, 3], [3]]
    seg = segment_ids_from_boundaries([[2]], [4])
    assert subsets(Segment().mask(VALID4, seg)) == [[0, 1], [1], [2, 3], [3]]
    custom = Custom(matrix=[[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
    assert subsets(custom.mask(VALID4)) == [[0, 3], [1, 2], [3], [3]]


def test_k_step_limits():
    valid = valid_from_lengths([5, 3, 1], T=5)
    full = FullPlanning().mask(valid)
    for k in (5, 6, 100):
        assert torch.equal(KStep(k=k).mask(valid), full)
    assert torch.equal(KStep(k=1).mask(valid), Greedy().mask(valid))


def test_segment_mask_never_crosses_a_boundary():
    lengths = [7, 5]
    boundaries = [[2, 5], [1]]
    seg = segment_ids_from_boundaries(boundaries, lengths)
    assert seg.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 0, 0]]
    mask = Segment().mask(valid_from_lengths(lengths), seg)
    for b, (starts, length) in enumerate(zip(boundaries, lengths, strict=True)):
        for t in range(length):
            credited = mask[b, t].nonzero().flatten().tolist()
            assert credited == subset_by_definition(Segment(), t, length, tuple(starts))
            assert all(seg[b, u] == seg[b, t] for u in credited)


def test_partial_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    valid = valid_from_lengths([3])
    gamma = 0.5
    full = partial_returns(r, FullPlanning().mask(valid), gamma)
    assert torch.allclose(full, torch.tensor([[1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0]]))
    greedy = partial_returns(r, Greedy().mask(valid), gamma)
    assert torch.equal(greedy, r)
    two = partial_returns(r, KStep(k=2).mask(valid), gamma)
    assert torch.allclose(two, torch.tensor([[2.0, 4.0, 4.0]]))


def test_padding_is_ignored_even_if_it_holds_nan():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, float("nan"), float("nan")]])
    valid = valid_from_lengths([3, 1])
    returns = Objective(policy_class=FullPlanning(), baseline=NoBaseline()).returns(rewards, valid)
    assert returns.tolist() == [[6.0, 5.0, 3.0], [5.0, 0.0, 0.0]]


def test_turn_mean_baseline_is_leave_one_out_per_turn_index():
    # Three episodes of lengths 3, 2, 1: turn 2 exists only in episode 0, so it has no baseline there.
    rewards = torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    valid = valid_from_lengths([3, 2, 1])
    obj = Objective(policy_class=Greedy(), baseline=TurnMean())
    adv = obj.advantages(rewards, valid)
    expected = torch.tensor(
        [
            [1 - (3 + 5) / 2, 1 - 2, 1 - 0],  # no other episode reaches turn 2 -> b = 0
            [3 - (1 + 5) / 2, 2 - 1, 0],
            [5 - (1 + 3) / 2, 0, 0],
        ]
    )
    assert torch.allclose(adv, expected)


def test_group_mean_baseline_uses_only_the_same_group():
    rewards = torch.tensor([[1.0], [3.0], [10.0], [20.0], [7.0]])
    valid = torch.ones(5, 1, dtype=torch.bool)
    groups = torch.tensor([0, 0, 1, 1, 2])
    adv = Objective(policy_class=Greedy(), baseline=GroupMean()).advantages(rewards, valid, group_ids=groups)
    assert adv.flatten().tolist() == [-2.0, 2.0, -10.0, 10.0, 7.0]  # a lone sample keeps b = 0


def test_group_std_normalisation_gives_unit_scale_within_each_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=g, dtype=torch.double) * 5 + 2
    valid = torch.ones(12, 3, dtype=torch.bool)
    groups = torch.arange(3).repeat_interleave(4)
    raw = Objective(policy_class=Greedy(), baseline=GroupMean()).advantages(rewards, valid, group_ids=groups)
    norm = Objective(policy_class=Greedy(), baseline=GroupMean(normalize_std=True)).advantages(
        rewards, valid, group_ids=groups
    )
    for k in range(3):
        rows = groups == k
        std = rewards[rows].std(0, unbiased=False)
        assert torch.allclose(norm[rows], raw[rows] / (std + 1e-6))


def test_group_std_normalisation_leaves_a_lone_sample_unscaled():
    # group 1 has one member; in group 0 only the first episode reaches turn 1
    rewards = torch.tensor([[1.0, 4.0], [3.0, 0.0], [0.5, 2.0]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    groups = torch.tensor([0, 0, 1])
    adv = Objective(policy_class=Greedy(), baseline=GroupMean(normalize_std=True)).advantages(
        rewards, valid, group_ids=groups
    )
    # turn 0 of group 0: (1 - 3) / std{1, 3} = -2 / 1; lone samples: G - 0, not G / 1e-6
    assert torch.allclose(adv, torch.tensor([[-2.0 / (1 + 1e-6), 4.0], [2.0 / (1 + 1e-6), 0.0], [0.5, 2.0]]))


def test_advantages_are_detached():
    rewards = torch.ones(2, 2, requires_grad=True)
    adv = Objective().advantages(rewards, torch.ones(2, 2, dtype=torch.bool))
    assert not adv.requires_grad


# --- Properties over random ragged batches -------------------------------------------------------


@st.composite
def ragged_batches(draw):
    lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=6))
    T = max(lengths) + draw(st.integers(0, 2))
    boundaries = [
        sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else [] for n in lengths
    ]
    k = draw(st.integers(1, 8))
    gamma = draw(st.floats(0.1, 1.0))
    return lengths, T, boundaries, k, gamma


@settings(max_examples=60, deadline=None)
@given(ragged_batches())
def test_masks_match_the_definition_on_ragged_batches(batch):
    lengths, T, boundaries, k, gamma = batch
    valid = valid_from_lengths(lengths, T)
    seg = torch.nn.functional.pad(segment_ids_from_boundaries(boundaries, lengths), (0, T - max(lengths)))
    for policy_class in (FullPlanning(), Greedy(), KStep(k=k), Segment()):
        mask = policy_class.mask(valid, seg)
        assert mask.shape == (len(lengths), T, T) and mask.dtype == torch.bool
        assert not (mask & ~torch.ones(T, T, dtype=torch.bool).triu()).any(), "credit before t"
        assert not (mask & ~FullPlanning().mask(valid)).any(), "credit on padding"
        for b, n in enumerate(lengths):
            for t in range(n):
                assert subsets(mask, b)[t] == subset_by_definition(policy_class, t, n, tuple(boundaries[b]))


@settings(max_examples=40, deadline=None)
@given(ragged_batches(), st.integers(0, 2**31 - 1))
def test_returns_are_the_discounted_subset_sums_and_padding_never_leaks(batch, seed):
    lengths, T, boundaries, k, gamma = batch
    g = torch.Generator().manual_seed(seed)
    valid = valid_from_lengths(lengths, T)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.double)
    junk = rewards.masked_fill(~valid, 1e6)  # what padding holds must not matter
    obj = Objective(policy_class=KStep(k=k), gamma=gamma, baseline=NoBaseline())
    returns = obj.returns(junk, valid)
    for b, n in enumerate(lengths):
        for t in range(T):
            want = (
                sum(gamma ** (u - t) * rewards[b, u].item() for u in range(t, min(t + k, n))) if t < n else 0
            )
            assert math.isclose(returns[b, t].item(), want, rel_tol=1e-9, abs_tol=1e-9)


# --- Bad input: a clear error at the boundary ------------------------------------------------------


def test_negative_or_zero_k_is_refused_naming_k():
    for k in (0, -3):
        with pytest.raises(ValidationError, match="k"):
            KStep(k=k)


@pytest.mark.parametrize(
    ("boundaries", "lengths", "message"),
    [
        ([[0]], [4], "must lie in 1..3"),
        ([[4]], [4], "must lie in 1..3"),
        ([[-1]], [4], "must lie in 1..3"),
        ([[3, 2]], [5], "strictly increasing"),
        ([[2, 2]], [5], "strictly increasing"),
        ([[2]], [4, 4], "given for 1 episodes but the batch has 2"),
    ],
)
def test_bad_segment_boundaries(boundaries, lengths, message):
    with pytest.raises(ObjectiveInputError, match=message):
        segment_ids_from_boundaries(boundaries, lengths)


def test_segment_class_without_segments_or_with_decreasing_ids():
    with pytest.raises(ObjectiveInputError, match="needs segment_ids"):
        Segment().mask(VALID4)
    with pytest.raises(ObjectiveInputError, match="decrease"):
        Segment().mask(VALID4, torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ObjectiveInputError, match="shape"):
        Segment().mask(VALID4, torch.tensor([[0, 1]]))


def test_custom_mask_with_credit_before_t_names_the_entry():
    bad = Custom(matrix=[[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    with pytest.raises(ObjectiveInputError, match=r"matrix\[1\]\[0\].*earlier turn"):
        bad.mask(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ObjectiveInputError, match="0 or 1"):
        Custom(matrix=[[2, 0], [0, 1]]).mask(torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ObjectiveInputError, match="square and at least T x T"):
        Custom(matrix=[[1, 0], [0, 1]]).mask(torch.ones(1, 3, dtype=torch.bool))


def test_nan_reward_on_a_real_turn_is_refused_with_its_position():
    rewards = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ObjectiveInputError, match="episode 0, turn 1 is nan"):
        Objective().returns(rewards, torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    ("rewards", "valid", "message"),
    [
        (torch.ones(3), torch.ones(3, dtype=torch.bool), r"rewards must be \[B, T\]"),
        (torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool), "valid must be a bool tensor"),
        (torch.ones(2, 3), torch.ones(2, 3), "valid must be a bool tensor"),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), "floating point"),
        (torch.ones(1, 3), torch.tensor([[True, False, True]]), "has a gap"),
    ],
)
def test_bad_reward_batches(rewards, valid, message):
    with pytest.raises(ObjectiveInputError, match=message):
        Objective().returns(rewards, valid)


def test_group_baseline_needs_group_ids_of_batch_shape():
    obj = Objective(baseline=GroupMean())
    rewards, valid = torch.ones(4, 2), torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ObjectiveInputError, match="needs group_ids"):
        obj.advantages(rewards, valid)
    with pytest.raises(ObjectiveInputError, match=r"group_ids has shape \(2,\)"):
        obj.advantages(rewards, valid, group_ids=torch.zeros(2, dtype=torch.long))


def test_bad_lengths():
    with pytest.raises(ObjectiveInputError, match=">= 0"):
        valid_from_lengths([2, -1])
    with pytest.raises(ObjectiveInputError, match="exceed"):
        valid_from_lengths([5], T=3)
