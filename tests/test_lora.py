"""LoRA (``model.lora``): only adapters train and are checkpointed, merged weights equal PEFT's merge, the
export holds a merged model and an adapter, a resumed run equals the uninterrupted one, and DDP/FSDP2 runs
match a single process."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from r3l_lightning.cli import cli_main  # noqa: E402
from r3l_lightning.data import collate  # noqa: E402
from r3l_lightning.lora import LoRAConfig, add_lora, adapter_state, is_adapter_name, named_inference_weights  # noqa: E402
from r3l_lightning.losses import LossConfig  # noqa: E402
from r3l_lightning.models import TINY_RANDOM, load_policy  # noqa: E402
from r3l_lightning.module import R3LModule  # noqa: E402
from r3l_lightning.trajectory import TrainingSample  # noqa: E402

from test_cli import ROOT, SMOKE  # noqa: E402
from test_distributed import FSDP1, FSDP2, _fixed_data_run  # noqa: E402

LORA = ROOT / "configs" / "methods" / "lora.yaml"


def _randomised_lora(r: int = 4, alpha: float = 8.0):
    torch.manual_seed(0)
    policy = add_lora(load_policy(TINY_RANDOM), LoRAConfig(r=r, alpha=alpha))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return policy


def test_one_optimizer_step_changes_only_adapter_weights():
    # weight_decay=0: AdamW's decoupled decay would move A (and every adapter weight) without a gradient
    module = R3LModule(TINY_RANDOM, lr=1e-2, weight_decay=0.0, lora=LoRAConfig(r=4, alpha=8.0))
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in module.policy.named_parameters() if is_adapter_name(n)}
    batch = collate([TrainingSample([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], 1.0, "base"),
                     TrainingSample([20, 21, 22], [0, 1, 1], -1.0, "base")])
    loss, _ = module.micro_batch_loss(batch, torch.tensor(2.0), torch.tensor(1.0))
    loss.backward()
    optimizer.step()
    after = module.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_adapter_name(k) for k in changed)
    # B = 0 at the start, so ∂L/∂A = 0 on the first step: B moves, A does not yet
    assert all("lora_B" in k for k in changed)
    assert len(changed) == sum("lora_B" in k for k in before)


def test_merged_weights_equal_peft_merge_and_the_adapter_reloads():
    policy = _randomised_lora()
    merged = dict(named_inference_weights(policy))
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(merged) == set(reference) - {"lm_head.weight"}  # tied to the input embedding: yielded once
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)
    assert set(adapter_state(policy)) == {n for n, _ in policy.named_parameters() if is_adapter_name(n)}


def test_kl_reference_of_a_lora_policy_is_the_base_model_without_a_second_copy():
    module = R3LModule(TINY_RANDOM, loss=LossConfig(kl_coef=0.1), lora=LoRAConfig(r=4, alpha=8.0))
    assert module.reference is None
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    mb = collate([TrainingSample([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], 1.0, "base")])
    ids = mb["input_ids"]
    with torch.no_grad():
        base = torch.log_softmax(load_policy(TINY_RANDOM)(input_ids=ids).logits[0, :-1], -1)
        adapted = torch.log_softmax(module.policy(input_ids=ids).logits[0, :-1], -1)
    expected = base.gather(1, ids[0, 1:, None]).squeeze(1)
    trained = mb["loss_mask"][0, 1:] != 0  # reference logprobs are computed where the loss uses them
    reference = module._reference_logprobs(mb)[0, 1:]
    torch.testing.assert_close(reference[trained], expected[trained], rtol=1e-5, atol=1e-5)
    assert torch.equal(reference[~trained], torch.zeros(int((~trained).sum())))
    assert (adapted.gather(1, ids[0, 1:, None]).squeeze(1) - expected).abs().max() > 1e-3  # adapters on: differs


def test_bad_lora_config_names_the_field():
    with pytest.raises(ValueError, match="model.lora.r=0"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        R3LModule(TINY_RANDOM, lora=LoRAConfig(target_modules=["no_such_proj"]))


def _fit(tmp_path, monkeypatch, *args: str):
    """The smoke config with LoRA; exploration whose advantages alternate ±1 (so the adapters train even
    though the random model never succeeds); no evaluation."""
    monkeypatch.chdir(tmp_path)
    return cli_main(["fit", "--config", str(SMOKE), "--config", str(LORA), "--trainer.logger", "false",
                     "--data.explorer", "scripted.UnevenExplorer", "--data.explorer.init_args.group_size", "2",
                     "--data.explorer.init_args.max_new_tokens", "8", "--trainer.callbacks",
                     "[{class_path: r3l_lightning.callbacks.ExplorationCallback},"
                     " {class_path: r3l_lightning.callbacks.HFExportCallback, init_args: {dirpath: hf}},"
                     " {class_path: lightning.pytorch.callbacks.ModelCheckpoint,"
                     "  init_args: {dirpath: checkpoints, save_last: true, save_top_k: -1}}]", *args])


def test_resume_from_a_lora_checkpoint_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    _fit(straight, monkeypatch)  # two epochs, a checkpoint after each
    (first_epoch,) = (straight / "checkpoints").glob("epoch=0-*.ckpt")
    checkpoint = torch.load(first_epoch, weights_only=False)
    assert checkpoint["state_dict"] and all(is_adapter_name(k) for k in checkpoint["state_dict"])  # adapters only
    adapters = sum(v.numel() for v in checkpoint["state_dict"].values())
    assert sum(t.numel() for s in checkpoint["optimizer_states"][0]["state"].values() for t in s.values()
               if t.dim()) == 2 * adapters  # AdamW's two moments, of the adapters only
    _fit(resumed, monkeypatch, "--ckpt_path", str(first_epoch))  # the second epoch again, from the checkpoint
    for name in ("hf/model.safetensors", "hf/adapter/adapter_model.safetensors"):
        expected, got = load_file(straight / name), load_file(resumed / name)
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{name}: {key}")
    # the export: a merged HF model, and an adapter that PEFT puts back on the base model
    merged = AutoModelForCausalLM.from_pretrained(straight / "hf")
    adapted = PeftModel.from_pretrained(load_policy(TINY_RANDOM), straight / "hf" / "adapter")
    ids = torch.tensor([[1, 9, 42, 7, 300, 12]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.equal(merged(input_ids=ids).logits, load_policy(TINY_RANDOM)(input_ids=ids).logits)


@pytest.mark.parametrize("strategy", [
    # ~1 min each: in the slow suite (they passed here: FSDP2, DDP and FSDP1 with use_orig_params=True
    # match one process)
    pytest.param(FSDP2, id="fsdp2", marks=pytest.mark.slow),
    pytest.param(["--trainer.strategy", "ddp"], id="ddp", marks=pytest.mark.slow),
    pytest.param(FSDP1, id="fsdp1", marks=pytest.mark.slow),
])
def test_lora_under_two_processes_matches_a_single_process_run(tmp_path, strategy):
    (tmp_path / "single").mkdir()
    (tmp_path / "multi").mkdir()
    single = _fixed_data_run(tmp_path / "single", "--config", str(LORA))
    multi = _fixed_data_run(tmp_path / "multi", "--config", str(LORA), "--trainer.devices", "2", *strategy)
    initial = load_policy(TINY_RANDOM).state_dict()
    assert set(single) == set(multi)
    for key in single:
        torch.testing.assert_close(multi[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-6  # the adapters trained
