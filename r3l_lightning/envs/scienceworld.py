"""ScienceWorld (Wang et al., 2022): 30 text-game science tasks scored 0–100 by the simulator.

Needs ``pip install scienceworld==1.2.3`` (ships ``scienceworld.jar`` and ``py4j``) and a Java 17
runtime (``apt-get install default-jre-headless``). Nothing is imported from ``scienceworld`` until a
simulator is needed, so this module imports without it.

Design notes (measured on scienceworld 1.2.3; see ``tests/test_env_scienceworld.py``):

* **Simulator access.** We launch the ScienceWorld JVM ourselves through ``py4j.launch_gateway`` (the
  package's ``ScienceWorldEnv`` cannot take JVM options, and its ``step`` always builds the
  valid-action list, which costs 50–340 ms a step against 5–50 ms for the bare step) and drive the
  jar's ``PythonInterface`` directly: ``load`` → ``step`` → ``getScore``/``getCompleted``. The JVM
  options (default ``-Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1``) go on the ``java``
  command line, not into ``JAVA_TOOL_OPTIONS``, so other Java processes are not affected.
* **JVM pool and sessions.** The explorer resets a whole batch of episodes before it closes any, so
  leasing one JVM per episode would either deadlock or need one JVM per episode. Instead an
  environment owns at most ``max_jvms`` JVMs (started lazily, reused across episodes) and every
  episode leases a *session* — its own ``PythonInterface`` object, i.e. its own world — in the
  least-loaded JVM on ``reset`` and gives it back on ``close``. Sessions in one JVM are independent
  (checked: interleaved stepping gives the same transcripts as sequential runs). Each live world
  takes ~10–12 MB of Java heap, so ``-Xmx384m`` holds ~25 concurrent episodes per JVM; raise
  ``-Xmx`` or ``max_jvms`` for bigger batches.
* **Failures.** A gateway error (the JVM died, the connection broke, a call ran past
  ``step_timeout_s``, Java ran out of memory) ends that episode with ``done=True``, reward 0 and
  ``info["error"]``; the JVM is killed and dropped, and the next ``reset`` starts a fresh one.
  Other episodes that had sessions in the same JVM lose them too (they end the same way on their
  next step).
* **Actions.** The response's first non-empty line is the action, with leading ``>``, surrounding
  quotes/backticks, an ``Action:`` prefix and a trailing period removed, whitespace collapsed and
  lower-cased (object names are lower case in ScienceWorld; ``Go To Kitchen`` does not parse).
  A response with no such line, or one the simulator answers with ``No known action matches that
  input.`` / ``Unknown action. …`` / ``ERROR: …`` is invalid: by default the episode ends with reward
  0 and a feedback message (paper §5.1); with ``end_on_invalid_action=False`` the simulator's answer is
  the observation and the episode goes on. An *ambiguous* action (the simulator asks "Please enter
  the number for the action you intended") is resolved when ``resolve_ambiguity`` (default), as
  common ScienceWorld agents do, to the alphabetically first reading — not to entry 0, because the
  menu's order changes from run to run. Readings with identical text (``pick up wood cup (in art
  studio)`` ×3) stay indistinguishable, so such a choice is not reproducible. With
  ``resolve_ambiguity=False`` the menu is the observation and the model may answer with a number.
* **Reward.** The simulator's score (0–100; negative after a failing move such as focusing on the
  wrong object) is in every step's ``info["score"]``. The episode is done when the task is
  completed, the score is negative, or the ``max_turns``-th action was taken; the reward, given
  only then, is ``clamp(score, 0, 100) / 100``.
* **Determinism.** Replaying the same actions reproduces the same world, but object listings
  (``In it, you see: …``) come out in a different order from run to run (the simulator iterates
  hash sets). :meth:`ScienceWorldEpisode.restore` therefore compares observations as multisets of
  words (:func:`canonical_observation`), which ignores ordering but not any change of content.
  The valid-action list is sorted for the same reason; ambiguity menus are handled as above.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import tempfile
import threading
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from r3l_lightning.envs.base import Environment, Episode, GroundedField, StepResult, Task, TaskSource
from r3l_lightning.trajectory import Trajectory

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
DEFAULT_JAVA_OPTIONS = "-Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
MAX_ACTION_CHARS = 300

# Answers of scienceworld.input.InputParser / runtime.pythonapi.PythonInterface (1.2.3) to input they
# cannot turn into an action.
INVALID_ACTION_PREFIXES = ("No known action matches that input", "Unknown action.", "ERROR:")
AMBIGUOUS_PREFIX = "Ambiguous request"

# The simulator's action templates (``getPossibleActions``; ``connect``/``disconnect`` only exist
# without the ``noElectricalAction`` simplification, ``teleport`` only with ``teleportAction``;
# ``easy`` includes both except on electrical tasks). ``reset task`` is deliberately not advertised.
ACTION_TEMPLATES: dict[str, str] = {
    "look around": "describe the current room",
    "look at OBJ": "describe an object",
    "look in OBJ": "describe a container's contents",
    "inventory": "list what you carry",
    "task": "repeat the task description",
    "go to LOC": "move to an adjacent room (its door must be open)",
    "teleport to LOC": "move to any room (available in most tasks)",
    "open OBJ": "open a door or container",
    "close OBJ": "close a door or container",
    "pick up OBJ": "take an object into your inventory",
    "put down OBJ": "drop an object from your inventory",
    "move OBJ to OBJ": "put an object into/onto a container or place",
    "pour OBJ in OBJ": "pour a substance into a container",
    "dunk OBJ in OBJ": "dunk an object in a liquid",
    "mix OBJ": "mix the contents of a container",
    "activate OBJ": "turn on a device (stove, sink, ...)",
    "deactivate OBJ": "turn off a device",
    "use OBJ on OBJ": "use a tool on something (e.g. a thermometer on a substance)",
    "connect OBJ to OBJ": "connect electrical terminals (electrical tasks)",
    "disconnect OBJ": "disconnect an electrical component",
    "read OBJ": "read a book, note or label",
    "eat OBJ": "eat something",
    "flush OBJ": "flush a toilet",
    "focus on OBJ": "declare the object the task is about (focusing on a wrong object fails the task)",
    "wait": "let 10 time steps pass",
    "wait1": "let 1 time step pass",
}


# Any command built from ACTION_TEMPLATES, objects and rooms as lower-case words.
_TEMPLATE_PATTERN = "^(" + "|".join(
    re.escape(t).replace("OBJ", "[a-z0-9][a-z0-9 ]*").replace("LOC", "[a-z0-9][a-z0-9 ]*")
    for t in ACTION_TEMPLATES) + ")$"

# --------------------------------------------------------------------------------------------------
# Helpers


def parse_action(response: str) -> str | None:
    """The action in a model response: its first non-empty line, cleaned; None if there is none."""
    for line in response.splitlines():
        line = line.strip().lstrip(">").strip().strip("`'\"").strip()
        line = re.sub(r"^action\s*:\s*", "", line, flags=re.IGNORECASE).strip().strip("`'\"").strip()
        line = line.rstrip(".").strip()
        if line:
            return " ".join(line.split()).lower()[:MAX_ACTION_CHARS]
    return None


def is_invalid_response(observation: str) -> bool:
    """Whether the simulator's answer says the input was not an action it could carry out."""
    return observation.lstrip().startswith(INVALID_ACTION_PREFIXES)


