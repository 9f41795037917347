"""``Attempt`` and ``TaskGroup``: what an explorer made of one base trajectory, and of one task.

An explorer keeps one :class:`TaskGroup` per task: its attempts, in order, and every training sample made
from them, in the order they were made. Each sample is attached to the attempt it came from when it is made
(:meth:`TaskGroup.add`), so the rollout record of a group (:meth:`TaskGroup.to_record`, schema in
:mod:`r3l_lightning.explore.records`) needs no reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r3l_lightning.envs.base import GroundedField, Task
from r3l_lightning.explore.records import attempt_record, group_record
from r3l_lightning.explore.reflection import Reflection
from r3l_lightning.trajectory import Message, TrainingSample, Trajectory


@dataclass
class Attempt:
    """One base trajectory and everything made from it.

    - ``reflection_prompt``: the messages the reflection was asked with (empty: not reflected on);
    - ``reflection``: the reflection as written (None: not reflected on); ``report``: its validated report,
      or None with the reason in ``invalid_reason`` (a :func:`~r3l_lightning.explore.reflection.parse_reflection`
      reason, or ``context_overflow``);
    - ``reflection_author``: who wrote the reflection (``policy``, ``reference``, ``engine``: see
      :mod:`r3l_lightning.explore.reflectors`); ``uninformative_reason``: why a valid report says nothing a retry
      can act on (:func:`~r3l_lightning.explore.reflection.informativeness`; "" when it is informative);
      ``grounded``: the environment-grounded report fields it was asked for (``reflection_schema: grounded``);
    - ``pivot``: the turn the retries restarted from (None: no retry); ``retries``: the retried trajectories;
    - ``samples``: the training samples made from the base, its reflection and its retries.
    """

    task: Task
    base: Trajectory
    reflection_prompt: list[Message] = field(default_factory=list)
    reflection: Message | None = None
    report: Reflection | None = None
    invalid_reason: str = ""
    reflection_author: str = ""
    uninformative_reason: str = ""
    grounded: list[GroundedField] = field(default_factory=list)
    pivot: int | None = None
    retries: list[Trajectory] = field(default_factory=list)
    samples: list[TrainingSample] = field(default_factory=list)

    def reflection_record(self) -> dict[str, Any] | None:
        """``{"text", "report", "invalid_reason"}``, or None when the base was not reflected on."""
        if self.reflection is None:
            return None
        return {
            "text": self.reflection.content,
            "report": self.report.report if self.report is not None else None,
            "invalid_reason": self.invalid_reason or None,
            "author": self.reflection_author or None,
            "informative": self.informative,
            "uninformative_reason": self.uninformative_reason or None,
        }

    @property
    def informative(self) -> bool:
        """A valid report that says something a retry can act on."""
        return self.report is not None and not self.uninformative_reason

    def retry_same_as_base(self, retry: Trajectory) -> bool:
        """Whether ``retry``'s response at the pivot is the base's response at that turn, word for word."""
        turn = self.pivot or 0
        base = [m.content.strip() for m in self.base.messages if m.role == "assistant"]
        again = [m.content.strip() for m in retry.messages if m.role == "assistant"]
        return turn < len(base) and turn < len(again) and base[turn] == again[turn]

    def to_record(self) -> dict[str, Any]:
        """This attempt as one entry of a rollout record's ``attempts``."""
        record = attempt_record(self.base, self.reflection_record(), self.pivot if self.retries else None,
                                self.retries, self.samples)
        record["retry_same_as_base"] = self.retry_same_as_base(self.retries[0]) if self.retries else None
        return record


@dataclass
class TaskGroup:
    """One task's attempts and the samples made from them (in the order they were made)."""

    task: Task
    attempts: list[Attempt] = field(default_factory=list)
    samples: list[TrainingSample] = field(default_factory=list)

    def add(self, attempt: Attempt, sample: TrainingSample) -> TrainingSample:
        """Attach ``sample`` to ``attempt`` (one of this group's) and to the group."""
        attempt.samples.append(sample)
        self.samples.append(sample)
        return sample

    def to_record(self) -> dict[str, Any]:
        return group_record(self.task, [a.to_record() for a in self.attempts])
