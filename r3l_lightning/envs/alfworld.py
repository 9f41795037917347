"""ALFWorld (text) on the real TextWorld PDDL engine with ALFWorld's domain and grammar.

Games come from either

* ``source="directory"``: the official ALFWorld games (``alfworld-download``), a directory in
  ALFWorld's layout ``<data_dir>/<split>/<task-folder>/<trial>/game.tw-pddl`` (+ ``traj_data.json``),
  splits ``train`` / ``valid_seen`` / ``valid_unseen``; or
* ``source="generated"``: games generated offline from the data inside the alfworld wheel
  (:mod:`r3l_lightning.envs.alfworld_games`), cached under ``$R3L_CACHE/alfworld/<split>-<seed>/``
  in the same layout, so one loader serves both.

IMPORTANT: generated games are NOT the official ALFWorld benchmark split. Every number reported on
them must say so; :data:`GENERATED_GAMES_DISCLAIMER` holds the sentence to print.

Rules (paper §5.1 Experimental Setup and the appendix's implementation details): reward 1 when the
game is won, else 0; at most ``max_turns`` (25) actions; the action is the first non-empty line of
the response; an action that is not one of the admissible commands ends the episode with reward 0
("invalid action") when ``end_on_invalid_action``, else the game answers "Nothing happens." and the
episode goes on.
"""

from __future__ import annotations

import json
import os
import random
import weakref
from pathlib import Path
from typing import Any, Literal

from r3l_lightning.envs.alfworld_games import (
    GAME_FILE,
    GENERATED_GAMES_DISCLAIMER,
    MANIFEST_FILE,
    OFFICIAL_TO_SHORT,
    TASK_TYPES,
    TRAJ_FILE,
    ENGINE_POOL,
    engine_guard,
    ensure_generated,
    normalize_task_type,
)
from r3l_lightning.envs.base import Environment, Episode, GroundedField, StepResult, Task, TaskSource
from r3l_lightning.trajectory import Trajectory

__all__ = [
    "ALFWORLD_SYSTEM_PROMPT",
    "GENERATED_GAMES_DISCLAIMER",
    "TASK_TYPES",
    "AlfWorldEnv",
    "AlfWorldEpisode",
    "AlfWorldTasks",
    "alfworld_available",
    "parse_action",
]

EXPECTED_LAYOUT = (
    "expected ALFWorld's layout <data_dir>/<split>/<task-folder>/<trial>/game.tw-pddl (+ traj_data.json), "
    "e.g. data_dir=$ALFWORLD_DATA/json_2.1.1 with splits train / valid_seen / valid_unseen"
)
INVALID_ACTION_OBSERVATION = "Invalid action: {action!r} is not one of the admissible actions. The episode is over."
NOTHING_HAPPENS = "Nothing happens."
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"

ALFWORLD_SYSTEM_PROMPT = (
    "You are an agent in a simulated household, interacting with it through text. Each observation "
    "describes what you see and ends with your task (e.g. \"Your task is to: put a clean mug in "
    "coffeemachine.\") and the list of admissible actions. Solve the task in as few steps as "
    "possible.\n"
    "Actions look like: go to <receptacle>, open <receptacle>, close <receptacle>, "
    "take <object> from <receptacle>, move <object> to <receptacle>, examine <something>, "
    "use <object>, heat <object> with <receptacle>, cool <object> with <receptacle>, "
    "clean <object> with <receptacle>, inventory, look.\n"
    "Reply with exactly ONE action per response, copied verbatim from the admissible actions, on the "
    "first line and nothing else. An action that is not admissible ends the episode as a failure. "
    "You have at most {max_turns} actions."
)


def alfworld_available() -> bool:
    """True when alfworld and textworld's PDDL engine (fast-downward) are importable."""
    try:
        import alfworld.agents.environment.alfred_tw_env  # noqa: F401, PLC0415
        import fast_downward  # noqa: F401, PLC0415
        import textworld.envs.pddl  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001
        return False
    return True


def parse_action(response: str) -> str:
    """The first non-empty line of the response, stripped."""
    for line in response.splitlines():
        if line.strip():
            return line.strip()
    return ""


# ------------------------------------------------------------------------------------- tasks


def _task_type_of(game_dir: Path) -> str | None:
    traj = game_dir / TRAJ_FILE
    if traj.exists():
        try:
            official = json.loads(traj.read_text())["task_type"]
        except (OSError, ValueError, KeyError):
            official = None
        if official is not None:
            return OFFICIAL_TO_SHORT.get(official, official)
    official = game_dir.parent.name.split("-", 1)[0]
    return OFFICIAL_TO_SHORT.get(official, official)


