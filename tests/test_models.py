"""Model loading helpers: full-weight streaming (what the HF inference copy, vLLM sync and export use)."""

from __future__ import annotations

from r3l_lightning.models import TINY_RANDOM, full_state_dict, is_sharded, load_policy, named_full_weights, unwrap


def test_named_full_weights_streams_each_weight_once_without_copies():
    policy = load_policy(TINY_RANDOM)
    names = [n for n, _ in named_full_weights(policy)]
    assert "lm_head.weight" not in names  # tied to model.embed_tokens.weight: sent once
    assert len(names) == len(set(names)) == len({id(p) for p in policy.parameters()})
    params = dict(policy.named_parameters())
    for name, tensor in named_full_weights(policy):
        assert tensor.data_ptr() == params[name].data_ptr()  # unsharded: no copy


def test_an_unsharded_policy_is_its_own_full_state():
    policy = load_policy(TINY_RANDOM)
    assert not is_sharded(policy) and unwrap(policy) is policy
    state = full_state_dict(policy)
    reference = policy.state_dict()
    assert set(state) == set(reference) - {"lm_head.weight"}
    assert all(state[k].equal(reference[k]) for k in state)
