"""Group advantages against hand-computed values, for every mode and edge case.

Most cases pass ``eps=0`` so the expected values are exact; ``test_eps_is_added_to_the_std`` covers eps.
"""

from __future__ import annotations

import pytest
import torch

from r3l_lightning.advantages import MODES, advantage_stats, group_advantages


def check(rewards, mode, expected, alpha=3.0, eps=0.0):
    got = group_advantages(rewards, mode=mode, alpha=alpha, eps=eps)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_one_success_in_four():
    # R̄ = .25; σ = sqrt((.75² + 3·.25²)/3) = sqrt(.25) = .5; A = [1.5, -.5, -.5, -.5]
    r = [1.0, 0.0, 0.0, 0.0]
    check(r, "grpo", [1.5, -0.5, -0.5, -0.5])
    check(r, "r3l", [3.0, -0.5, -0.5, -0.5])  # R = R_max → α; negatives unchanged
    check(r, "r3l_reference", [1.0, -0.25, -0.25, -0.25])  # R ≥ 1 → 1; s = R − .25 < 0 → s
    check(r, "mean_baseline", [0.75, -0.25, -0.25, -0.25])
    check(r, "none", [1.0, 0.0, 0.0, 0.0])


def test_positive_below_the_max_is_amplified():
    # [0, .2, .2, .6, 1]: R̄ = .4; deviations [-.4, -.2, -.2, .2, .6];
    # σ² = (.16 + .04 + .04 + .04 + .36)/4 = .16 → σ = .4; A = [-1, -.5, -.5, .5, 1.5]
    r = [0.0, 0.2, 0.2, 0.6, 1.0]
    check(r, "grpo", [-1.0, -0.5, -0.5, 0.5, 1.5])
    check(r, "r3l", [-1.0, -0.5, -0.5, 1.5, 3.0])  # A = .5 > 0 → 3·.5; R_max → α
    check(r, "r3l", [-1.0, -0.5, -0.5, 1.0, 2.0], alpha=2.0)
    check(r, "r3l_reference", [-0.4, -0.2, -0.2, 0.6, 1.0])  # s = .2 ≥ 0 → 3·.2; R = 1 → 1
    check(r, "mean_baseline", [-0.4, -0.2, -0.2, 0.2, 0.6])
    check(r, "none", r)


def test_partial_rewards_without_a_success():
    # [.2, .5, .5, .9]: R̄ = .525; deviations [-.325, -.025, -.025, .375];
    # σ² = (.105625 + 2·.000625 + .140625)/3 = .0825 → σ = .28722813232690;
    # A = [-1.13150476371204, -.08703882797785, -.08703882797785, 1.30558241966773]
    r = [0.2, 0.5, 0.5, 0.9]
    check(r, "grpo", [-1.1315047637, -0.0870388280, -0.0870388280, 1.3055824197])
    check(r, "r3l", [-1.1315047637, -0.0870388280, -0.0870388280, 3.0])
    check(r, "r3l_reference", [-0.325, -0.025, -0.025, 1.125])  # no R ≥ 1: max gets 3·.375
    check(r, "mean_baseline", [-0.325, -0.025, -0.025, 0.375])


def test_reference_caps_successes_at_one_but_amplifies_the_rest():
    # [.4, .4, .8, 1]: R̄ = .65; s = [-.25, -.25, .15, .35]; σ = .3 → A = [-5/6, -5/6, .5, 7/6]
    r = [0.4, 0.4, 0.8, 1.0]
    check(r, "r3l_reference", [-0.25, -0.25, 0.45, 1.0])
    check(r, "r3l", [-0.8333333333, -0.8333333333, 1.5, 3.0])


def test_ties_at_the_max_all_get_alpha():
    # [0, 1, 0, 1]: R̄ = .5; σ = sqrt(4·.25/3) = .57735026918963; A = ±.86602540378444
    check([0, 1, 0, 1], "grpo", [-0.8660254038, 0.8660254038, -0.8660254038, 0.8660254038])
    check([0, 1, 0, 1], "r3l", [-0.8660254038, 3.0, -0.8660254038, 3.0])
    check([0, 1, 0, 1], "r3l", [-0.8660254038, 2.0, -0.8660254038, 2.0], alpha=2.0)
    check([0, 1, 0, 1], "r3l_reference", [-0.5, 1.0, -0.5, 1.0])
    # ties below the max are not special: [0, 0, 1] → R̄ = 1/3, σ = sqrt(1/3), A = [-.57735, -.57735, 1.1547]
    check([0, 0, 1], "r3l", [-0.5773502692, -0.5773502692, 3.0])


def test_eps_is_added_to_the_std():
    # default eps = 1e-6: A = [.75, -.25, -.25, -.25]/.500001
    got = group_advantages([1.0, 0.0, 0.0, 0.0], mode="grpo")
    torch.testing.assert_close(got, torch.tensor([1.499997000006, -0.499999000002, -0.499999000002, -0.499999000002]))
    got = group_advantages([1.0, 0.0, 0.0, 0.0])  # r3l: R_max → α exactly, negatives normalised with eps
    torch.testing.assert_close(got, torch.tensor([3.0, -0.499999000002, -0.499999000002, -0.499999000002]))


def test_a_large_eps_is_added_to_the_std_not_subtracted():
    # [0, 1], eps = .5: σ = sqrt(.5) = .70711, A = ±.5/1.20711 = ±.41421 (eps subtracted: ±2.4142)
    check([0.0, 1.0], "grpo", [-0.4142135624, 0.4142135624], eps=0.5)
    check([0.0, 1.0], "r3l", [-0.4142135624, 3.0], eps=0.5)