def scan_games(split_dir: Path, task_types: list[str] | None = None) -> list[tuple[Path, str]]:
    """``(game file, short task type)`` of every playable game under ``split_dir``, sorted.

    Follows ALFWorld's loader: games with movable receptacles or sliced objects are skipped, and so
    are games whose file says ``"solvable": false``.
    """
    wanted = None if task_types is None else {normalize_task_type(t) for t in task_types}
    found = []
    for game in sorted(split_dir.rglob(GAME_FILE)):
        rel = str(game.relative_to(split_dir))
        if "movable" in rel or "Sliced" in rel:
            continue
        task_type = _task_type_of(game.parent)
        if wanted is not None and task_type not in wanted:
            continue
        try:
            text = game.read_text()
        except OSError:
            continue
        if '"solvable": false' in text:
            continue
        found.append((game, task_type))
    return found


class AlfWorldTasks(TaskSource):
    """ALFWorld games, official (``source="directory"``) or generated offline (``"generated"``).

    ``num_games`` <= 0 means all games of a directory; when a directory holds more games than
    ``num_games``, a ``seed``-ed random subset is used. Generated games: game i has task type
    ``task_types[i % len(task_types)]`` and is a pure function of (split, seed, i); different splits
    or seeds give disjoint games. Generated games are NOT the official benchmark split
    (:data:`GENERATED_GAMES_DISCLAIMER`).
    """

    def __init__(
        self,
        source: Literal["generated", "directory"] = "generated",
        data_dir: str | None = None,
        split: str = "train",
        num_games: int = 64,
        seed: int = 0,
        task_types: list[str] | None = None,
    ) -> None:
        self.source = source
        self.split = split
        self.seed = seed
        self.task_types = None if task_types is None else [normalize_task_type(t) for t in task_types]
        if source == "generated":
            if num_games <= 0:
                raise ValueError("num_games must be positive for generated ALFWorld games")
            self.root = ensure_generated(split, seed, num_games, self.task_types)
            manifest = json.loads((self.root / MANIFEST_FILE).read_text())
            games = [(self.root / rel / GAME_FILE, None) for rel in manifest["games"][:num_games]]
            self.games = [(path, _task_type_of(path.parent)) for path, _ in games]
            self.disclaimer: str | None = GENERATED_GAMES_DISCLAIMER
        elif source == "directory":
            if not data_dir:
                raise ValueError(f"source='directory' needs data_dir ({EXPECTED_LAYOUT})")
            self.root = Path(os.path.expandvars(str(data_dir))).expanduser()
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise FileNotFoundError(f"ALFWorld split directory {split_dir} does not exist; {EXPECTED_LAYOUT}")
            games = scan_games(split_dir, self.task_types)
            if not games:
                raise FileNotFoundError(
                    f"no playable ALFWorld games ({GAME_FILE}) found under {split_dir}"
                    + (f" for task types {self.task_types}" if self.task_types else "") + f"; {EXPECTED_LAYOUT}")
            if 0 < num_games < len(games):
                games = sorted(random.Random(seed).sample(games, num_games))
            self.games = games
            self.disclaimer = None
        else:
            raise ValueError(f"unknown ALFWorld source {source!r}; expected 'generated' or 'directory'")

    def __len__(self) -> int:
        return len(self.games)

    def __getitem__(self, index: int) -> Task:
        path, task_type = self.games[index]
        rel = path.parent.relative_to(self.root)  # <split>/<task-folder>/<trial>
        return Task(
            task_id=f"alfworld/{rel.as_posix()}",
            payload={"game_file": str(path), "task_type": task_type, "split": self.split, "source": self.source},
        )


# ----------------------------------------------------------------------------------- episodes


