"""``HFExportCallback``: write the trained policy in HF format (``save_pretrained``) for HF/vLLM; a LoRA
policy is written merged, with its adapter beside it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from r3l_lightning.lora import adapter_state, base_model, has_lora, named_inference_weights, save_adapter


def without_tied_output(model, state: dict) -> dict:
    """Drop the output embedding's copy when it is tied to the input embedding (as HF saves it)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    output = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is output]
    return {k: v for k, v in state.items() if not names or k != f"{names[0]}.weight"}


class HFExportCallback(L.Callback):
    """Saves policy + tokenizer to ``dirpath`` (default ``<log_dir>/hf_model``) when training ends.

    A LoRA policy (``model.lora``) is saved twice: merged (W + (alpha/r)·B A) as a plain HF model in
    ``dirpath``, and as a PEFT adapter in ``dirpath/adapter`` (``PeftModel.from_pretrained(base, ...)``,
    vLLM ``LoRARequest``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        target = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")
        # collectives under FSDP: every rank gathers
        state = {name: tensor.cpu() for name, tensor in named_inference_weights(pl_module.policy)}
        adapter = adapter_state(pl_module.policy) if has_lora(pl_module.policy) else None
        if trainer.is_global_zero:
            policy = base_model(pl_module.policy)
            policy.save_pretrained(target, state_dict=without_tied_output(policy, state))
            pl_module.tokenizer.save_pretrained(target)
            if adapter is not None:
                save_adapter(pl_module.policy, target / "adapter", adapter)
            rank_zero_info(f"policy exported to {target}")
        trainer.strategy.barrier()
        return target

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
