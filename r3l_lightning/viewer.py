"""``r3l view RUN_DIR``: the run's rollout records as ONE self-contained HTML page (no server, no network).

The page (template: ``assets/viewer.html``; docs/viewer.md describes it) opens with the run's config (method,
model, seed, task settings) and an overview of every epoch (groups solved, reflections informative, retries
improved, zero-spread groups). Each group is a compact table, one line per attempt (base answer, reflection verdict,
pivot, retry answer, rewards, advantages) that expands on click into the base trajectory next to its retry with the
pivot step highlighted, the reflection's fields, and every sample's reward and advantage. Filters (epoch, sample
kind, outcome, task id) are kept in the address (``#epoch=train:3&outcome=improved``); ``view=eval-pairs`` shows
each eval task's rollouts before and after training side by side. It renders one page of groups at a time, so a
run of 20 epochs × 64 groups stays quick (``python benchmarks/viewer_size.py`` measures size and load time).
Repeated long strings (system prompts, the prefix a retry shares with its base trajectory) are stored once in a
string table.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from r3l_lightning.trajectory import SAMPLE_KINDS

log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).parent / "assets" / "viewer.html"
INTERN_MIN_CHARS = 32  # shorter strings are cheaper inline than as a table index
_FILE = re.compile(r"^(epoch|eval)_(\d+)\.jsonl$")


def find_log_dir(run_dir: str | Path) -> Path:
    """``run_dir`` itself when it holds ``rollouts/``, else the most recently written log directory
    below it that does (``runs/<job>/csv/version_<n>``)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"RUN_DIR {root} is not a directory: pass a run directory such as runs/countdown-r3l")
    if (root / "rollouts").is_dir():
        return root
    if root.name == "rollouts" and any(root.glob("*.jsonl")):  # the rollouts folder itself
        return root.parent
    candidates = [d.parent for d in root.rglob("rollouts") if d.is_dir() and any(d.glob("*.jsonl"))]
    if not candidates:
        raise FileNotFoundError(
            f"no rollout records under {root}: `r3l fit` writes them to <log_dir>/rollouts/ "
            "(data.rollout_log sets how many; every_n_epochs: 0 turns them off)"
        )
    return max(candidates, key=lambda d: max(f.stat().st_mtime for f in (d / "rollouts").glob("*.jsonl")))


def load_records(log_dir: str | Path) -> list[dict[str, Any]]:
    """Every group of ``<log_dir>/rollouts/{epoch,eval}_<k>.jsonl``, training epochs first, by epoch.
    Lines that are not JSON objects are skipped with a warning."""
    files = []
    for path in (Path(log_dir) / "rollouts").glob("*.jsonl"):
        match = _FILE.match(path.name)
        if match:
            files.append((match.group(1) == "eval", int(match.group(2)), path))
    records = []
    for _, _, path in sorted(files):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "attempts" not in record:
                log.warning("%s:%d is not a rollout record; skipped", path, number)
                continue
            records.append(record)
    return records


