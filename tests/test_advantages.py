"""Exact group advantages for hand-worked reward groups, every mode and edge case."""

from __future__ import annotations

import math

import pytest
import torch

from r3l_lightning.advantages import group_advantages

S3 = math.sqrt(1 / 3)  # unbiased std of [0, 1, 0, 1]


def adv(rewards, mode, alpha=3.0):
    return group_advantages(rewards, mode=mode, alpha=alpha).tolist()


def test_one_success_in_four():
    # mean .25; unbiased std = sqrt((.75² + 3·.25²)/3) = .5; A = [1.5, -.5, -.5, -.5]
    r = [1.0, 0.0, 0.0, 0.0]
    assert adv(r, "grpo") == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert adv(r, "r3l") == pytest.approx([3.0, -0.5, -0.5, -0.5], abs=1e-5)  # R_max → α
    assert adv(r, "r3l_reference") == pytest.approx([1.0, -0.25, -0.25, -0.25])  # R ≥ 1 → 1; s = R − .25
    assert adv(r, "mean_baseline") == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert adv(r, "none") == [1.0, 0.0, 0.0, 0.0]


def test_partial_rewards_amplify_positive_non_max():
    # [.2, .5, .5, .9]: mean .525; deviations [-.325, -.025, -.025, .375];
    # unbiased var = (.105625 + .000625·2 + .140625)/3 = .0825; std = .287228
    r = [0.2, 0.5, 0.5, 0.9]
    std = math.sqrt(0.0825)
    grpo = [-0.325 / std, -0.025 / std, -0.025 / std, 0.375 / std]
    assert adv(r, "grpo") == pytest.approx(grpo, abs=1e-5)
    assert adv(r, "r3l") == pytest.approx([grpo[0], grpo[1], grpo[2], 3.0], abs=1e-5)
    # reference: s ≥ 0 → α·s; none reaches 1.0
    assert adv(r, "r3l_reference") == pytest.approx([-0.325, -0.025, -0.025, 3 * 0.375], abs=1e-6)
    # a positive A below R_max is multiplied by α: [.2, .6, .7, .9] mean .6, A(.7) > 0
    r2 = [0.2, 0.6, 0.7, 0.9]
    std2 = torch.tensor(r2).std().item()
    assert adv(r2, "r3l")[2] == pytest.approx(3 * 0.1 / std2, abs=1e-4)


def test_ties_at_the_max_all_get_alpha():
    assert adv([0, 1, 0, 1], "r3l") == pytest.approx([-0.5 / S3, 3.0, -0.5 / S3, 3.0], abs=1e-5)
    assert adv([0, 1, 0, 1], "r3l", alpha=2.0)[1] == 2.0


@pytest.mark.parametrize("mode", ["r3l", "r3l_reference", "grpo", "mean_baseline"])
def test_no_contrast_means_no_signal(mode):
    assert adv([1.0, 1.0, 1.0], mode) == [0.0, 0.0, 0.0]  # σ = 0, even for successes
    assert adv([0.0, 0.0], mode) == [0.0, 0.0]
    assert adv([0.7], mode) == [0.0]  # singleton: unbiased std undefined
    assert adv([], mode) == []


def test_none_mode_is_never_zeroed():
    assert adv([1.0, 1.0], "none") == [1.0, 1.0]
    assert adv([0.5], "none") == [0.5]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="reward 1"):
        group_advantages([0.0, float("nan")])
    with pytest.raises(ValueError, match="valid modes"):
        group_advantages([0.0, 1.0], mode="ppo")