def canonical_observation(observation: str) -> Counter:
    """Order-free form of an observation (multiset of words) for replay comparisons."""
    return Counter(re.findall(r"[a-z0-9]+(?:[.\-][a-z0-9]+)*", observation.lower()))


class SimulatorError(RuntimeError):
    """The JVM behind a session failed (died, timed out, lost its connection, ran out of memory)."""


def _require_scienceworld():
    try:
        import scienceworld  # noqa: F401
        from scienceworld.constants import BASEPATH, JAR_PATH
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("ScienceWorld needs `pip install scienceworld==1.2.3` and Java 17 "
                          "(`apt-get install default-jre-headless`).") from err
    return BASEPATH, JAR_PATH


# --------------------------------------------------------------------------------------------------
# JVMs


class _JVM:
    """One ScienceWorld JVM behind a py4j gateway. Calls are serialised by a lock."""

    def __init__(self, java_options: str, timeout_s: float) -> None:
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway

        basepath, jar_path = _require_scienceworld()
        port, self.proc = launch_gateway(classpath=jar_path, javaopts=shlex.split(java_options), die_on_exit=True,
                                         cwd=basepath, return_proc=True)
        self.gateway = JavaGateway(
            gateway_parameters=GatewayParameters(auto_field=True, port=port, read_timeout=timeout_s or None),
            java_process=self.proc)
        self.lock = threading.RLock()
        self.sessions = 0
        self.broken = False
        log.info("started ScienceWorld JVM pid %d (%s)", self.proc.pid, java_options)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def call(self, fn: str, target: Any = None, *args: Any) -> Any:
        """``target.fn(*args)`` (a session, or a new session when ``target`` is None) in this JVM."""
        from py4j.protocol import Py4JError, Py4JJavaError

        with self.lock:
            if not self.alive():
                self.broken = True
                raise SimulatorError(f"the ScienceWorld JVM (pid {self.pid}) is not running")
            try:
                if target is None:
                    return self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
                return getattr(target, fn)(*args)
            except Py4JJavaError as err:
                if "OutOfMemoryError" in str(err):
                    self.broken = True
                raise SimulatorError(f"ScienceWorld raised in {fn}: {str(err)[:500]}") from err
            except (Py4JError, OSError) as err:
                self.broken = True
                raise SimulatorError(f"ScienceWorld JVM (pid {self.pid}) failed in {fn}: {err!r}") from err

    def detach(self, session: Any) -> None:
        if self.alive():
            try:
                with self.lock:
                    self.gateway.detach(session)
            except Exception:  # noqa: BLE001 - best effort
                pass

    def shutdown(self) -> None:
        self.broken = True
        try:
            self.gateway.close()
            # py4j's finalizers of our proxies check this flag; without it they try to reconnect to
            # the dead JVM and log connection errors.
            self.gateway._gateway_client.is_connected = False
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass


