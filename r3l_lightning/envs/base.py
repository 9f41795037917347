"""The environment protocol: text in, text out, a terminal reward in [0, 1]."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.trajectory import Trajectory


@dataclass
class Task:
    """One task instance. ``payload`` is environment-specific (numbers/target, question/answer, ...)."""

    task_id: str
    payload: dict[str, Any]


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GroundedField:
    """A report field an environment adds to the reflection schema (``reflection_schema: grounded``), whose
    value a retry can act on: the equation to try, the corrected action at the pivot, the corrected value.

    ``schemas`` is the JSON schema of the value: one entry for every pivot, or one per step of the trajectory
    (entry k applies when the report's ``retry_from_step`` is k, e.g. the admissible actions at step k).
    ``description`` tells the reflector what to write (outside the JSON, so there is no placeholder to copy);
    ``guidance`` is the line the retry's guidance gains, with ``{value}`` and ``{step}`` filled in.
    """

    name: str
    description: str
    schemas: tuple[dict, ...]
    guidance: str

    def schema_at(self, step: int) -> dict:
        return self.schemas[0] if len(self.schemas) == 1 else self.schemas[step]


class Episode(ABC):
    """One running episode of one task (owns the simulator state)."""

    @abstractmethod
    def reset(self) -> str:
        """Start (or restart) the episode; returns the first observation."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply the assistant's response text. Invalid responses are handled inside, never raised."""

    @abstractmethod
    def feedback(self) -> str:
        """The final outcome text shown to the reflection (after ``done``)."""

    def admissible_actions(self) -> list[str] | None:
        """The actions the environment accepts now, where it lists them (ALFWorld's admissible commands); None
        when any text is an action. Recorded per turn in ``trajectory.info["admissible"]`` for grounded fields."""
        return None

    def reflection_hint(self) -> str:
        """Extra, environment-specific context for the reflection (e.g. the reference final answer)."""
        return ""

    def close(self) -> None:
        """Release resources (simulator processes)."""

    def restore(self, actions: list[str], observations: list[str]) -> bool:
        """Restore the state after ``actions`` by reset + replay.

        ``observations[i]`` is the observation seen before action i (``observations[0]`` is the
        first observation; one more than ``actions``). Returns False when the replayed observations
        differ (the environment is not deterministic): the caller skips the retry and counts it.
        """
        if self.reset() != observations[0]:
            return False
        for i, action in enumerate(actions):
            result = self.step(action)
            if result.done or result.observation != observations[i + 1]:
                return False
        return True


class Environment(ABC):
    """A family of tasks with shared rules: system prompt, turn limit, and episodes.

    ``step_timeout_s``: a reset or step that takes longer ends its episode with reward 0 (counted);
    ``None`` waits forever (environments that enforce their own timeout, like ScienceWorld's).
    ``max_reward``: the reward of a solved task (a reflection on a trajectory below it may not call it a
    success; see :func:`~r3l_lightning.explore.reflection.report_schema`).
    """

    max_turns: int = 1
    step_timeout_s: float | None = None
    max_reward: float = 1.0

    @abstractmethod
    def system_prompt(self) -> str:
        """System message of every episode."""

    @abstractmethod
    def make_episode(self, task: Task) -> Episode:
        """A fresh episode for ``task`` (not yet reset)."""

    def response_constraint(self, task: Task) -> Constraint | None:
        """A grammar every response of an episode of ``task`` is decoded under, in training and evaluation
        alike (``None``, the default: free text)."""
        return None

    def grounded_fields(self, task: Task, trajectory: Trajectory) -> list[GroundedField]:
        """Fields the reflection on ``trajectory`` gains under ``reflection_schema: grounded`` (none by default)."""
        return []

    def reference_report(self, task: Task, trajectory: Trajectory) -> dict | None:
        """The reflection report on ``trajectory`` written from the task's known solution, for the ``reference``
        reflector: every field of the paper's schema, and the values of :meth:`grounded_fields`; ``None`` when
        this environment (or this task) knows no solution, or the trajectory needs no retry."""
        return None


class TaskSource(ABC):
    """An indexable collection of tasks (generated or loaded)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Task: ...
