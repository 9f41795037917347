"""The ``r3l`` command's help and its tools' arguments (``r3l_lightning.command``, ``r3l_lightning.cli``)."""

from __future__ import annotations

import re
import sys

import pytest

from r3l_lightning import command
from r3l_lightning.cli import cli_main, plain_text
from r3l_lightning.trajectory import ChatTokenizer
from test_viewer import write_run

RST_MARKUP = re.compile(r"``|:[a-z]+:`|\w::(\s|$)")


def run_command(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["r3l", *args])
    try:
        command.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_top_level_help_lists_training_and_tools(monkeypatch, capsys):
    assert run_command(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  (\w+) ", out, flags=re.M)
    assert listed == ["fit", "evaluate", "view", "report"]
    assert run_command(monkeypatch) == 2  # no subcommand: the same overview, as an error
    assert "fit" in capsys.readouterr().out


def test_evaluate_help_has_no_restructuredtext_markup(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["r3l"])  # LightningCLI warns when both args and sys.argv carry arguments
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "Run the configured EvalCallback (or a default one) on model or a" in out
    assert "A Lightning Trainer with evaluate" in out  # a group heading, from R3LTrainer's docstring
    assert RST_MARKUP.search(out) is None, RST_MARKUP.search(out)


@pytest.mark.parametrize("text, plain", [
    ("see :class:`~r3l_lightning.rollout_log.RolloutLog`", "see RolloutLog"),
    ("see :mod:`r3l_lightning.mismatch`.", "see r3l_lightning.mismatch."),
    (":func:`the loss <r3l_lightning.losses.policy_loss>`", "the loss"),
    ("``mode: none`` or ``tis``", "mode: none or tis"),
    ("Example::\n\n    x", "Example:\n\n    x"),
    ("a::b keeps its colons", "a::b keeps its colons"),
])
def test_plain_text_drops_roles_and_literals(text, plain):
    assert plain_text(text) == plain


def test_view_accepts_the_rollouts_folder_itself(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    log_dir = tmp_path / "runs" / "job" / "csv" / "version_0"
    write_run(ChatTokenizer(tiny_tokenizer, [tiny_tokenizer.eos_token_id]), log_dir)
    out_file = tmp_path / "page.html"
    assert run_command(monkeypatch, "view", str(log_dir / "rollouts"), "-o", str(out_file)) == 0
    assert "(8 groups," in capsys.readouterr().out
    assert out_file.stat().st_size > 0
    assert run_command(monkeypatch, "view", str(tmp_path / "missing")) == 2
    assert "r3l view:" in capsys.readouterr().err
