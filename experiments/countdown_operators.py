"""What a Countdown run learned: eval success on the tasks whose target is the sum of the numbers (solved by
"add them all") against the other tasks, and the operators of the first answers, per evaluation.

    python experiments/countdown_operators.py runs/countdown-r3l        # one run's log dir
    python experiments/countdown_operators.py runs/compare              # every run under a directory

Reads the eval rollout logs (``<log dir>/rollouts/eval_<k>.jsonl``, k = trained epochs).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
OPERATOR = re.compile(r"\s([+\-*/])\s")


def first_answer_operators(episode: dict) -> str:
    """The operators of the first answer, in order (``none`` without an answer tag)."""
    replies = [m["content"] for m in episode["messages"] if m["role"] == "assistant"]
    match = ANSWER.search(replies[0]) if replies else None
    return " ".join(OPERATOR.findall(match.group(1))) or "(number)" if match else "none"


def summarize(path: Path) -> str:
    solved = {True: [0, 0], False: [0, 0]}
    operators: Counter[str] = Counter()
    for line in path.open():
        group = json.loads(line)
        task, episode = group["task"], group["attempts"][0]["base"]
        bucket = solved[sum(task["numbers"]) == task["target"]]
        bucket[0] += episode["reward"] >= 1.0
        bucket[1] += 1
        operators[first_answer_operators(episode)] += 1
    (sum_ok, sum_n), (other_ok, other_n) = solved[True], solved[False]
    top = ", ".join(f"{op} ×{count}" for op, count in operators.most_common(4))
    return f"sum tasks {sum_ok}/{sum_n}, other tasks {other_ok}/{other_n}; first answers: {top}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a run's log dir, or a directory holding runs")
    args = parser.parse_args(argv)
    files = sorted(args.root.rglob("rollouts/eval_*.jsonl"), key=lambda p: (p.parent, int(p.stem.split("_")[1])))
    if not files:
        raise SystemExit(f"no rollouts/eval_*.jsonl under {args.root}: evaluate with data.rollout_log on")
    for path in files:
        run = path.parent.parent.relative_to(args.root) if path.parent.parent != args.root else Path(".")
        print(f"{str(run):45s} after {path.stem.split('_')[1]:>2s} epochs: {summarize(path)}")


if __name__ == "__main__":
    main()