class _JVMPool:
    """At most ``max_jvms`` JVMs, started lazily; sessions go to an idle or the least-loaded JVM."""

    def __init__(self, max_jvms: int, java_options: str, timeout_s: float) -> None:
        if max_jvms < 1:
            raise ValueError("max_jvms must be >= 1")
        self.max_jvms, self.java_options, self.timeout_s = max_jvms, java_options, timeout_s
        self.jvms: list[_JVM] = []
        self.lock = threading.Lock()

    def lease(self) -> tuple[_JVM, Any]:
        """A new session (a fresh ``PythonInterface``) and the JVM it lives in."""
        with self.lock:
            self._drop_dead()
            idle = [j for j in self.jvms if j.sessions == 0]
            if idle:
                jvm = idle[0]
            elif len(self.jvms) < self.max_jvms:
                jvm = _JVM(self.java_options, self.timeout_s)
                self.jvms.append(jvm)
            else:
                jvm = min(self.jvms, key=lambda j: j.sessions)
            jvm.sessions += 1
        try:
            session = jvm.call("new", None)
        except SimulatorError:
            self.give_back(jvm, None)
            raise
        return jvm, session

    def give_back(self, jvm: _JVM, session: Any) -> None:
        if session is not None:
            jvm.detach(session)
        with self.lock:
            jvm.sessions = max(0, jvm.sessions - 1)
            self._drop_dead()

    def discard(self, jvm: _JVM) -> None:
        """Kill a JVM that failed; the next lease starts a fresh one."""
        jvm.broken = True
        with self.lock:
            self._drop_dead()

    def pids(self) -> list[int]:
        with self.lock:
            return [j.pid for j in self.jvms if j.alive()]

    def close(self) -> None:
        with self.lock:
            jvms, self.jvms = self.jvms, []
        for jvm in jvms:
            jvm.shutdown()

    def _drop_dead(self) -> None:
        for jvm in [j for j in self.jvms if not j.alive()]:
            log.warning("discarding ScienceWorld JVM pid %d", jvm.pid)
            jvm.shutdown()
            self.jvms.remove(jvm)


