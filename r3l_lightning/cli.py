"""``r3l fit`` / ``r3l evaluate``: LightningCLI with ``fit`` and an evaluation-only ``evaluate`` subcommand
(the ``r3l`` command itself is :mod:`r3l_lightning.command`).

    r3l fit --config configs/countdown/r3l.yaml
    r3l evaluate --config configs/countdown/r3l.yaml --model.model_name_or_path runs/.../hf_model
    r3l fit --config configs/countdown/r3l.yaml --print_config
"""

from __future__ import annotations

import importlib
import os
import re
from argparse import Action
from dataclasses import fields
from pathlib import Path
from typing import Literal

from jsonargparse import DefaultHelpFormatter, Namespace

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from r3l_lightning.callbacks.evaluation import EvalCallback, describe
from r3l_lightning.callbacks.run_report import RunReportCallback
from r3l_lightning.checkpoint_io import AtomicCheckpointIO
from r3l_lightning.console import plain_model_summary, quiet_third_party
from r3l_lightning.data import ExperienceDataModule
from r3l_lightning.losses import LossConfig
from r3l_lightning.module import R3LModule
from r3l_lightning.precision import AUTO, resolve_auto, resolve_precision


@rank_zero_only
def _announce(line: str) -> None:
    print(line, flush=True)


def _class_specs(value: object, base: type) -> list[Namespace]:
    """The ``class_path``/``init_args`` entries of a parsed ``trainer.logger`` or ``trainer.callbacks`` value
    (one entry, a list, or ``None``/``True``/``False``) whose class is ``base`` or a subclass of it."""
    entries = value if isinstance(value, list) else [value]
    specs = []
    for entry in entries:
        if isinstance(entry, Namespace) and "class_path" in entry and "init_args" in entry:
            module, name = entry.class_path.rsplit(".", 1)
            if issubclass(getattr(importlib.import_module(module), name), base):
                specs.append(entry)
    return specs


def derive_run_dirs(trainer: Namespace) -> None:
    """Put what a parsed ``trainer`` config leaves without a directory into its run directory,
    ``trainer.default_root_dir`` (Lightning's default: the working directory): each logger's ``save_dir`` and each
    ``ModelCheckpoint``'s ``dirpath`` (``<run dir>/checkpoints``). Directories the config gives are kept."""
    run_dir = trainer.default_root_dir or os.getcwd()
    for logger in _class_specs(trainer.logger, Logger):
        if "save_dir" in logger.init_args and logger.init_args.save_dir is None:
            logger.init_args.save_dir = run_dir
    for checkpoint in _class_specs(trainer.callbacks, ModelCheckpoint):
        if checkpoint.init_args.dirpath is None:
            checkpoint.init_args.dirpath = str(Path(run_dir) / "checkpoints")


_RST_ROLE = re.compile(r":[a-z]+:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")  # :class:`~a.b.C`, :func:`text <target>`
_RST_LITERAL = re.compile(r"``(.+?)``", re.S)  # a literal may wrap a line


