"""The ``r3l`` command end to end: fit on the tiny model, evaluate, print_config, config errors, custom explorer."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from r3l_lightning.checkpoint_io import AtomicCheckpointIO
from r3l_lightning.cli import R3LCLI, R3LTrainer, cli_main, derive_run_dirs
from r3l_lightning.data import ExperienceDataModule
from r3l_lightning.explore import ExplorationResult, GroupExplorer
from r3l_lightning.loggers import CSVLogger
from r3l_lightning.losses import LossConfig
from r3l_lightning.module import R3LModule

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "tiny.yaml"
UMASK = os.umask(0o022)
os.umask(UMASK)


def test_fit_two_epochs_writes_metrics_checkpoint_hf_model_rollouts_and_curves(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(SMOKE)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[eval before training] success_rate=" in proc.stderr + proc.stdout
    assert "[eval after training] success_rate=" in proc.stderr + proc.stdout
    # the run's report ends with the before → after gain and its standard error: printed once, as the last line of
    # stdout, after the progress bar's last refresh
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-2].startswith("curves: ") and lines[-1].startswith("[eval gain] success_rate "), lines[-3:]
    assert (proc.stdout + proc.stderr).count("[eval gain]") == 1
    assert "FLOPs" not in proc.stdout + proc.stderr and "Flops" not in proc.stdout + proc.stderr
    assert re.search(r"^params: [\d.]+ M trainable, 0 frozen", proc.stdout, flags=re.M), proc.stdout[:500]
    run_dir = tmp_path / "runs" / "smoke"
    (metrics,) = list(run_dir.glob("csv/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    keys = set(rows[0])
    for key in ("train/loss", "train/rl_loss", "train/sft_loss", "train/entropy", "train/masked_fraction",
                "explore/base_success_rate", "explore/valid_reflection_rate", "explore/tokens_base",
                "eval/success_rate"):
        assert key in keys, f"{key} not logged"
    assert sum(1 for r in rows if r["train/loss"]) == 4  # 2 epochs x 2 tasks, 1 group per step
    undocumented = sorted(k for k in keys - {"step"} if not any(p.fullmatch(k) for p in documented_metrics()))
    assert not undocumented, f"add them to docs/metrics.md: {undocumented}"
    explore_row = next(r for r in rows if r["explore/completions_base"])
    # 2 tasks x 2 base rollouts (R³L: half of group size 4) of 16 tokens at most (the smoke config's budget)
    assert float(explore_row["explore/completions_base"]) == 4.0
    assert 0 < float(explore_row["explore/completion_len_mean_base"]) <= float(explore_row["explore/completion_len_max_base"]) <= 16
    assert float(explore_row["explore/tokens_per_s_base"]) > 0
    for row in (r for r in rows if r["train/loss"]):
        # a step without signal (every advantage 0, no SFT token) has loss 0 and zero gradients; any other step has a
        # gradient, logged before clipping
        silent = float(row["train/no_signal_step"]) == 1.0
        assert silent == (float(row["train/advantage_min"]) == float(row["train/advantage_max"]) == 0.0
                          and float(row["train/sft_loss"]) == 0.0), row
        assert (float(row["train/grad_norm"]) == 0.0 and float(row["train/loss"]) == 0.0) if silent else \
            float(row["train/grad_norm"]) > 0.0, row
    per_epoch = [float(r["train/no_signal_steps"]) for r in rows if r.get("train/no_signal_steps")]
    assert sum(per_epoch) == sum(float(r["train/no_signal_step"]) for r in rows if r["train/loss"])
    assert sum(1 for r in rows if r["eval/success_rate"]) == 3  # before, after epoch 1, after training
    assert list(run_dir.glob("**/events.out.tfevents.*")), "no TensorBoard log"
    assert list(run_dir.glob("**/checkpoints/last.ckpt"))
    for path in [*run_dir.glob("**/checkpoints/*.ckpt"), *run_dir.glob("**/rollouts/*.jsonl")]:
        if not path.is_symlink():  # readable by colleagues under the umask (022 here), not owner-only
            assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path
    (hf_dir,) = list(run_dir.glob("**/hf_model"))
    assert (hf_dir / "config.json").exists() and (hf_dir / "model.safetensors").exists()
    # what the agent did: one JSON line per group (2 tasks per epoch), eval rollouts after 0, 1, 2 epochs
    log_dir = metrics.parent
    rollouts = {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in (log_dir / "rollouts").iterdir()}
    assert sorted(rollouts) == ["epoch_0.jsonl", "epoch_1.jsonl", "eval_0.jsonl", "eval_1.jsonl", "eval_2.jsonl"]
    assert [len(rollouts[f"epoch_{k}.jsonl"]) for k in (0, 1)] == [2, 2]
    assert all(len(g["attempts"]) == 2 and g["attempts"][0]["reflection"] is not None for g in rollouts["epoch_0.jsonl"])
    assert len(rollouts["eval_0.jsonl"]) == 4  # the smoke config's 4 eval tasks
    assert "epoch 0 | base 0.00 | reflections " in proc.stdout + proc.stderr  # the per-epoch summary
    assert "dataloader_iter" not in proc.stderr and "litlogger" not in proc.stderr  # Lightning's notes: dropped
    assert (log_dir / "curves.png").read_bytes().startswith(b"\x89PNG")  # drawn at the end of the fit
    tool = lambda *args: subprocess.run([sys.executable, "-m", "r3l_lightning.command", *args],  # noqa: E731
                                        capture_output=True, text=True, timeout=120)
    view = tool("view", str(run_dir))
    assert view.returncode == 0 and f"wrote {log_dir / 'rollouts.html'} (16 groups" in view.stdout, view.stderr
    report = tool("report", str(run_dir), "-o", str(tmp_path / "again.png"))
    assert report.returncode == 0 and re.search(r"eval success: \d\.\d{3} before training → \d\.\d{3} after 2 epochs",
                                                report.stdout), report.stdout
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")


def documented_metrics() -> list[re.Pattern]:
    """The metric names of docs/metrics.md's table, ``<family>`` placeholders as patterns."""
    names = re.findall(r"^\| `([^`]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M)
    return [re.compile(re.sub(r"<[a-z]+>", "[a-z_]+", re.escape(name))) for name in names]  # re.escape keeps <>


def test_print_config_is_complete_and_rerunnable(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(SMOKE), "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["model_name_or_path"] == "tiny-random-smollm2"
    assert config["model"]["lr"] == 1e-4 and config["model"]["loss"]["sft_coef"] == 1.0
    explorer = config["data"]["explorer"]
    assert explorer["init_args"]["alpha"] == 3.0  # defaults are filled in
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.lrr", "0.1"], "lrr"),  # unknown key
        (["--data.groups_per_step", "many"], "groups_per_step"),  # wrong type
        (["--model.loss.aggregation", "sum"], "model.loss.aggregation"),  # not one of the options
        # a loss setting by its name before the model.loss block: unknown, and the error says where it went
        (["--model.clip_low", "0.2"], "unrecognized arguments: --model.clip_low 0.2\n  model.clip_low moved to "
                                      "model.loss.clip_low"),
    ],
)
def test_config_errors_name_the_key(override, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(SMOKE), *override])
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_a_flat_loss_key_in_a_config_file_says_where_it_moved(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  kl_coef: 0.01\n  lrr: 1\n")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(SMOKE), "--config", str(old)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "does not accept option" in err and "model.kl_coef moved to model.loss.kl_coef" in err
    assert "lrr moved" not in err  # only the loss settings moved


def test_an_invalid_loss_combination_is_refused_when_the_model_is_made():
    with pytest.raises(ValueError, match="model.loss.ratio_level=sequence has no effect without a clip range"):
        R3LCLI(R3LModule, ExperienceDataModule, trainer_class=R3LTrainer, run=False,
               args=["--config", str(SMOKE), "--model.loss.ratio_level", "sequence"])


def test_model_loss_block_parses_into_a_loss_config_and_reloads_from_a_checkpoint(tmp_path, monkeypatch):
    overlay = tmp_path / "loss.yaml"
    overlay.write_text("model:\n  loss: {aggregation: token-mean, clip_low: 0.2, clip_high: 0.28, kl_coef: 0.01}\n")
    expected = LossConfig(aggregation="token-mean", clip_low=0.2, clip_high=0.28, kl_coef=0.01)
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(SMOKE), "--config", str(overlay), "--trainer.max_epochs", "1",
                    "--data.tasks_per_epoch", "1", "--data.explorer.init_args.group_size", "2",
                    "--data.explorer.init_args.max_new_tokens", "4", "--trainer.logger", "false",
                    "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback}, "
                                           "{class_path: lightning.pytorch.callbacks.ModelCheckpoint}]"])
    assert cli.model.loss_config == expected and cli.model.reference is not None  # kl_coef > 0: loaded
    # under LightningCLI hparams hold the block as the config's plain dict; the checkpoint keeps that dict and
    # the CLI's instantiator, which makes the LossConfig again
    assert cli.model.hparams["loss"] == vars(expected)
    (checkpoint,) = (tmp_path / "runs" / "smoke" / "checkpoints").glob("*.ckpt")
    reloaded = R3LModule.load_from_checkpoint(checkpoint)
    assert reloaded.loss_config == expected and isinstance(reloaded.loss_config, LossConfig)
    assert reloaded.reference is not None


