"""Rollout records: what the agent did in one group, as a JSON-ready dict (one line of the rollout log).

Explorers hand these out in ``ExplorationResult.records`` (one per task); ``ExplorationCallback`` writes
them to ``<log_dir>/rollouts/epoch_<k>.jsonl``, ``r3l view`` renders them. A record::

    {"task_id": str, "task": payload,
     "attempts": [{"base": trajectory, "reflection": {"text", "report", "invalid_reason"} | null,
                   "pivot": int | null, "retry": trajectory | null, "more_retries": [trajectory],
                   "samples": [{"kind", "reward", "advantage", "trainable_tokens", "tokens"}]}]}

    trajectory = {"messages": [{"role", "content", "guidance"?}], "observations": [str], "reward": float,
                  "turns": int, "feedback": str, "truncated": bool, "error": str | null}

An attempt is one base trajectory with everything made from it: its reflection, the retry from the
pivot (the first one; ``more_retries`` holds the others when ``retries_per_base > 1``), and the training
samples built from them (base, distill/retry/refinement, corrections), each with the reward its advantage
was computed from (a trajectory's own, before DAPO's length penalty; 1 for a correction trained as a
one-sample RL group) or, for an SFT sample, the reward of its trajectory (None for a reflection). A group whose samples were all dropped (DAPO's ``drop_uniform_groups``)
has attempts with empty ``samples``. Explorers build records from their
:class:`~r3l_lightning.explore.attempt.Attempt` objects (``Attempt.to_record``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r3l_lightning.envs.base import Task
from r3l_lightning.trajectory import Trajectory, TrainingSample


def trajectory_record(trajectory: Trajectory) -> dict[str, Any]:
    """Messages (guidance messages flagged), observations, reward, number of turns, feedback."""
    messages = []
    for m in trajectory.messages:
        message = {"role": m.role, "content": m.content}
        if m.guidance:
            message["guidance"] = True
        messages.append(message)
    return {
        "messages": messages,
        "observations": list(trajectory.observations),
        "reward": float(trajectory.reward),
        "turns": trajectory.num_turns,
        "feedback": trajectory.feedback,
        "truncated": bool(trajectory.info.get("truncated", False)),
        "error": trajectory.info.get("error"),
    }


def sample_record(sample: TrainingSample) -> dict[str, Any]:
    """Kind, reward (``TrainingSample.reward``), advantage, trainable and all tokens."""
    return {
        "kind": sample.kind,
        "reward": sample.reward,
        "advantage": float(sample.advantage),
        "trainable_tokens": sample.num_trainable_tokens,
        "tokens": len(sample.input_ids),
    }


def attempt_record(base: Trajectory, reflection: dict[str, Any] | None = None, pivot: int | None = None,
                   retries: Sequence[Trajectory] = (), samples: Sequence[TrainingSample] = ()) -> dict[str, Any]:
    """One entry of ``attempts`` (see the module docstring)."""
    return {
        "base": trajectory_record(base),
        "reflection": reflection,
        "pivot": pivot,
        "retry": trajectory_record(retries[0]) if retries else None,
        "more_retries": [trajectory_record(r) for r in retries[1:]],
        "samples": [sample_record(s) for s in samples],
    }


def group_record(task: Task, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"task_id": task.task_id, "task": task.payload, "attempts": attempts}


def trajectories_record(task: Task, trajectories: Sequence[Trajectory]) -> dict[str, Any]:
    """A group of independent trajectories that trained nothing (evaluation rollouts)."""
    return group_record(task, [attempt_record(t) for t in trajectories])