def plain_text(text: str) -> str:
    """A docstring fragment without reStructuredText markup: ``:class:`~a.b.C``` → ``C``, ``:func:`a.f``` → ``a.f``,
    double-backquoted literals → their text, a paragraph's closing ``::`` → ``:``."""

    def role(match: re.Match) -> str:
        target = match.group(2)
        return target.rsplit(".", 1)[-1] if match.group(1) else target

    text = _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(role, text))
    return re.sub(r"(\S)::(\s|$)", r"\1:\2", text)


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the docstrings' reStructuredText markup removed (:func:`plain_text`)."""

    def _get_help_string(self, action: Action) -> str:
        return plain_text(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def start_section(self, heading: str | None) -> None:
        super().start_section(plain_text(heading) if heading else heading)


_LOSS_FIELDS = {f.name for f in fields(LossConfig)}
_FLAT_LOSS_KEY = re.compile(r"Group 'model' does not accept option '(\w+)'|\bmodel\.(\w+)")


def moved_loss_keys(message: str) -> str:
    """A parser error ``message``, with where the loss settings it names as ``model.<name>`` are now:
    ``model.loss.<name>`` (issue 24: the loss settings are one block, :class:`~r3l_lightning.losses.LossConfig`)."""
    moved = sorted({name for match in _FLAT_LOSS_KEY.finditer(message) for name in match.groups()
                    if name in _LOSS_FIELDS})
    if not moved:
        return message
    return message + "".join(f"\n  model.{name} moved to model.loss.{name}" for name in moved)


class R3LArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors also say where a moved key went (:func:`moved_loss_keys`)."""

    def error(self, message: str, ex: Exception | None = None):
        super().error(moved_loss_keys(message), ex)


class R3LTrainer(L.Trainer):
    """A Lightning ``Trainer`` with :meth:`evaluate` (rollout benchmark without training) and ``precision: auto``
    (:func:`~r3l_lightning.precision.auto_precision`: ``bf16-mixed`` where the device has native bf16, else
    ``32-true``); its default model summary has no FLOPs (:class:`~r3l_lightning.console.ParameterSummary`)."""

    def __init__(self, *args, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs) -> None:
        precision, reason = resolve_precision(precision, kwargs.get("accelerator", AUTO))
        if reason is not None:
            _announce(f"precision: auto -> {precision} ({reason})")
        super().__init__(*args, precision=precision, **kwargs)
        self.callbacks = plain_model_summary(self.callbacks)

    def evaluate(self, model: R3LModule, datamodule: ExperienceDataModule, ckpt_path: str | None = None) -> dict:
        """Run the configured ``EvalCallback`` (or a default one) on ``model`` or a Lightning checkpoint.

        Args:
            ckpt_path: a checkpoint written by ``r3l fit``; its policy weights replace the model's.
        """
        if ckpt_path is not None:
            path = Path(ckpt_path)
            if not path.is_file():
                raise FileNotFoundError(f"--ckpt_path {path} does not exist")
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict(state, strict=model.strict_loading)  # a LoRA checkpoint holds the adapters only
        model.to(self.strategy.root_device)
        callback = next((c for c in self.callbacks if isinstance(c, EvalCallback)), None) or EvalCallback()
        result = callback.run(datamodule, model)
        for logger in self.loggers:
            logger.log_metrics(result, step=0)
            logger.save()
        if self.is_global_zero:
            print(describe("evaluate", result), flush=True)
        return result


class R3LCLI(LightningCLI):
    """LightningCLI for ``R3LModule`` + ``ExperienceDataModule``, with the ``evaluate`` subcommand.

    Checkpoints are written by :class:`AtomicCheckpointIO` unless the config names another
    ``CheckpointIO`` plugin; every fit ends with :class:`RunReportCallback` (key figures, curves.png)
    unless the config lists its own, which is moved behind Lightning's progress bar: it prints after the bar's
    last refresh, so its gain line is the console's last. Its parser's errors say where a moved key went
    (:class:`R3LArgumentParser`).
    """

    def __init__(self, *args, parser_class: type[LightningArgumentParser] = R3LArgumentParser, **kwargs) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Resolve ``trainer.precision: auto`` and ``model.model_dtype: auto`` (the task configs' default) and say
        what was chosen and why in one line; put logs and checkpoints the config gives no directory into
        ``trainer.default_root_dir`` (:func:`derive_run_dirs`). The saved config records the resolved values."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, model = config.trainer, config.model
        derive_run_dirs(trainer)
        trainer.precision, model.model_dtype, line = resolve_auto(trainer.precision, model.model_dtype,
                                                                  trainer.accelerator)
        if line is not None:
            _announce(line)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        reports = [c for c in trainer.callbacks if isinstance(c, RunReportCallback)] or [RunReportCallback()]
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, RunReportCallback)] + reports
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "evaluate": {"model", "datamodule"}}


def cli_main(args: list[str] | None = None) -> R3LCLI:
    quiet_third_party()
    plain = {"formatter_class": PlainHelpFormatter}
    return R3LCLI(
        R3LModule,
        ExperienceDataModule,
        trainer_class=R3LTrainer,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**plain, **{subcommand: dict(plain) for subcommand in R3LCLI.subcommands()}},
        args=args,
    )


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()