def test_missing_model_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        cli_main(["fit", "--config", str(SMOKE), "--model.model_name_or_path", str(tmp_path / "nope")])


class CountingExplorer(GroupExplorer):
    """A user's own explorer: GRPO-style groups, counting its calls."""

    calls = 0

    def explore(self, tasks, ctx) -> ExplorationResult:
        CountingExplorer.calls += 1
        return super().explore(tasks, ctx)


def test_custom_explorer_class_is_picked_up_from_the_config(tmp_path, monkeypatch):
    config = yaml.safe_load(SMOKE.read_text())
    config["data"]["explorer"] = {"class_path": f"{__name__}.CountingExplorer",
                                  "init_args": {"group_size": 2, "max_new_tokens": 8}}
    config["trainer"].update(max_epochs=1, logger=False, enable_checkpointing=False)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(path)])
    assert type(cli.datamodule.explorer).__name__ == "CountingExplorer"
    assert CountingExplorer.calls == 1
    assert cli.trainer.global_step >= 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # r3l's default


def test_evaluate_subcommand_reports_success_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["evaluate", "--config", str(SMOKE), "--trainer.logger", "false"])
    assert cli.trainer.callbacks  # the configured EvalCallback ran
    out = capsys.readouterr()
    assert "[eval evaluate] success_rate=" in out.out + out.err


CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("methods", "gpu", "loggers"))
METHODS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
GPU_OVERLAYS = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("method", [None, *METHODS], ids=lambda p: p.stem if p else "as-is")
def test_every_config_and_method_overlay_parses(config, method, capsys):
    args = ["fit", "--config", str(config)] + (["--config", str(method)] if method else [])
    with pytest.raises(SystemExit) as exc:
        cli_main(args + ["--print_config"])
    assert exc.value.code in (None, 0)
    assert "class_path" in yaml.safe_load(capsys.readouterr().out)["data"]["explorer"]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS, ids=lambda p: p.stem)
def test_gpu_overlays_parse_on_top_of_a_task_config(overlay, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs" / "countdown" / "r3l.yaml"), "--config", str(overlay),
                  "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["accelerator"] == "gpu" or "VLLMEngine" in config["model"]["engine"]["class_path"]


def test_wandb_overlay_adds_a_wandb_logger_to_the_task_loggers(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs" / "countdown" / "r3l.yaml"),
                  "--config", str(ROOT / "configs" / "loggers" / "wandb.yaml"), "--print_config"])
    loggers = [lg["class_path"].rsplit(".", 1)[1] for lg in yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]]
    assert loggers == ["CSVLogger", "TensorBoardLogger", "WandbLogger"]  # the CSV logger stays first: log_dir


TASK_CONFIGS = sorted((ROOT / "configs").glob("*/r3l.yaml"))


