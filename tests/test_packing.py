"""Padding-free packing (``benchmarks/packing.py``): packed rows of several sequences give every sequence the
logprobs it has alone, so no attention crosses sequences."""

from __future__ import annotations

import pytest
import torch

from r3l_lightning.data import collate
from r3l_lightning.trajectory import TrainingSample
from test_cli import ROOT


@pytest.fixture()
def packing(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import packing

    return packing


def sample(ids: list[int], mask: list[float], advantage: float) -> TrainingSample:
    return TrainingSample(ids, mask, advantage, "base", num_assistant_tokens=sum(mask))


def test_pack_rows_first_fit_decreasing_and_packed_fields(packing):
    samples = [sample([1, 2, 3, 4, 5], [1, 1, 0, 1, 1], 2.0), sample(list(range(10, 19)), [0] * 4 + [1] * 5, -1.0),
               sample([7, 8, 9], [0, 1, 1], 0.5), sample(list(range(30, 42)), [0] * 6 + [1] * 6, 1.0)]
    # lengths 5, 9, 3, 12 into rows of 14: 12 opens row 0, 9 opens row 1, 5 fills row 1, 3 opens row 2
    assert packing.pack_rows(samples, 14) == [[3], [1, 0], [2]]
    mb = packing.collate_packed(samples, [[1, 0], [2]])
    assert mb["input_ids"].shape == (2, 14)
    assert mb["input_ids"][0].tolist() == list(range(10, 19)) + [1, 2, 3, 4, 5]
    assert mb["position_ids"].tolist() == [list(range(9)) + list(range(5)), [0, 1, 2] + list(range(11))]
    assert mb["sample_index"].tolist() == [[1] * 9 + [0] * 5, [2] * 3 + [-1] * 11]
    # each sample's first token is never trained: it has no prediction inside its own sequence
    assert mb["loss_mask"][0].tolist() == [0] * 4 + [1] * 5 + [0, 1, 0, 1, 1]
    assert mb["token_advantages"][0].tolist() == [0] * 4 + [-1] * 5 + [0, 2, 0, 2, 2]
    assert mb["token_advantages"][1].tolist() == [0, 0.5, 0.5] + [0] * 11


def test_packed_logprobs_equal_each_sequence_alone(packing, tiny_policy):
    torch.manual_seed(0)
    lengths = [7, 19, 4, 12, 30]
    samples = [sample(torch.randint(0, 1000, (n,)).tolist(), [1.0] * n, 1.0) for n in lengths]
    micro = packing.packed_micro_batches(samples, row_tokens=40, micro_batch_tokens=80)
    # rows of ≤ 40 tokens (30+7, 19+12+4), two rows per micro-batch: one micro-batch, several sequences per row
    assert [mb["input_ids"].shape for mb in micro] == [(2, 37)]
    assert (micro[0]["sample_index"] == -1).sum() == 2  # the shorter row's padding tail, a segment of its own
    with torch.no_grad():
        packed = packing.per_sample_logprobs(micro, [packing.token_logprobs(tiny_policy, mb) for mb in micro], 5)
        alone = [packing.token_logprobs(tiny_policy, collate([s]))[0, 1:] for s in samples]
        leaky = micro[0] | {"position_ids": torch.arange(37).expand(2, 37)}  # one causal sequence per row
        leaky_logprobs = packing.per_sample_logprobs(micro, [packing.token_logprobs(tiny_policy, leaky)], 5)
    for i, n in enumerate(lengths):
        assert len(packed[i]) == n - 1
        torch.testing.assert_close(torch.tensor(packed[i]), alone[i], atol=1e-5, rtol=0)
    # the check can fail: attending across the row changes every sequence after a row's first one
    row_starts = set(micro[0]["sample_index"][:, 0].tolist())
    later_in_row = [i for i in range(5) if i not in row_starts]
    assert later_in_row == [0, 2, 3]
    for i in later_in_row:
        assert (torch.tensor(leaky_logprobs[i]) - alone[i]).abs().max() > 1e-2