def load_config(log_dir: str | Path) -> dict[str, Any]:
    """The run's ``config.yaml`` (``r3l fit`` saves it in the log directory), or {} when there is none."""
    path = Path(log_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        log.warning("%s is not YAML (%s); the page shows no config", path, err)
        return {}
    return config if isinstance(config, dict) else {}


def config_summary(config: dict[str, Any]) -> list[list[str]]:
    """The settings a reader needs first, as ``[name, value]`` pairs: method (explorer and its arguments), model,
    seed, environment, training and evaluation tasks, epochs and tasks per epoch."""
    data, model, trainer = (config.get(k) or {} for k in ("data", "model", "trainer"))

    def component(value: Any) -> str:
        if not isinstance(value, dict):
            return "" if value is None else str(value)
        name = str(value.get("class_path", "")).rsplit(".", 1)[-1]
        args = value.get("init_args") or {}
        inner = ", ".join(f"{k}: {component(v) if isinstance(v, dict) else v}" for k, v in args.items())
        return f"{name}({inner})" if inner else name

    rows = [
        ["method", component(data.get("explorer"))],
        ["model", str(model.get("model_name_or_path", ""))],
        ["seed", str(config.get("seed_everything", ""))],
        ["environment", component(data.get("environment"))],
        ["train tasks", component(data.get("train_tasks"))],
        ["eval tasks", component(data.get("eval_tasks"))],
        ["schedule", f"{trainer.get('max_epochs', '?')} epochs × {data.get('tasks_per_epoch', '?')} tasks"],
    ]
    return [row for row in rows if row[1] not in ("", "None")]


def viewer_data(records: list[dict[str, Any]], summary: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The page's data: groups with compact trajectories (messages as ``[role, content, guidance]``),
    long strings that occur more than once replaced by their index in ``strings``, the sample kinds trained as
    SFT (outside the reward-spread count), and the run's config (summary rows and full YAML)."""
    counts = Counter(
        text for record in records for attempt in record["attempts"] for trajectory in _trajectories(attempt)
        for text in [m["content"] for m in trajectory["messages"]] + [trajectory.get("feedback", "")]
        if len(text) >= INTERN_MIN_CHARS
    )
    index: dict[str, int] = {}

    def ref(text: str) -> str | int:
        if counts.get(text, 0) < 2:
            return text
        return index.setdefault(text, len(index))

    def trajectory(t: dict[str, Any]) -> dict[str, Any]:
        return {
            "messages": [[m["role"], ref(m["content"]), bool(m.get("guidance"))] for m in t["messages"]],
            "reward": t["reward"], "turns": t["turns"], "feedback": ref(t.get("feedback", "")),
            "truncated": t.get("truncated", False), "error": t.get("error"),
        }

    groups = []
    kinds: list[str] = []
    for record in records:
        attempts = []
        for a in record["attempts"]:
            for sample in a["samples"]:
                if sample["kind"] not in kinds:
                    kinds.append(sample["kind"])
            attempts.append({
                "base": trajectory(a["base"]),
                "retry": trajectory(a["retry"]) if a.get("retry") else None,
                "pivot": a.get("pivot"),
                "reflection": a.get("reflection"),
                "retry_same_as_base": a.get("retry_same_as_base"),
                "samples": a["samples"],
            })
        groups.append({"split": record.get("split", "train"), "epoch": record.get("epoch", 0),
                       "task_id": str(record["task_id"]), "task": json.dumps(record.get("task"), default=str)[:300],
                       "attempts": attempts})
    config = config or {}
    return {"groups": groups, "kinds": kinds, "strings": list(index), "summary": summary,
            "sft_kinds": [k for k, info in SAMPLE_KINDS.items() if info.objective == "sft"],
            "config": config_summary(config),
            "config_yaml": yaml.safe_dump(config, sort_keys=False) if config else ""}


def _trajectories(attempt: dict[str, Any]) -> list[dict[str, Any]]:
    return [attempt["base"]] + ([attempt["retry"]] if attempt.get("retry") else [])


def render_html(records: list[dict[str, Any]], title: str, config: dict[str, Any] | None = None) -> str:
    """The self-contained page for ``records`` (and the run's ``config``)."""
    train = [r for r in records if r.get("split", "train") == "train"]
    epochs = len({r.get("epoch") for r in train})
    summary = f"{len(train)} training groups over {epochs} epochs, {len(records) - len(train)} eval groups"
    data = json.dumps(viewer_data(records, summary, config), ensure_ascii=False, separators=(",", ":"))
    # inside <script>, "<" must not start a tag: JSON's \u003c escape keeps the text inert
    data = data.replace("<", "\\u003c")
    page = TEMPLATE.read_text(encoding="utf-8")
    return page.replace("__TITLE__", _escape(title)).replace("__DATA__", data)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_viewer(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, int]:
    """Write the page for the run (default ``<log_dir>/rollouts.html``); returns (path, groups)."""
    log_dir = find_log_dir(run_dir)
    records = load_records(log_dir)
    if not records:
        raise FileNotFoundError(f"{log_dir / 'rollouts'} holds no rollout records (empty files?)")
    target = Path(out) if out is not None else log_dir / "rollouts.html"
    target.write_text(render_html(records, f"r3l view · {log_dir}", load_config(log_dir)), encoding="utf-8")
    return target, len(records)
