"""experiments/countdown_operators.py splits eval success into sum-solvable and other tasks."""

from __future__ import annotations

import importlib.util
import json

from test_cli import ROOT

spec = importlib.util.spec_from_file_location("countdown_operators", ROOT / "experiments" / "countdown_operators.py")
operators = importlib.util.module_from_spec(spec)
spec.loader.exec_module(operators)


def group(numbers, target, answer, reward):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
    return {"task": {"numbers": numbers, "target": target}, "attempts": [{"base": {"messages": messages, "reward": reward}}]}


def test_sum_tasks_and_other_tasks_are_counted_apart(tmp_path, capsys):
    rollouts = tmp_path / "csv" / "version_0" / "rollouts"
    rollouts.mkdir(parents=True)
    groups = [group([3, 5], 8, "<answer>3 + 5</answer>", 1.0),   # sum task, solved
              group([2, 4], 6, "<answer>2 * 4</answer>", 0.0),   # sum task, failed
              group([3, 4], 12, "<answer>3 * 4</answer>", 1.0),  # product task, solved
              group([9, 3], 3, "no tag", 0.0)]                   # quotient task, no answer
    (rollouts / "eval_2.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    operators.main([str(tmp_path)])
    line = capsys.readouterr().out.strip()
    assert line.endswith("after  2 epochs: sum tasks 1/2, other tasks 1/2; first answers: * ×2, + ×1, none ×1")