# --------------------------------------------------------------------------------------------------
# Tasks


_VARIATIONS: dict[str, dict[str, list[int]]] | None = None
_VARIATIONS_LOCK = threading.Lock()


def _cache_path() -> Path:
    import scienceworld

    root = os.environ.get("R3L_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "r3l_lightning")
    return Path(root) / f"scienceworld-{scienceworld.__version__}-variations.json"


def scienceworld_variations() -> dict[str, dict[str, list[int]]]:
    """``{task_name: {"train"|"dev"|"test": [variation, ...]}}`` in the simulator's task order.

    Asked from the simulator once (a JVM, ~5 s), then cached in the process and in
    ``$R3L_CACHE_DIR`` (default ``~/.cache/r3l_lightning``) keyed by the scienceworld version and jar.
    """
    global _VARIATIONS
    with _VARIATIONS_LOCK:
        if _VARIATIONS is not None:
            return _VARIATIONS
        _, jar_path = _require_scienceworld()
        key = {"jar_size": os.path.getsize(jar_path)}
        path = _cache_path()
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                _VARIATIONS = data["tasks"]
                return _VARIATIONS
        except (OSError, ValueError, KeyError):
            pass
        tasks = _enumerate_variations()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump({"key": key, "tasks": tasks}, f)
            os.replace(f.name, path)
        except OSError as err:
            log.warning("could not cache ScienceWorld variations at %s: %s", path, err)
        _VARIATIONS = tasks
        return tasks


def _enumerate_variations() -> dict[str, dict[str, list[int]]]:
    jvm = _JVM(DEFAULT_JAVA_OPTIONS, 120.0)
    try:
        session = jvm.call("new", None)
        tasks: dict[str, dict[str, list[int]]] = {}
        for name in jvm.call("getTaskNames", session):
            jvm.call("load", session, name, 0, "", False)
            tasks[str(name)] = {
                "train": [int(v) for v in jvm.call("getVariationsTrain", session)],
                "dev": [int(v) for v in jvm.call("getVariationsDev", session)],
                "test": [int(v) for v in jvm.call("getVariationsTest", session)],
            }
        return tasks
    finally:
        jvm.shutdown()


class ScienceWorldTasks(TaskSource):
    """(task, variation) pairs of one split, in a seeded random order.

    ``task_names`` filters by simulator name (``"boil"``, ``"find-animal"``, ...; ids like ``"1-1"`` and
    the paper's names are accepted too). Payload: ``{"task_name", "variation", "simplification"}``.
    """

    def __init__(self, split: Literal["train", "dev", "test"] = "train", task_names: list[str] | None = None,
                 limit: int | None = None, seed: int = 0, simplification: str = "easy") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        variations = scienceworld_variations()
        if task_names is None:
            names = list(variations)
        else:
            from scienceworld.utils import infer_task

            names = []
            for name in task_names:
                resolved = infer_task(name)
                if resolved not in variations:
                    raise ValueError(f"unknown ScienceWorld task {name!r}; valid names: {', '.join(variations)}")
                if resolved not in names:
                    names.append(resolved)
            names.sort(key=list(variations).index)
        pairs = [(name, v) for name in names for v in variations[name][split]]
        random.Random(seed).shuffle(pairs)
        if limit is not None:
            pairs = pairs[:limit]
        self.split, self.seed, self.simplification = split, seed, simplification
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Task:
        if not -len(self.pairs) <= index < len(self.pairs):
            raise IndexError(f"task {index} out of range [0, {len(self.pairs)})")
        name, variation = self.pairs[index]
        return Task(f"sciworld-{name}-{variation}",
                    {"task_name": name, "variation": variation, "simplification": self.simplification})


# --------------------------------------------------------------------------------------------------
# Episodes


class ScienceWorldEpisode(Episode):
    def __init__(self, env: ScienceWorldEnv, task: Task) -> None:
        self.env, self.task = env, task
        self.max_turns = env.max_turns
        self.show_valid_actions = env.show_valid_actions
        self.end_on_invalid_action = env.end_on_invalid_action
        self.resolve_ambiguity = env.resolve_ambiguity
        self._jvm: _JVM | None = None
        self._session: Any = None
        self._clear()

    # -- lifecycle

    def _clear(self) -> None:
        self.turns = 0
        self.score = 0
        self.completed = False
        self.done = False
        self.reward = 0.0
        self.last_observation = ""
        self.task_description = ""
        self.end_reason = ""
        self.valid_actions: list[str] | None = None  # listed in the last observation (show_valid_actions)

    def _lease(self) -> None:
        if self._jvm is not None and not self._jvm.alive():
            self._release()
        if self._jvm is None:
            self._jvm, self._session = self.env._pool.lease()

    def _release(self) -> None:
        if self._jvm is not None:
            self.env._pool.give_back(self._jvm, self._session)
        self._jvm, self._session = None, None

    def _call(self, fn: str, *args: Any) -> Any:
        return self._jvm.call(fn, self._session, *args)

    def reset(self) -> str:
        """Load the task (a fresh world) and look around. A dead JVM is replaced once; then it raises."""
        self._clear()
        p = self.task.payload
        load_args = (p["task_name"], int(p["variation"]), p.get("simplification", "easy"), False)
        for attempt in range(2):
            self._lease()
            try:
                message = self._call("load", *load_args)
                if message and str(message).startswith("ERROR"):
                    raise ValueError(f"ScienceWorld cannot load {self.task.task_id}: {message}")
                observation = str(self._call("step", "look around"))
                self.task_description = str(self._call("getTaskDescription"))
                self.score = self._read_score()
                break
            except SimulatorError:
                jvm = self._jvm
                self._release()
                if jvm.broken:
                    self.env._pool.discard(jvm)
                if attempt == 1:
                    raise
        self.last_observation = observation
        return self._format(f"{self.task_description}\n\n{observation}")

    def close(self) -> None:
        self._release()

    # -- stepping

    def _read_score(self) -> int:
        return int(round(100 * float(self._call("getScore"))))

    def _format(self, observation: str) -> str:
        if not self.show_valid_actions:
            return observation
        self.valid_actions = sorted({str(a) for a in self._call("getValidActionObjectCombinations")})
        return f"{observation}\n\nValid actions: {', '.join(self.valid_actions)}"

    def admissible_actions(self) -> list[str] | None:
        """The valid actions listed in the current observation (``show_valid_actions``), else None."""
        return None if self.done else self.valid_actions

    def _finish(self, observation: str, reward: float, info: dict[str, Any], reason: str) -> StepResult:
        self.done, self.reward, self.end_reason = True, reward, reason
        self.last_observation = observation
        return StepResult(observation, reward, True, info)

    def step(self, action: str) -> StepResult:
        if self.done:
            return StepResult("The episode is over.", 0.0, True, {"error": "step after the episode ended"})
        if self._jvm is None:
            return self._finish("The episode was not started.", 0.0, {"error": "step before reset"}, "error")
        self.turns += 1
        command = parse_action(action)
        info: dict[str, Any] = {"action": command, "score": self.score}
        if command is None:
            text = "Your response contained no action. Reply with one action, such as: look around"
            info["invalid_action"] = True
            if self.end_on_invalid_action:
                return self._finish(f"Invalid response: {text}", 0.0, info, "invalid")
            return self._continue(text, info)
        try:
            text = str(self._call("step", command))
            if self.resolve_ambiguity and text.lstrip().startswith(AMBIGUOUS_PREFIX):
                # The menu's order changes from run to run: pick the alphabetically first reading.
                options = [(o.strip(), n) for n, o in re.findall(r"^(\d+):\s*(.+)$", text, flags=re.MULTILINE)]
                choice, number = min(options) if options else (None, "0")
                info["ambiguity_resolved"] = choice
                text = str(self._call("step", number))
            self.score = self._read_score()
            self.completed = bool(self._call("getCompleted"))
            if is_invalid_response(text):
                info["invalid_action"] = True
                if self.end_on_invalid_action:
                    info["score"] = self.score
                    return self._finish(f"Invalid action {command!r}: {text.strip()}", 0.0, info, "invalid")
            info["score"] = self.score
            info["completed"] = self.completed
            if self.completed or self.score < 0 or self.turns >= self.max_turns:
                reason = "completed" if self.completed else "failed" if self.score < 0 else "max_turns"
                return self._finish(text, max(0, min(100, self.score)) / 100.0, info, reason)
            return self._continue(text, info)
        except SimulatorError as err:
            jvm = self._jvm
            self._release()
            if jvm is not None and jvm.broken:
                self.env._pool.discard(jvm)
            info["error"] = str(err)
            return self._finish(f"The simulator failed: {err}", 0.0, info, "error")

    def _continue(self, text: str, info: dict[str, Any]) -> StepResult:
        self.last_observation = text
        if self.turns >= self.max_turns:
            return self._finish(text, max(0, min(100, self.score)) / 100.0, info, "max_turns")
        return StepResult(self._format(text), 0.0, False, info)

    # -- outcome

    def feedback(self) -> str:
        outcome = {
            "completed": "The task was completed.",
            "failed": "The task failed: a wrong move (e.g. focusing on the wrong object) ended it.",
            "invalid": "The episode ended because the last action was invalid.",
            "max_turns": f"The turn limit ({self.max_turns}) was reached before the task was completed.",
            "error": "The simulator failed; the episode was aborted.",
        }.get(self.end_reason, "The task was not completed.")
        return (f"{outcome} Final score: {self.score}/100 (reward {self.reward:.2f}). "
                f"Task completed: {'yes' if self.completed else 'no'}.\n"
                f"Last observation: {self.last_observation.strip()}")

    def restore(self, actions: list[str], observations: list[str]) -> bool:
        """Reset + replay, comparing observations up to the order of listed objects (see module doc)."""
        if canonical_observation(self.reset()) != canonical_observation(observations[0]):
            return False
        for i, action in enumerate(actions):
            result = self.step(action)
            if result.done or canonical_observation(result.observation) != canonical_observation(observations[i + 1]):
                return False
        return True


# --------------------------------------------------------------------------------------------------
# Environment


class ScienceWorldEnv(Environment):
    """ScienceWorld episodes on a small pool of reused JVMs (see the module docstring)."""

    def __init__(self, max_turns: int = 30, show_valid_actions: bool = False, max_jvms: int = 2,
                 step_timeout_s: float = 30.0, java_options: str = DEFAULT_JAVA_OPTIONS,
                 end_on_invalid_action: bool = True, resolve_ambiguity: bool = True) -> None:
        self.max_turns = max_turns
        self.show_valid_actions = show_valid_actions
        self.end_on_invalid_action = end_on_invalid_action
        self.resolve_ambiguity = resolve_ambiguity
        self.step_timeout_s = step_timeout_s
        self._pool = _JVMPool(max_jvms, java_options, step_timeout_s)
        self._gold_cache: dict[str, list[str]] = {}
        self._finalizer = weakref.finalize(self, _JVMPool.close, self._pool)

    def system_prompt(self) -> str:
        templates = "\n".join(f"- {t}: {d}" for t, d in ACTION_TEMPLATES.items())
        return (
            "You are an agent in ScienceWorld, a text-based science simulator with rooms (kitchen, "
            "workshop, greenhouse, ...), objects, substances and devices. You receive the task and what you "
            "observe; you act by typing commands.\n"
            "Respond with exactly ONE action per turn, on a single line, with nothing else (no explanation, "
            "no numbering). Use the object names exactly as they appear in the observations; OBJ is an "
            "object and LOC a room.\n"
            f"Available action templates:\n{templates}\n"
            "Examples: look around | open door to kitchen | go to kitchen | pick up thermometer | "
            "move thermometer to orange box | focus on green paint\n"
            "An action the simulator cannot understand ends the episode with no reward. The score (0–100) "
            "counts progress on the task; the episode ends when the task is done or after "
            f"{self.max_turns} actions."
        )

    def make_episode(self, task: Task) -> ScienceWorldEpisode:
        return ScienceWorldEpisode(self, task)

    def grounded_fields(self, task: Task, trajectory: Trajectory) -> list[GroundedField]:
        """``corrected_action``: the action to take at the pivot step instead of the agent's; one of the valid
        actions listed at that step (``show_valid_actions``), otherwise any command of the action templates."""
        listed = trajectory.info.get("admissible") or []
        if len(listed) >= trajectory.num_turns and all(listed[: trajectory.num_turns]):
            schemas = tuple({"type": "string", "enum": list(actions)} for actions in listed[: trajectory.num_turns])
        else:
            schemas = ({"type": "string", "pattern": _TEMPLATE_PATTERN},)
        return [GroundedField("corrected_action", "the action to take at that step instead of the agent's",
                              schemas, "At step {step}, take this action: {value}")]

    def reference_report(self, task: Task, trajectory: Trajectory) -> dict | None:
        """A report from the simulator's gold action sequence: the pivot is the first step where the agent's action
        left the gold path, the corrected action is the gold one, and the suggestion gives the gold actions from
        there. None for a completed trajectory, one that followed the gold path throughout, or a task whose gold
        sequence cannot be generated."""
        if trajectory.reward >= 1 or trajectory.num_turns == 0:
            return None
        try:
            gold = self._gold(task)
        except (SimulatorError, ValueError) as err:
            log.warning("no gold path for %s: %r", task.task_id, err)
            return None
        taken = [parse_action(a) or "" for a in trajectory.actions]
        pivot = next((k for k, (a, g) in enumerate(zip(taken, gold)) if a != g), None)
        if pivot is None or pivot >= trajectory.num_turns:
            return None
        plan = "; ".join(gold[pivot : pivot + 6]) + ("; ..." if len(gold) > pivot + 6 else "")
        return {
            "trajectory_summary": (f"The agent took {trajectory.num_turns} actions and ended with reward "
                                   f"{trajectory.reward:g}; its first {pivot} actions follow a solution."),
            "root_cause_analysis": (f"At step {pivot} the agent did {taken[pivot]!r}, which leaves the solution: "
                                    f"the task needed {gold[pivot]!r} next."),
            "trajectory_outcome": "failure",
            "improvement_suggestion": f"From step {pivot}, act: {plan}",
            "retry_from_step": pivot,
            "corrected_action": gold[pivot],
        }

    def _gold(self, task: Task) -> list[str]:
        if task.task_id not in self._gold_cache:
            self._gold_cache[task.task_id] = self.gold_actions(task)
        return self._gold_cache[task.task_id]

    def gold_actions(self, task: Task) -> list[str]:
        """The simulator's gold action sequence for ``task`` (generation can take seconds; it is
        subject to ``step_timeout_s``)."""
        p = task.payload
        jvm, session = self._pool.lease()
        try:
            jvm.call("load", session, p["task_name"], int(p["variation"]), p.get("simplification", "easy"), True)
            return [str(a) for a in jvm.call("getGoldActionSequence", session)]
        except SimulatorError:
            if jvm.broken:
                self._pool.discard(jvm)
            raise
        finally:
            self._pool.give_back(jvm, session)

    def jvm_pids(self) -> list[int]:
        """Process ids of the live JVMs (for monitoring)."""
        return self._pool.pids()

    def close(self) -> None:
        """Stop all JVMs (a later episode starts new ones)."""
        self._pool.close()
