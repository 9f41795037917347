"""``R3LModule``: the policy, its rollout engine, and the combined RL + SFT loss."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from r3l_lightning.callbacks.preemption import preemption_requested
from r3l_lightning.engines.base import RolloutEngine
from r3l_lightning.engines import default_engine
from r3l_lightning.lora import LoRAConfig, adapters_disabled, add_lora, is_adapter_name
from r3l_lightning.losses import (
    LossConfig,
    head_token_logprobs,
    loss_denominator,
    micro_batch_denominator,
    policy_loss,
    sft_loss,
    token_logprobs,
)
from r3l_lightning.mismatch import MismatchTotals, RolloutCorrection, correction_weights, rollout_corrected
from r3l_lightning.models import (
    decoder_layers,
    eos_token_ids,
    is_sharded,
    load_policy,
    load_tokenizer,
    output_projection,
)
from r3l_lightning.precision import resolve_model_dtype
from r3l_lightning.trajectory import ChatTokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fused_adamw_applies(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel takes these parameters: plain (not FSDP2-sharded) floating tensors on CPU or
    CUDA. It updates all of them in one pass instead of a chain of foreach ops: 134M fp32 weights step in 0.19 s
    instead of 0.58 s on 2 cores (benchmarks/README.md)."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                and not isinstance(p, DTensor) for p in params)


class R3LModule(L.LightningModule):
    """Owns the HF causal-LM policy and trains it on exploration data.

    Loss (paper §4.3, Eq. 12): ``L = L_RL + sft_coef · L_SFT``, set by ``model.loss``
    (:class:`~r3l_lightning.losses.LossConfig`). ``L_RL`` is masked REINFORCE with the explorer's advantages
    (no importance ratio, no clipping, no KL, no reference model) unless a baseline asks for them:
    ``loss.clip_low``/``loss.clip_high`` turn on the clipped importance ratio against the old policy
    (``loss.ratio_level`` token or sequence; ``loss.old_logprobs``), ``loss.kl_coef > 0`` loads a frozen
    reference model for the KL term (``loss.kl_estimator`` k3 or k2), ``loss.shaping_gamma`` trains refinement
    samples with Critique-GRPO's policy shaping, ``loss.opmd_tau`` divides the policy term by 1 + τ (OPMD).

    Optimisation is manual: one dataloader item is one optimizer step made of micro-batches whose
    token counts differ, so the loss of each micro-batch is divided by the STEP's denominator
    (sequences or tokens, summed over micro-batches and ranks), not by the number of micro-batches.

    Args:
        model_name_or_path: HF hub id, local checkpoint directory, or an embedded model name.
        engine: the rollout engine; ``None`` picks :func:`~r3l_lightning.engines.default_engine`
            (vLLM on CUDA machines with vLLM installed, ``HFEngine`` on the policy itself otherwise).
        loss: ``{aggregation, sft_coef, clip_low, clip_high, ratio_level, old_logprobs, kl_coef, kl_estimator,
            shaping_gamma, opmd_tau, logit_temperature}``: the loss and its baselines' terms, each value and
            combination checked when the :class:`~r3l_lightning.losses.LossConfig` is made (see it for each field).
        lr, weight_decay, betas, warmup_steps: AdamW with linear warmup, then constant (weight decay 0.01:
            AdamW's usual default and the reference code's; the paper does not state it).
        max_grad_norm: gradient-norm clipping (``None`` disables).
        model_dtype: parameter dtype; ``auto`` (:func:`~r3l_lightning.precision.resolve_model_dtype`): ``float32``,
            the master weights of ``precision: bf16-mixed`` (``r3l fit`` gives ``bfloat16`` under ``bf16-true``).
        gradient_checkpointing: trade compute for activation memory.
        logprob_chunk_size: token rows per chunk of the vocabulary projection and log-softmax (see
            :func:`~r3l_lightning.losses.head_token_logprobs`).
        rollout_correction: ``{mode: none | tis | mis, cap}``: truncated (tis) or masked (mis)
            importance weights π_train/π_rollout on the base samples' tokens (``none``: the paper, no
            correction); see :mod:`r3l_lightning.mismatch`. The rollout-vs-trainer mismatch itself is
            logged every step under ``mismatch/<kind>/`` whatever the mode.
        lora: ``{r, alpha, dropout, target_modules}``: train LoRA adapters only (PEFT; see
            :mod:`r3l_lightning.lora`); the checkpoint then holds the adapters, and the KL reference
            (``loss.kl_coef > 0``) is the same model with its adapters off instead of a second copy.
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m-instruct",
        engine: RolloutEngine | None = None,
        loss: LossConfig = LossConfig(),
        lr: float = 1e-6,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        model_dtype: Literal["auto", "float32", "bfloat16"] = "float32",
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 2048,
        rollout_correction: RolloutCorrection = RolloutCorrection(),
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        if rollout_correction.mode == "tis" and loss.old_logprobs == "rollout" and loss.uses_ratio:
            raise ValueError(
                "model.rollout_correction.mode=tis with model.loss.clip_low/clip_high and "
                "model.loss.old_logprobs=rollout: the clipped ratio is already taken against the rollout logprobs, "
                "so tis would weight by π_train/π_rollout twice; use mode mis or none, or model.loss.old_logprobs trainer"
            )
        self.save_hyperparameters(ignore=["engine"])
        # kept as given: under LightningCLI ``hparams`` holds these as plain dicts
        self.loss_config = loss
        self.rollout_correction = rollout_correction
        self.lora_config = lora
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model_name_or_path)
        dtype = _DTYPES[resolve_model_dtype(model_dtype)]
        self.policy = load_policy(model_name_or_path, dtype)
        if lora is not None:
            self.policy = add_lora(self.policy, lora)
            self.strict_loading = False  # checkpoints hold the adapters only; the base comes from the model path
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            if lora is not None:  # frozen embeddings: checkpointed blocks need an input that requires grad
                self.policy.enable_input_require_grads()
        self.policy.config.use_cache = False
        self.policy.train()
        self.reference = None
        if loss.kl_coef > 0 and lora is None:
            self.reference = load_policy(model_name_or_path, dtype).eval().requires_grad_(False)
        self.chat = ChatTokenizer(self.tokenizer, eos_token_ids(self.policy, self.tokenizer))
        self.skipped_steps = 0
        self.no_signal_steps_in_epoch = 0  # this rank's steps of the current epoch whose every sample weighs 0
        self.rollout_engine = engine if engine is not None else default_engine()
        self.rollout_engine.bind(self.policy, self.tokenizer, self.chat.eos_token_ids)

    # ----- sharding ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Shard the policy (and the reference model) one decoder layer at a time.

        - ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` every decoder layer, then the root.
        - ``FSDPStrategy`` (FSDP1): wrap the policy with an auto-wrap policy on its decoder-layer class
          unless the strategy sets ``auto_wrap_policy``; Lightning then leaves the LightningModule
          unwrapped, and mixed precision, sharding strategy and activation checkpointing come from
          the strategy's arguments (``precision: bf16-mixed``, ``activation_checkpointing_policy``).
        """
        if is_sharded(self.policy):
            return
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            self._wrap_fsdp1(self.trainer.strategy)
            return
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ValueError("tensor parallelism is not supported: set tensor_parallel_size=1")
        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
        for layer in decoder_layers(self.policy):
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(self.policy, mesh=dp_mesh)
        if self.reference is not None:
            fully_shard(self.reference, mesh=dp_mesh)

    def _wrap_fsdp1(self, strategy) -> None:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy, wrap

        overrides = {"device_id": strategy.root_device}  # a torch.device: also valid on CPU (tests)
        if strategy.kwargs.get("auto_wrap_policy") is None:
            overrides["auto_wrap_policy"] = ModuleWrapPolicy({type(layer) for layer in decoder_layers(self.policy)})
        self.policy = wrap(self.policy, **overrides)  # inside Lightning's enable_wrap context
        if self.reference is not None:
            self.reference = wrap(self.reference, **overrides)
        self.rollout_engine.bind(self.policy, self.tokenizer, self.chat.eos_token_ids)

    # ----- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """RNG states, so that a resumed run samples what the uninterrupted run would have; with LoRA,
        only the adapter weights (the frozen base is reloaded from ``model_name_or_path``)."""
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.lora_config is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_name(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lora_config is not None and not any(is_adapter_name(k) for k in checkpoint.get("state_dict", {})):
            raise ValueError("this checkpoint has no LoRA adapter weights (it was written without model.lora): "
                             "resume it without model.lora, or start a new run")
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])

    # ----- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas),
                                      fused=fused_adamw_applies(params) and self._grad_scaler() is None)
        warmup = max(hp.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _global_denominators(self, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Step-level RL and SFT denominators, summed over micro-batches and ranks, per rank.

        DDP/FSDP average gradients over ranks, so each rank divides by (global sum / world size).
        """
        agg = self.loss_config.aggregation
        local = torch.zeros(2, device=self.device)
        for mb in batch:
            rl_mask, sft_mask = _split_masks(mb)
            local[0] += loss_denominator(rl_mask, agg)
            local[1] += sft_mask.sum()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        local = local / world
        return local[0].clamp(min=1.0), local[1].clamp(min=1.0)

    def micro_batch_loss(self, mb: dict, rl_denom: torch.Tensor, sft_denom: torch.Tensor,
                         mismatch: MismatchTotals | None = None) -> tuple[torch.Tensor, dict]:
        """Loss contribution of one micro-batch to the step loss, and its metrics; adds the micro-batch's
        rollout-vs-trainer mismatch to ``mismatch`` when given."""
        config = self.loss_config
        logprobs, entropy = self._token_logprobs(self.policy, mb, with_entropy=True)
        rl_mask, sft_mask = _split_masks(mb)
        if mismatch is not None:
            mismatch.add(logprobs, mb["old_logprobs"], mb["loss_mask"], mb["kind"], mb["has_old_logprobs"])
        ref_logprobs = self._reference_logprobs(mb) if config.kl_coef > 0 else None
        rl_rows = rl_mask.sum(1) > 0  # zero-weight padding rows need no rollout logprobs
        old_logprobs = mb.get("policy_old_logprobs")
        if config.uses_ratio and old_logprobs is None and config.old_logprobs == "trainer":
            old_logprobs = logprobs.detach()  # the epoch's first step: the old policy is the current one
        elif config.uses_ratio and old_logprobs is None:
            if not bool(mb["has_old_logprobs"][rl_rows].all()):
                raise ValueError(
                    "model.loss.clip_low/clip_high with model.loss.old_logprobs=rollout need rollout logprobs but some "
                    "RL samples have none: use an engine that returns logprobs, or model.loss.old_logprobs trainer"
                )
            old_logprobs = mb["old_logprobs"]
        base_rows = rollout_corrected(mb["kind"]) & rl_rows
        correction = self.rollout_correction
        if correction.mode != "none" and not bool(mb["has_old_logprobs"][base_rows].all()):
            raise ValueError(
                f"model.rollout_correction.mode={correction.mode} needs rollout logprobs but some base samples have "
                "none: use an engine that returns logprobs or set mode none"
            )
        corrected = base_rows & mb["has_old_logprobs"]
        weighted = correction_weights(logprobs, mb["old_logprobs"], corrected, correction)
        rl = policy_loss(
            logprobs,
            rl_mask,
            mb["advantages"],
            config,
            old_logprobs=old_logprobs if config.uses_ratio else None,
            ref_logprobs=ref_logprobs,
            shaped=mb["shaped"],
            token_weights=None if weighted is None else weighted[0],
        )
        sft = sft_loss(logprobs, sft_mask)
        rl_denom = micro_batch_denominator(rl_mask, config.aggregation, rl_denom)
        loss = rl.numerator / rl_denom + config.sft_coef * sft.numerator / sft_denom
        trainable = rl_mask + sft_mask
        metrics = {
            "rl_loss": (rl.numerator / rl_denom).detach(),
            "sft_loss": (sft.numerator / sft_denom).detach(),
            "entropy_sum": (entropy * trainable).sum(),
            "trainable_tokens": trainable.sum(),
            "tokens": mb["attention_mask"].sum().float(),
            **{k: v.detach() for k, v in rl.metrics.items()},
        }
        if weighted is not None:
            tokens = (rl_mask != 0) & corrected[:, None]
            metrics.update(correction_tokens=tokens.sum(), correction_weight_sum=(weighted[0] * tokens).sum(),
                           correction_capped=(weighted[1] & tokens).sum())
        return loss, metrics

    @torch.no_grad()
    def on_train_epoch_start(self) -> None:
        """``old_logprobs: trainer``: the old policy's token logprobs (``policy_old_logprobs``) of every micro-batch
        the epoch will train on after its first update, by the policy before that update. The first step's
        micro-batches need no extra forward: their old logprobs are the training forward's, detached.

        Runs after the exploration callback (Lightning calls callbacks' hooks first) on this rank's planned
        steps, which hold the same number of micro-batches on every rank, so sharded forwards stay matched.
        Also resets the epoch's count of steps without signal (``no_signal_steps_in_epoch``).
        """
        self.no_signal_steps_in_epoch = 0
        if self.loss_config.old_logprobs != "trainer" or not self.loss_config.uses_ratio:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "planned_steps"):
            raise ValueError("model.loss.old_logprobs=trainer reads the epoch's planned steps from the "
                             "ExperienceDataModule; train with it, or set model.loss.old_logprobs rollout")
        for step in datamodule.planned_steps()[1:]:
            for mb in step:
                inputs = self.trainer.strategy.batch_to_device(
                    {k: mb[k] for k in ("input_ids", "attention_mask", "loss_mask")}, self.device)
                with self.trainer.precision_plugin.train_step_context():  # as the training forward
                    logprobs = self._token_logprobs(self.policy, inputs)[0]
                mb["policy_old_logprobs"] = logprobs.float().to(mb["old_logprobs"].device)

    @torch.no_grad()
    def _reference_logprobs(self, mb: dict) -> torch.Tensor:
        """Token logprobs of the frozen reference: the reference model, or the LoRA policy with adapters off."""
        if self.reference is not None:
            return self._token_logprobs(self.reference, mb)[0]
        with adapters_disabled(self.policy):
            return self._token_logprobs(self.policy, mb)[0]

    def _token_logprobs(self, model: torch.nn.Module, mb: dict,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``model``'s logprobs (and entropies) of ``mb``'s tokens, exact where ``mb["loss_mask"]`` trains a token.

        When the logits are a plain projection of the last hidden states (:func:`~r3l_lightning.models.output_projection`:
        unsharded HF causal LMs), only the trained positions are projected onto the vocabulary, chunk by chunk, and
        the other positions are 0; otherwise (FSDP) the full logits are computed and every position is exact.
        """
        chunk = self.hparams.logprob_chunk_size
        temperature = self.loss_config.logit_temperature
        projection = output_projection(model)
        if projection is None:
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            return token_logprobs(logits, mb["input_ids"], temperature, chunk_size=chunk, with_entropy=with_entropy)
        decoder, weight = projection
        hidden = decoder(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).last_hidden_state
        return head_token_logprobs(hidden, weight, mb["input_ids"], mb["loss_mask"] != 0, temperature, chunk_size=chunk,
                                   with_entropy=with_entropy)

    def training_step(self, dataloader_iter: Iterator) -> torch.Tensor:
        """One optimizer step over the next item (a list of micro-batches) of the experience loader.

        The ``dataloader_iter`` form stops Lightning from prefetching a batch before
        ``on_train_epoch_start`` (where exploration fills the buffer); StopIteration ends the epoch.
        """
        batch, _, _ = next(dataloader_iter)
        batch = self.trainer.strategy.batch_to_device(batch, self.device)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        rl_denom, sft_denom = self._global_denominators(batch)
        totals: dict[str, torch.Tensor] = {}
        mismatch = MismatchTotals(self.device)
        loss_total = torch.zeros((), device=self.device)
        for mb in batch:
            self._stop_if_preempted(optimizer)
            loss, metrics = self.micro_batch_loss(mb, rl_denom, sft_denom, mismatch)
            self.manual_backward(loss)
            loss_total += loss.detach()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v
        if self._any_rank_nonfinite(loss_total):
            # every rank skips together: the flag is all-reduced, so collectives stay matched
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            for logger in self.trainer.loggers:
                logger.log_metrics({"train/skipped_nonfinite_steps": float(self.skipped_steps)}, step=self.global_step)
            self._step_trained()
            return loss_total
        grad_norm = self._clip_gradients(optimizer, self.hparams.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._step_trained()
        self.rollout_engine.on_policy_update(self.global_step)
        self._log_step(batch, loss_total, totals, mismatch, grad_norm)
        return loss_total

    def _stop_if_preempted(self, optimizer) -> None:
        """Before a micro-batch: on a preemption signal (on any rank: every rank stops at the same micro-batch),
        drop the step's gradients and stop; the step stays untrained in the DataModule, so the checkpoint written
        now trains it on resume."""
        flag = torch.tensor([float(preemption_requested(self.trainer))], device=self.device)
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        if flag.item() > 0:
            optimizer.zero_grad(set_to_none=True)
            raise SIGTERMException()

    def _step_trained(self) -> None:
        step_trained = getattr(self.trainer.datamodule, "step_trained", None)  # ExperienceDataModule's bookkeeping
        if step_trained is not None:
            step_trained()

    def _clip_gradients(self, optimizer, max_norm: float | None) -> torch.Tensor:
        """The global gradient norm before clipping (``train/grad_norm``), then clipping to ``max_norm`` (None: no
        clipping). FSDP1 needs its root's ``clip_grad_norm_`` (Lightning refuses it)."""
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        if isinstance(self.policy, FullyShardedDataParallel):
            return self.policy.clip_grad_norm_(float("inf") if max_norm is None else max_norm)
        with_grads = [p for p in self.policy.parameters() if p.grad is not None]
        grads = [p.grad for p in with_grads]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        sharded = isinstance(norm, DTensor)
        if sharded:  # FSDP2: the norm of this rank's shards, reduced to the global one
            norm = norm.full_tensor()
        if max_norm is not None:
            if sharded or self._grad_scaler() is not None:  # Lightning unscales fp16 gradients first
                self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            else:  # with the norm above (Lightning refuses to clip for a fused optimizer)
                torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm)
        return norm

    def _grad_scaler(self):
        """The precision plugin's fp16 gradient scaler (``16-mixed``), else None."""
        return getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)

    def _any_rank_nonfinite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        return bool(flag.item() > 0)

    def _log_step(self, batch: list[dict], loss: torch.Tensor, totals: dict[str, torch.Tensor],
                  mismatch: MismatchTotals, grad_norm: torch.Tensor) -> None:
        rl_rows = torch.cat([~mb["is_sft"] & (mb["loss_mask"].sum(1) > 0) for mb in batch])
        advantages = torch.cat([mb["advantages"] for mb in batch])[rl_rows]
        sft_trainable = sum(_split_masks(mb)[1].sum() for mb in batch)
        # a step without signal: its loss is exactly 0 because every RL advantage is 0, no SFT token is trained and
        # no KL term pulls (every sample's weight is 0); it is counted as such, not shown as training
        no_signal = not bool((advantages != 0).any()) and not bool(sft_trainable > 0) and self.loss_config.kl_coef == 0
        self.no_signal_steps_in_epoch += int(no_signal)
        assistant = sum(mb["assistant_tokens"][~mb["is_sft"]].sum() for mb in batch)
        rl_trainable = sum(_split_masks(mb)[0].sum() for mb in batch)
        n_rows = sum(mb["input_ids"].shape[0] for mb in batch)
        logs = {
            "train/loss": loss,
            "train/rl_loss": totals["rl_loss"],
            "train/sft_loss": totals["sft_loss"],
            "train/entropy": totals["entropy_sum"] / totals["trainable_tokens"].clamp(min=1),
            "train/tokens": totals["tokens"],
            "train/trainable_tokens": totals["trainable_tokens"],
            "train/masked_fraction": 1.0 - rl_trainable / max(float(assistant), 1.0),
            "train/lr": torch.tensor(self.lr_schedulers().get_last_lr()[0]),
            "train/grad_norm": grad_norm,
            "train/no_signal_step": float(no_signal),
        }
        if advantages.numel():
            logs.update({
                "train/advantage_mean": advantages.mean(),
                "train/advantage_max": advantages.max(),
                "train/advantage_min": advantages.min(),
            })
        for key in ("clip_fraction", "kl", "ratio_mean"):
            if key in totals:
                logs[f"train/{key}"] = totals[key] / len(batch)
        if "correction_tokens" in totals:
            count = totals["correction_tokens"].clamp(min=1)
            logs["train/correction_weight_mean"] = totals["correction_weight_sum"] / count
            logs["train/correction_capped_fraction"] = totals["correction_capped"] / count
        mismatch.all_reduce()  # every rank logs here: the collective is matched (mismatch/* are global)
        # Logged straight to the loggers: with ``dataloader_iter`` Lightning would re-flush the last
        # step's ``self.log`` values when the epoch ends. Values are this rank's (rank 0 writes).
        metrics = {k: float(v) for k, v in logs.items()} | mismatch.metrics()
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=n_rows)

def _split_masks(mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss masks of the RL rows and of the SFT rows (each zero on the other kind's rows)."""
    sft_rows = mb["is_sft"].unsqueeze(1).to(mb["loss_mask"].dtype)
    return mb["loss_mask"] * (1 - sft_rows), mb["loss_mask"] * sft_rows