@pytest.mark.parametrize("mode", ["r3l", "grpo"])
def test_a_group_of_two_different_rewards_has_contrast(mode):
    # [1, 0]: R̄ = .5, σ = sqrt(.5), A = ±.70711 (the smallest group with a signal)
    check([1.0, 0.0], mode, [3.0 if mode == "r3l" else 0.7071067812, -0.7071067812])


@pytest.mark.parametrize("mode", ["r3l", "grpo", "mean_baseline"])
@pytest.mark.parametrize("singleton", ["no_signal", "zero_baseline"])
def test_no_contrast_means_no_signal(mode, singleton):
    for rewards in ([1.0, 1.0, 1.0], [0.3, 0.3], [0.0] * 4, []):  # σ = 0, even for successes
        got = group_advantages(rewards, mode=mode, singleton=singleton)
        torch.testing.assert_close(got, torch.zeros(len(rewards)))


@pytest.mark.parametrize("mode", ["r3l", "grpo", "mean_baseline"])
def test_a_group_of_one_carries_no_signal_by_default(mode):
    check([1.0], mode, [0.0], eps=1e-6)  # unbiased std undefined: no contrast
    check([0.7], mode, [0.0], eps=1e-6)


def test_a_group_of_one_as_the_reference_code_grpo_and_opmd():
    # Trinity's GRPOGroupAdvantage / OPMDGroupAdvantage: len(exps) == 1 → mean 0, std 1, so
    # grpo: (R − 0)/(1 + 1e-6): .7/1.000001 = .6999993, 1/1.000001 = .999999; mean_baseline: R − 0 = R
    for rewards, grpo in (([0.7], [0.6999993]), ([1.0], [0.999999]), ([0.0], [0.0])):
        torch.testing.assert_close(group_advantages(rewards, "grpo", singleton="zero_baseline"), torch.tensor(grpo))
        torch.testing.assert_close(group_advantages(rewards, "mean_baseline", singleton="zero_baseline"),
                                   torch.tensor(rewards))
    # the eps of grpo's std of 1 is the caller's: (R − 0)/(1 + eps), eps = 1 → R/2; mean_baseline: R, never divided
    for mode, expected in (("grpo", [1.0]), ("mean_baseline", [2.0])):
        torch.testing.assert_close(group_advantages([2.0], mode, eps=1.0, singleton="zero_baseline"),
                                   torch.tensor(expected))
    # the paper's r3l keeps "no contrast → 0" whatever the singleton rule
    torch.testing.assert_close(group_advantages([1.0], "r3l", singleton="zero_baseline"), torch.tensor([0.0]))


def test_reference_variant_on_equal_and_single_sample_groups_as_the_reference_code():
    # OPMDReweightAdvGroupAdvantage: b = mean (n > 1) or 0 (n = 1); s = R − b; R ≥ 1 → 1; s ≥ 0 → 3s; else s
    check([1.0, 1.0, 1.0], "r3l_reference", [1.0, 1.0, 1.0])  # all succeed: 1.0 each, not 0
    check([0.3, 0.3], "r3l_reference", [0.0, 0.0])  # s = 0 ≥ 0 → 3·0 = 0
    check([0.0, 0.0], "r3l_reference", [0.0, 0.0])
    check([1.0], "r3l_reference", [1.0])  # baseline 0, R ≥ 1 → 1
    check([0.6], "r3l_reference", [1.8])  # s = .6 − 0 ≥ 0 → 3·.6
    check([0.6], "r3l_reference", [1.2], alpha=2.0)  # 2·.6
    check([0.0], "r3l_reference", [0.0])  # s = 0 → 0
    check([-0.5], "r3l_reference", [-0.5])  # a penalised reward: s < 0 stays
    check([], "r3l_reference", [])
    # the singleton rule does not change the reference variant (it has its own)
    torch.testing.assert_close(group_advantages([0.6], "r3l_reference", singleton="no_signal"), torch.tensor([1.8]))


def test_none_mode_is_never_zeroed():
    check([1.0, 1.0], "none", [1.0, 1.0])
    check([0.5], "none", [0.5])
    check([], "none", [])


@pytest.mark.parametrize("mode", MODES)
def test_output_is_float32_of_the_same_length(mode):
    got = group_advantages(torch.tensor([1, 0, 0], dtype=torch.int64), mode=mode)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), mode=mode).dtype == torch.float32


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="reward 1 "):
        group_advantages([0.0, float("nan")])
    with pytest.raises(ValueError, match="reward 2 "):
        group_advantages([0.0, 1.0, float("inf")], mode="none")
    with pytest.raises(ValueError, match="valid modes: r3l, r3l_reference, grpo, mean_baseline, none"):
        group_advantages([0.0, 1.0], mode="ppo")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages([[0.0, 1.0]])
    with pytest.raises(ValueError, match="valid rules: no_signal, zero_baseline"):
        group_advantages([0.0, 1.0], singleton="zero")


def test_advantage_stats():
    # mean of [3, -.5, -.5, -.5] = 1.5/4 = .375
    assert advantage_stats(torch.tensor([3.0, -0.5, -0.5, -0.5])) == {"mean": 0.375, "max": 3.0, "min": -0.5}
    assert advantage_stats(torch.tensor([])) == {"mean": 0.0, "max": 0.0, "min": 0.0}