class AlfWorldEpisode(Episode):
    """One game on the TextWorld PDDL engine (an engine leased from :data:`ENGINE_POOL` until ``close``)."""

    def __init__(self, task: Task, env: AlfWorldEnv) -> None:
        self.task = task
        self.env = env
        self._engine = None
        self._finalizer = None
        self.goal = ""
        self._reset_state()

    def _reset_state(self) -> None:
        self.turns = 0
        self.done = False
        self.won = False
        self.outcome = "not started"
        self.last_text = ""
        self.admissible: list[str] = []
        self.actions: list[str] = []

    def _format(self, text: str) -> str:
        if self.env.show_admissible_commands and self.admissible:
            return f"{text}\n\nAdmissible actions: {', '.join(self.admissible)}"
        return text

    def reset(self) -> str:
        if self._engine is None:
            self._engine = ENGINE_POOL.acquire()
            self._finalizer = weakref.finalize(self, ENGINE_POOL.release, self._engine)
            with engine_guard():
                self._engine.load(self.task.payload["game_file"])
        with engine_guard():
            state = self._engine.reset()
        self._reset_state()
        text = state["feedback"].replace(_BANNER, "").strip()
        if "Your task is to:" in text:
            self.goal = text.split("Your task is to:", 1)[1].strip()
        self.admissible = list(state["admissible_commands"])
        self.last_text = text
        self.outcome = "running"
        return self._format(text)

    def step(self, action: str) -> StepResult:
        if self._engine is None:
            raise RuntimeError("reset() the episode before step()")
        if self.done:
            return StepResult("The episode is over.", 0.0, True, {"outcome": self.outcome})
        command = parse_action(action)
        self.turns += 1
        self.actions.append(command)
        info: dict[str, Any] = {"action": command, "turn": self.turns}
        if command not in self.admissible:
            info["invalid_action"] = True
            if self.env.end_on_invalid_action:
                self.done = True
                self.outcome = "invalid action"
                self.last_text = INVALID_ACTION_OBSERVATION.format(action=command)
                info["outcome"] = self.outcome
                return StepResult(self.last_text, 0.0, True, info)
            text = NOTHING_HAPPENS
        else:
            state, _, _ = self._engine.step(command)
            text = state["feedback"].strip()
            self.admissible = list(state["admissible_commands"])
            self.won = bool(state["won"])
        self.last_text = text
        if self.won:
            self.done, self.outcome = True, "success"
        elif self.turns >= self.env.max_turns:
            self.done, self.outcome = True, "turn limit"
        if self.done:
            info["outcome"] = self.outcome
        return StepResult(self._format(text), 1.0 if self.won else 0.0, self.done, info)

    def admissible_actions(self) -> list[str] | None:
        """The engine's admissible commands in the current state."""
        return None if self.done else list(self.admissible)

    def feedback(self) -> str:
        if self.outcome == "success":
            head = f"Success: the task was completed in {self.turns} steps (reward 1)."
        elif self.outcome == "invalid action":
            head = (f"Failure (reward 0): at step {self.turns} the action {self.actions[-1]!r} was not one of the "
                    "admissible actions (invalid action), which ended the episode.")
        elif self.outcome == "turn limit":
            head = f"Failure (reward 0): the task was not completed within {self.env.max_turns} steps."
        else:
            head = f"The episode is not finished ({self.turns} steps so far)."
        lines = [head]
        if self.goal:
            lines.append(f"Task: {self.goal}")
        lines.append(f"Steps taken: {self.turns}")
        lines.append(f"Last observation: {self.last_text}")
        return "\n".join(lines)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # gives the engine back to the pool, once
        self._engine = None
        self._finalizer = None


class AlfWorldEnv(Environment):
    """ALFWorld text environment (paper §5.1: 25 turns, reward 1 on goal, invalid action ends)."""

    def __init__(self, max_turns: int = 25, show_admissible_commands: bool = True,
                 end_on_invalid_action: bool = True) -> None:
        self.max_turns = max_turns
        self.show_admissible_commands = show_admissible_commands
        self.end_on_invalid_action = end_on_invalid_action

    def system_prompt(self) -> str:
        return ALFWORLD_SYSTEM_PROMPT.format(max_turns=self.max_turns)

    def make_episode(self, task: Task) -> AlfWorldEpisode:
        return AlfWorldEpisode(task, self)

    def grounded_fields(self, task: Task, trajectory: Trajectory) -> list[GroundedField]:
        """``corrected_action``: the action to take at the pivot step instead of the agent's, one of the engine's
        admissible commands at that step."""
        listed = (trajectory.info.get("admissible") or [])[: trajectory.num_turns]
        if len(listed) < trajectory.num_turns or not all(listed):
            return []  # a trajectory without its admissible commands (replayed, or recorded before them)
        return [GroundedField("corrected_action", "the admissible action to take at that step instead of the agent's",
                              tuple({"type": "string", "enum": list(a)} for a in listed),
                              "At step {step}, take this action: {value}")]

    def reference_report(self, task: Task, trajectory: Trajectory) -> dict | None:
        """A report from the game's walkthrough (the expert plan stored in the game file; generated games always
        have one): the pivot is the first step where the agent's command left the plan. None for a won
        trajectory, a game without a walkthrough, or one that followed the plan throughout."""
        if trajectory.reward >= 1 or trajectory.num_turns == 0:
            return None
        plan = _walkthrough(task.payload["game_file"])
        taken = [parse_action(a) for a in trajectory.actions]
        pivot = next((k for k, (a, g) in enumerate(zip(taken, plan)) if a != g), None)
        if pivot is None or pivot >= trajectory.num_turns:
            return None
        rest = "; ".join(plan[pivot : pivot + 6]) + ("; ..." if len(plan) > pivot + 6 else "")
        return {
            "trajectory_summary": (f"The agent took {trajectory.num_turns} actions without completing the task; "
                                   f"its first {pivot} actions follow a solution."),
            "root_cause_analysis": (f"At step {pivot} the agent did {taken[pivot]!r}, which leaves the solution: "
                                    f"the task needed {plan[pivot]!r} next."),
            "trajectory_outcome": "failure",
            "improvement_suggestion": f"From step {pivot}, act: {rest}",
            "retry_from_step": pivot,
            "corrected_action": plan[pivot],
        }


def _walkthrough(game_file: str) -> list[str]:
    """The expert plan of a game file (its ``walkthrough``), or [] when it has none."""
    try:
        return [str(c) for c in json.loads(Path(game_file).read_text()).get("walkthrough") or []]
    except (OSError, ValueError):
        return []