@pytest.mark.parametrize("config", [*TASK_CONFIGS, SMOKE], ids=lambda p: p.parent.name)
def test_each_config_names_its_run_directory_once(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    assert trainer["default_root_dir"].startswith("runs/")
    given = [entry["init_args"] for entry in trainer["logger"] + trainer["callbacks"] if "init_args" in entry]
    assert not [args for args in given if "save_dir" in args or "dirpath" in args]


def test_logs_and_checkpoints_follow_the_run_directory_given_on_the_command_line(tmp_path):
    run_dir = tmp_path / "elsewhere"
    cli = R3LCLI(R3LModule, ExperienceDataModule, trainer_class=R3LTrainer, run=False,
                 args=["--config", str(SMOKE), "--trainer.default_root_dir", str(run_dir)])
    assert [(type(lg).__name__, Path(lg.log_dir)) for lg in cli.trainer.loggers] == [
        ("CSVLogger", run_dir / "csv" / "version_0"), ("TensorBoardLogger", run_dir / "tb" / "version_0")]
    assert [Path(c.dirpath) for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)] == [run_dir / "checkpoints"]
    assert cli.config.trainer.logger[0].init_args.save_dir == str(run_dir)  # what the saved config.yaml records


def test_directories_a_config_gives_are_kept():
    trainer = Namespace(
        default_root_dir="runs/a",
        logger=[Namespace(class_path="r3l_lightning.loggers.CSVLogger", init_args=Namespace(save_dir="logs", name="csv")),
                Namespace(class_path="r3l_lightning.loggers.TensorBoardLogger", init_args=Namespace(save_dir=None))],
        callbacks=Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath="ck")))
    derive_run_dirs(trainer)
    assert [lg.init_args.save_dir for lg in trainer.logger] == ["logs", "runs/a"]
    assert trainer.callbacks.init_args.dirpath == "ck"
    with pytest.raises(ValueError, match="CSVLogger: save_dir is not set"):
        CSVLogger()  # outside the CLI nothing fills it in


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_every_method_overlay_trains_one_tiny_epoch(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(SMOKE), "--config", str(method), "--trainer.max_epochs", "1",
                    "--trainer.logger", "false", "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback}]",
                    "--trainer.enable_checkpointing", "false", "--data.explorer.init_args.group_size", "4"])
    assert cli.trainer.current_epoch == 1
    stats = cli.trainer.callbacks[0].last_stats
    assert stats["base_reward_mean"] >= 0.0
    assert stats["engine_calls_base"] >= 1
    assert stats["engine_calls"] == sum(v for k, v in stats.items() if k.startswith("engine_calls_"))


GSM8K_TINY = str(ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl")
SHORT_RUNS = [
    pytest.param("scienceworld", "scienceworld", ["--data.environment.init_args.max_turns", "3",
                                                  "--data.eval_tasks.init_args.limit", "1"],
                 marks=pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld needs Java"),
                 id="scienceworld"),
    pytest.param("alfworld", "alfworld", ["--data.environment.init_args.max_turns", "3",
                                          "--data.eval_tasks.init_args.num_games", "1"], id="alfworld"),
    pytest.param("math", "math_verify", ["--data.train_tasks.init_args.path", GSM8K_TINY,
                                         "--data.eval_tasks.init_args.path", GSM8K_TINY,
                                         "--data.eval_tasks.init_args.limit", "1"], id="math"),
]


@pytest.mark.parametrize("task, package, task_args", SHORT_RUNS)
def test_short_r3l_run_completes_from_the_task_config(task, package, task_args, tmp_path):
    pytest.importorskip(package)
    # its own process: the simulators' native code must not share the test process (see isolated.py)
    proc = subprocess.run([
        sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(ROOT / "configs" / task / "r3l.yaml"),
        "--model.model_name_or_path", "tiny-random-smollm2", "--model.engine", "r3l_lightning.engines.hf.HFEngine",
        "--trainer.max_epochs", "1",
        "--data.tasks_per_epoch", "1", "--data.explorer.init_args.group_size", "2",
        "--data.explorer.init_args.max_new_tokens", "8", "--data.explorer.init_args.reflection_max_new_tokens", "8",
        *task_args,
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks",
        "[{class_path: r3l_lightning.callbacks.ExplorationCallback},"
        " {class_path: r3l_lightning.callbacks.EvalCallback, init_args: {max_new_tokens: 8}}]",
    ], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "[eval before training] success_rate=" in output and "[eval after training] success_rate=" in output
    assert "`max_epochs=1` reached" in output
