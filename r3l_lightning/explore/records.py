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
samples built from them (base, distill/retry/refinement, corrections). A group whose
samples were all dropped (``drop_uniform_groups``) has attempts with empty ``samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from r3l_lightning.envs.base import Task
from r3l_lightning.trajectory import Trajectory, TrainingSample

if TYPE_CHECKING:
    from r3l_lightning.explore.r3l import _Pair


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


def sample_record(sample: TrainingSample, reward: float | None) -> dict[str, Any]:
    """Kind, the reward of the trajectory it was built from (None for a reflection), advantage, tokens."""
    return {
        "kind": sample.kind,
        "reward": reward,
        "advantage": float(sample.advantage),
        "trainable_tokens": sample.num_trainable_tokens,
        "tokens": len(sample.input_ids),
    }


def group_record(task: Task, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"task_id": task.task_id, "task": task.payload, "attempts": attempts}


def trajectories_record(task: Task, trajectories: Sequence[Trajectory],
                        samples: Sequence[TrainingSample | None] = ()) -> dict[str, Any]:
    """A group of independent trajectories; ``samples[i]`` (None or missing: no sample) was built from
    ``trajectories[i]``."""
    attempts = []
    for i, trajectory in enumerate(trajectories):
        sample = samples[i] if i < len(samples) else None
        attempts.append({
            "base": trajectory_record(trajectory), "reflection": None, "pivot": None, "retry": None, "more_retries": [],
            "samples": [] if sample is None else [sample_record(sample, trajectory.reward)],
        })
    return group_record(task, attempts)


def pairs_record(task: Task, pairs: Sequence[_Pair], trajectories: Sequence[Trajectory],
                 samples: Sequence[TrainingSample], sft: Sequence[Sequence[TrainingSample]] = ()) -> dict[str, Any]:
    """A reflect-and-retry group. ``samples[i]`` was built from ``trajectories[i]`` (the RL group, empty
    when dropped), which is a pair's base trajectory or made from its retry (distill, guided retry,
    refinement: their last message is the retry's own); ``sft[j]`` are the SFT samples of ``pairs[j]``."""
    owned: list[list[dict]] = [[] for _ in pairs]
    for trajectory, sample in zip(trajectories, samples):
        for j, pair in enumerate(pairs):
            if trajectory is pair.base or any(_shares_last_message(trajectory, r) for r in pair.retries):
                owned[j].append(sample_record(sample, trajectory.reward))
                break
    for pair, pair_sft, own in zip(pairs, sft, owned):
        for sample in pair_sft:
            retried = sample.kind in ("sft_retry", "retry") and len(pair.retries) == 1
            reward = pair.retries[0].reward if retried else None
            own.append(sample_record(sample, reward))
    attempts = [
        {
            "base": trajectory_record(pair.base),
            "reflection": _reflection_record(pair),
            "pivot": pair.pivot if pair.retries else None,
            "retry": trajectory_record(pair.retries[0]) if pair.retries else None,
            "more_retries": [trajectory_record(r) for r in pair.retries[1:]],
            "samples": owned[j],
        }
        for j, pair in enumerate(pairs)
    ]
    return group_record(task, attempts)


def _shares_last_message(trajectory: Trajectory, retry: Trajectory) -> bool:
    return bool(trajectory.messages) and bool(retry.messages) and trajectory.messages[-1] is retry.messages[-1]


def _reflection_record(pair: _Pair) -> dict[str, Any] | None:
    if pair.reflection_response is None:
        return None
    return {
        "text": pair.reflection_response.content,
        "report": pair.reflection.report if pair.reflection is not None else None,
        "invalid_reason": pair.invalid_reason or None,
    }
