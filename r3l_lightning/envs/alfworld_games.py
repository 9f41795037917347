"""Offline generation of ALFWorld text games (``game.tw-pddl``) from data shipped in the alfworld wheel.

NOTE: generated games are NOT the official ALFWorld benchmark split; numbers measured on them are
not comparable to published ALFWorld results (see :data:`GENERATED_GAMES_DISCLAIMER`).

What the alfworld wheel ships and what is used here:

* ``alfworld/data/alfred.pddl`` -- the PDDL domain (actions, predicates) played by TextWorld's PDDL
  engine (fast-downward);
* ``alfworld/data/alfred.twl2`` -- the text grammar (observations, command templates); its
  ``UNKNOWN GOAL`` placeholder is replaced by the task description, as ``alfworld-generate`` does;
* ``alfworld/gen/goal_library.py`` -- the PDDL goal and the text templates of each task type;
* ``alfworld/gen/constants.py`` -- object / receptacle classes, which receptacle can hold which
  object (``VAL_RECEPTACLE_OBJECTS``), which object can be cleaned / heated / cooled / toggled;
* ``alfworld/gen/layouts/FloorPlan*-{objects,openable,layout}`` -- per AI2-THOR scene: the object
  classes present, the receptacle instances with the agent pose in front of each one, and the
  reachable floor points.

A generated problem places every receptacle of a scene at its own location (the real instance ids
and poses from ``*-openable.json``; receptacle classes of the scene missing from that file, e.g.
stove burners, get synthetic ids), scatters 1-3 instances of each portable object class of the
scene into receptacles that can hold them, picks a goal of the requested task type that is not
already satisfied, and writes a ``game.tw-pddl`` JSON (``pddl_domain``, ``grammar``,
``pddl_problem``, ``solvable``, ``walkthrough``) plus a ``traj_data.json`` in ALFWorld's directory
layout. Every game is verified before it is written: the engine's planner (fast-downward
``replan``) produces a walkthrough, and replaying it in the real engine must win within the step
budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATED_GAMES_DISCLAIMER = (
    "These ALFWorld games were generated offline from the layouts, PDDL domain, grammar and goal "
    "library shipped in the alfworld package; they are NOT the official ALFWorld benchmark split "
    "(e.g. valid_seen / valid_unseen), so results on them are not comparable to published "
    "ALFWorld numbers."
)

# Short names (used by this project) -> ALFWorld's task-type names (used in traj_data.json).
TASK_TYPES: dict[str, str] = {
    "pick_and_place": "pick_and_place_simple",
    "pick_clean_then_place": "pick_clean_then_place_in_recep",
    "pick_heat_then_place": "pick_heat_then_place_in_recep",
    "pick_cool_then_place": "pick_cool_then_place_in_recep",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_two_obj_and_place": "pick_two_obj_and_place",
}
OFFICIAL_TO_SHORT = {v: k for k, v in TASK_TYPES.items()}

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
MANIFEST_FILE = "r3l_manifest.json"
GENERATOR_VERSION = 1
MAX_WALKTHROUGH_STEPS = 20  # leave slack below the 25-turn limit
MAX_DISTRACTOR_CLASSES = 8

_LAMPS = ("DeskLamp", "FloorLamp")
_LAMP_HOLDERS = ("SideTable", "Desk", "Dresser", "CoffeeTable", "TVStand", "DiningTable", "Shelf",
                 "ArmChair", "Sofa", "Bed", "Ottoman")
# Receptacle classes of which a scene usually has several instances (for synthetic instances).
_MULTI_INSTANCE = {"StoveBurner": (4, 4), "Drawer": (1, 3), "Shelf": (1, 3), "Cabinet": (1, 4)}

# Goal receptacles that would undo the required state change (e.g. a hot apple into the fridge).
_CONTRADICTORY = {"pick_heat_then_place": ("Fridge",), "pick_cool_then_place": ("Microwave", "StoveBurner")}

_ENGINE_LOCK = threading.RLock()  # fast-downward's translator uses module globals and sys.argv


def normalize_task_type(name: str) -> str:
    """Short task-type name from a short or an official ALFWorld name."""
    if name in TASK_TYPES:
        return name
    if name in OFFICIAL_TO_SHORT:
        return OFFICIAL_TO_SHORT[name]
    raise ValueError(f"unknown ALFWorld task type {name!r}; expected one of {sorted(TASK_TYPES)}")


def _alfworld_paths() -> tuple[Path, Path, Path]:
    import alfworld  # noqa: PLC0415
    import alfworld.gen  # noqa: PLC0415

    root = Path(alfworld.__file__).parent
    return root / "data" / "alfred.pddl", root / "data" / "alfred.twl2", Path(alfworld.gen.__file__).parent / "layouts"


class _Constants:
    """The alfworld generator constants this module needs (loaded lazily)."""

    def __init__(self) -> None:
        import alfworld.gen.constants as C  # noqa: N812, PLC0415
        import alfworld.gen.goal_library as glib  # noqa: PLC0415

        self.goals = glib.gdict
        self.scene_type = C.SCENE_TYPE
        self.goals_valid = C.GOALS_VALID
        self.static_receptacles = set(C.RECEPTACLES) - set(C.MOVABLE_RECEPTACLES)
        self.movable_receptacles = set(C.MOVABLE_RECEPTACLES)
        self.openable = set(C.OPENABLE_CLASS_SET)
        self.can_contain = {r: set(v) for r, v in C.VAL_RECEPTACLE_OBJECTS.items()}
        self.actions = {k: set(v) for k, v in C.VAL_ACTION_OBJECTS.items()}
        contents = set().union(*self.can_contain.values())
        self.portable = {o for o in contents if not o.endswith("Sliced")} - self.static_receptacles - {"Box"}
        self.all_types = set(C.OBJECTS_SET)


_CONSTANTS: _Constants | None = None


def _constants() -> _Constants:
    global _CONSTANTS
    if _CONSTANTS is None:
        _CONSTANTS = _Constants()
    return _CONSTANTS


def pddl_name(text: str) -> str:
    """ALFRED's escaping of ids into PDDL names (the Demangler reverses it for display)."""
    table = {"-": "_minus_", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
    return "".join(table.get(ch, ch) for ch in text)


# --------------------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    number: int
    room: str
    object_types: set[str]
    receptacle_poses: dict[str, list[float]]  # instance id -> [x, z, rotation, horizon]
    floor_points: list[tuple[float, float]]


_SCENES: dict[int, Scene] = {}


def load_scene(number: int) -> Scene:
    if number in _SCENES:
        return _SCENES[number]
    import numpy as np  # noqa: PLC0415

    _, _, layouts = _alfworld_paths()
    C = _constants()
    room = next(name for name, numbers in C.scene_type.items() if number in numbers)
    objects = set(json.loads((layouts / f"FloorPlan{number}-objects.json").read_text()))
    poses = json.loads((layouts / f"FloorPlan{number}-openable.json").read_text())
    points = [tuple(map(float, p)) for p in np.load(layouts / f"FloorPlan{number}-layout.npy").tolist()]
    scene = Scene(number, room, objects, poses, points)
    _SCENES[number] = scene
    return scene


def available_scenes() -> list[int]:
    _, _, layouts = _alfworld_paths()
    numbers = []
    for path in layouts.glob("FloorPlan*-objects.json"):
        m = re.match(r"FloorPlan(\d+)-objects\.json", path.name)
        if m and (layouts / f"FloorPlan{m.group(1)}-openable.json").exists():
            numbers.append(int(m.group(1)))
    return sorted(numbers)


def _receptacle_class(instance_id: str) -> str:
    parts = instance_id.split("|")
    return parts[-1] if len(parts) == 5 else parts[0]  # "Sink|x|y|z|SinkBasin" -> SinkBasin


def _random_id(cls: str, rng: random.Random, suffix: str = "") -> str:
    coords = "|".join(f"{rng.uniform(-4, 4):+06.2f}" for _ in range(3))
    return f"{cls}|{coords}" + (f"|{suffix}" if suffix else "")


def _loc(x: float, z: float, rot: float, hor: float) -> str:
    return f"loc|{int(round(x / 0.25))}|{int(round(z / 0.25))}|{int(rot) % 360}|{int(hor)}"


# ---------------------------------------------------------------------------------- generation


@dataclass
class GameSpec:
    task_type: str  # short name
    scene: int
    obj: str
    recep: str | None
    toggle: str | None
    task_desc: str
    receptacles: dict[str, str] = field(default_factory=dict)  # id -> location
    objects: dict[str, str] = field(default_factory=dict)  # id -> receptacle id
    agent_location: str = ""


def _build_receptacles(scene: Scene, rng: random.Random) -> dict[str, str]:
    C = _constants()
    receptacles: dict[str, str] = {}
    used: set[str] = set()

    def place(rid: str, loc: str) -> None:
        x = loc
        bump = 0
        while x in used:  # keep one receptacle per location (unambiguous "go to")
            bump += 1
            x = f"{loc}|{bump}"
        used.add(x)
        receptacles[rid] = x

    for rid, pose in sorted(scene.receptacle_poses.items()):
        if _receptacle_class(rid) in C.static_receptacles:
            place(rid, _loc(*pose[:4]))
    present = {_receptacle_class(r) for r in receptacles}
    for cls in sorted(scene.object_types & C.static_receptacles - present):
        lo, hi = _MULTI_INSTANCE.get(cls, (1, 1))
        for _ in range(rng.randint(lo, hi)):
            if cls in ("SinkBasin", "BathtubBasin"):
                rid = _random_id(cls[: -len("Basin")], rng, suffix=cls)
            else:
                rid = _random_id(cls, rng)
            x, z = rng.choice(scene.floor_points)
            place(rid, _loc(x, z, rng.choice([0, 90, 180, 270]), 30))
    return receptacles


def _sample_goal(task_type: str, scene: Scene, rclasses: set[str], rng: random.Random):
    C = _constants()
    portable = sorted((scene.object_types & C.portable) - set(_LAMPS))
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp in _LAMPS if lamp in scene.object_types]
        holders = [h for h in _LAMP_HOLDERS if h in rclasses]
        if not lamps or not holders or not portable:
            return None
        return rng.choice(portable), None, rng.choice(lamps)
    need = {"pick_clean_then_place": ("Cleanable", "SinkBasin"),
            "pick_heat_then_place": ("Heatable", "Microwave"),
            "pick_cool_then_place": ("Coolable", "Fridge")}.get(task_type)
    candidates = []
    for obj in portable:
        if need and (obj not in C.actions[need[0]] or need[1] not in rclasses):
            continue
        for recep in sorted(rclasses):
            if obj not in C.can_contain.get(recep, ()):
                continue
            if need and recep in (need[1], *_CONTRADICTORY.get(task_type, ())):
                continue
            # the object must be able to start somewhere other than the goal receptacle class
            if not any(obj in C.can_contain.get(r, ()) for r in rclasses if r != recep):
                continue
            candidates.append((obj, recep))
    if not candidates:
        return None
    obj, recep = rng.choice(candidates)
    return obj, recep, None


def sample_game(task_type: str, rng: random.Random, scenes: list[int] | None = None) -> GameSpec | None:
    """One random (unverified) game of ``task_type``; None when the drawn scene cannot host it."""
    C = _constants()
    official = TASK_TYPES[task_type]
    scenes = scenes or available_scenes()
    valid_rooms = C.goals_valid.get(official, set(C.scene_type))
    pool = [s for s in scenes if next(r for r, ns in C.scene_type.items() if s in ns) in valid_rooms]
    scene = load_scene(rng.choice(pool))
    receptacles = _build_receptacles(scene, rng)
    rclasses = {_receptacle_class(r) for r in receptacles}
    goal = _sample_goal(task_type, scene, rclasses, rng)
    if goal is None:
        return None
    obj, recep, toggle = goal

    by_class: dict[str, list[str]] = {}
    for rid in receptacles:
        by_class.setdefault(_receptacle_class(rid), []).append(rid)

    # The target class, the lamp(s) and up to MAX_DISTRACTOR_CLASSES other portable classes of the
    # scene (every object multiplies the grounded PDDL actions, hence the engine's load time).
    portable = sorted(scene.object_types & C.portable - set(_LAMPS) - {obj})
    classes = [obj] + rng.sample(portable, min(MAX_DISTRACTOR_CLASSES, len(portable)))
    classes += [lamp for lamp in _LAMPS if lamp in scene.object_types]
    objects: dict[str, str] = {}
    for cls in classes:
        if cls in _LAMPS:
            holders = [r for h in _LAMP_HOLDERS for r in by_class.get(h, [])]
            if not holders:
                continue
            count, hosts = 1, holders
        else:
            hosts = [r for r in sorted(receptacles) if cls in C.can_contain.get(_receptacle_class(r), ())]
            if cls == obj and recep is not None:
                hosts = [r for r in hosts if _receptacle_class(r) != recep]
            if not hosts:
                continue
            count = rng.choices([1, 2, 3], weights=[6, 3, 1])[0] if cls == obj else rng.choice([1, 1, 2])
            if cls == obj and task_type == "pick_two_obj_and_place":
                count = max(count, 2)
        for _ in range(count):
            objects[_random_id(cls, rng)] = rng.choice(hosts)
    if not any(o.split("|")[0] == obj for o in objects):
        return None
    if toggle and not any(o.split("|")[0] == toggle for o in objects):
        return None

    used = set(receptacles.values())
    for _ in range(100):
        x, z = rng.choice(scene.floor_points)
        start = _loc(x, z, rng.choice([0, 90, 180, 270]), 30)
        if start not in used:
            break
    else:
        return None

    template = rng.choice(C.goals[official]["templates"])
    task_desc = template.format(obj=obj.lower(), recep=(recep or "").lower(), toggle=(toggle or "").lower(),
                                mrecep="")
    return GameSpec(task_type, scene.number, obj, recep, toggle, task_desc, receptacles, objects, start)


def problem_pddl(spec: GameSpec, name: str) -> str:
    """The PDDL problem of a game (same conventions as ALFRED's ``initial_state.pddl``)."""
    C = _constants()
    official = TASK_TYPES[spec.task_type]
    rtypes = sorted(C.static_receptacles)
    otypes = sorted(C.all_types - C.static_receptacles)
    locations = sorted(set(spec.receptacles.values()) | {spec.agent_location})
    present_r = sorted({_receptacle_class(r) for r in spec.receptacles})
    present_o = sorted({o.split("|")[0] for o in spec.objects})

    objs = ["agent1 - agent"]
    objs += [f"{pddl_name(t)}Type - otype" for t in otypes]
    objs += [f"{pddl_name(t)}Type - rtype" for t in rtypes]
    objs += [f"{pddl_name(o)} - object" for o in sorted(spec.objects)]
    objs += [f"{pddl_name(r)} - receptacle" for r in sorted(spec.receptacles)]
    objs += [f"{pddl_name(loc)} - location" for loc in locations]

    init = ["(= (total-cost) 0)", f"(atLocation agent1 {pddl_name(spec.agent_location)})"]
    for rid, loc in sorted(spec.receptacles.items()):
        cls = _receptacle_class(rid)
        init.append(f"(receptacleType {pddl_name(rid)} {cls}Type)")
        init.append(f"(receptacleAtLocation {pddl_name(rid)} {pddl_name(loc)})")
        if cls in C.openable:
            init.append(f"(openable {pddl_name(rid)})")
    for oid, rid in sorted(spec.objects.items()):
        cls = oid.split("|")[0]
        o = pddl_name(oid)
        init.append(f"(objectType {o} {cls}Type)")
        init.append(f"(inReceptacle {o} {pddl_name(rid)})")
        init.append(f"(objectAtLocation {o} {pddl_name(spec.receptacles[rid])})")
        if cls in _LAMPS:
            init.append(f"(toggleable {o})")
            continue
        init.append(f"(pickupable {o})")
        for prop, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                           ("Sliceable", "sliceable")):
            if cls in C.actions[prop]:
                init.append(f"({pred} {o})")
        if cls in C.movable_receptacles:
            init.append(f"(isReceptacleObject {o})")
    for r in present_r:
        for o in present_o:
            if o in C.can_contain.get(r, ()):
                init.append(f"(canContain {r}Type {o}Type)")

    goal = C.goals[official]["pddl"].format(obj=spec.obj, recep=spec.recep, toggle=spec.toggle, mrecep=None)
    goal = goal.replace("#", "-").strip()
    assert goal.endswith(")")
    goal = goal[:-1].rstrip()  # the library's goal also closes the (define ...); we do that below
    nl = "\n        "
    return (f"(define (problem {name})\n    (:domain alfred)\n    (:objects{nl}{nl.join(objs)}\n    )\n"
            f"    (:init{nl}{nl.join(init)}\n    )\n    {goal}\n    (:metric minimize (total-cost))\n)\n")


def make_game_data(spec: GameSpec, name: str) -> dict[str, Any]:
    domain_path, grammar_path, _ = _alfworld_paths()
    grammar = grammar_path.read_text().replace("UNKNOWN GOAL", spec.task_desc)
    return {
        "pddl_domain": domain_path.read_text(),
        "grammar": grammar,
        "pddl_problem": problem_pddl(spec, name),
        "solvable": None,
        "walkthrough": None,
    }


def traj_data(spec: GameSpec, split: str, seed: int, index: int) -> dict[str, Any]:
    """A minimal ``traj_data.json`` (the keys ALFWorld's loaders read, plus provenance)."""
    return {
        "task_type": TASK_TYPES[spec.task_type],
        "pddl_params": {"object_target": spec.obj, "parent_target": spec.recep or "",
                        "toggle_target": spec.toggle or "", "mrecep_target": "", "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{spec.scene}", "scene_num": spec.scene},
        "turk_annotations": {"anns": [{"task_desc": spec.task_desc}]},
        "r3l_generated": {"split": split, "seed": seed, "index": index, "generator_version": GENERATOR_VERSION,
                          "disclaimer": GENERATED_GAMES_DISCLAIMER},
    }


# ------------------------------------------------------------------------------------ engine


_SAS_CACHE: "OrderedDict[tuple[str, bool], Any]" = OrderedDict()
SAS_CACHE_SIZE = 64


def _memo_pddl2sas(original):
    """fast-downward's PDDL->SAS translation is deterministic and dominates load/reset time (the
    engine translates the same problem twice on load and twice on every reset): memoise it."""

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        key = (hashlib.sha256((domain + "\0" + problem).encode()).hexdigest(), bool(optimize))
        if key in _SAS_CACHE:
            _SAS_CACHE.move_to_end(key)
            return _SAS_CACHE[key]
        result = original(domain, problem, verbose=verbose, optimize=optimize)
        _SAS_CACHE[key] = result
        while len(_SAS_CACHE) > SAS_CACHE_SIZE:
            _SAS_CACHE.popitem(last=False)
        return result

    return pddl2sas


class _EngineGuard:
    """Serialise engine calls that translate PDDL: fast-downward's translator uses module globals and
    overwrites ``sys.argv`` (restored here); the translation is memoised while the guard is held."""

    def __enter__(self):
        import fast_downward  # noqa: PLC0415

        _ENGINE_LOCK.acquire()
        self.argv = list(sys.argv)
        self.original = fast_downward.pddl2sas
        fast_downward.pddl2sas = _memo_pddl2sas(self.original)
        return self

    def __exit__(self, *exc):
        import fast_downward  # noqa: PLC0415

        fast_downward.pddl2sas = self.original
        sys.argv[:] = self.argv
        _ENGINE_LOCK.release()
        return False


def engine_guard() -> _EngineGuard:
    return _EngineGuard()


def make_engine(request_walkthrough: bool = False):
    """TextWorld's PDDL environment wrapped with ALFWorld's name demangler (as AlfredTWEnv does).

    ``request_walkthrough`` asks the engine for ``extra.walkthrough`` on reset: the game file's
    stored walkthrough, else a fast-downward plan (which can take very long on large problems).
    """
    import textworld  # noqa: PLC0415
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler  # noqa: PLC0415
    from textworld.envs.pddl import PddlEnv  # noqa: PLC0415

    extras = ["walkthrough"] if request_walkthrough else []
    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
    with engine_guard():
        return AlfredDemangler(PddlEnv(infos), shuffle=False)


def _inner(env):
    while getattr(env, "_wrapped_env", None) is not None:
        env = env._wrapped_env
    return env


class EnginePool:
    """Loaded engines, reused game after game instead of being closed.

    Each engine loads a private copy of fast-downward's library (``load_lib``); loading a new copy
    after earlier copies were unloaded (``dlclose``) crashed the whole process inside ``dlopen``
    (segfault, reproducible in a full ``r3l fit`` run at the final evaluation). So engines are never
    unloaded: an episode leases one on ``reset`` and gives it back on ``close``; the pool holds at
    most as many engines as episodes ever ran at once (each maps a ~34 MB library copy).
    """

    def __init__(self) -> None:
        self._idle: list = []
        self._lock = threading.Lock()
        self.created = 0

    def acquire(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.created += 1
        return make_engine()

    def release(self, engine) -> None:
        with self._lock:
            self._idle.append(engine)


ENGINE_POOL = EnginePool()


def scripted_plan(spec: GameSpec, names: dict[str, str]) -> list[str]:
    """A hand-written expert for the six task types: the commands that solve ``spec``.

    ``names`` maps PDDL names (lower-cased, as the engine keys them) to the displayed names.
    """
    C = _constants()

    def name(instance_id: str) -> str:
        return names[pddl_name(instance_id).lower()]

    here: list[str] = [""]
    opened: set[str] = set()
    plan: list[str] = []

    def goto(rid: str) -> None:
        if here[0] != rid:
            plan.append(f"go to {name(rid)}")
            here[0] = rid
        if _receptacle_class(rid) in C.openable and rid not in opened:
            plan.append(f"open {name(rid)}")
            opened.add(rid)

    def first(cls: str) -> str:
        return sorted(r for r in spec.receptacles if _receptacle_class(r) == cls)[0]

    targets = sorted(o for o in spec.objects if o.split("|")[0] == spec.obj)
    for oid in targets[: 2 if spec.task_type == "pick_two_obj_and_place" else 1]:
        rid = spec.objects[oid]
        goto(rid)
        plan.append(f"take {name(oid)} from {name(rid)}")
        for task, station, verb in (("pick_clean_then_place", "SinkBasin", "clean"),
                                    ("pick_heat_then_place", "Microwave", "heat"),
                                    ("pick_cool_then_place", "Fridge", "cool")):
            if spec.task_type == task:
                station_id = first(station)
                if here[0] != station_id:
                    plan.append(f"go to {name(station_id)}")
                    here[0] = station_id
                plan.append(f"{verb} {name(oid)} with {name(station_id)}")
        if spec.task_type == "look_at_obj_in_light":
            lamp = sorted(o for o in spec.objects if o.split("|")[0] == spec.toggle)[0]
            if here[0] != spec.objects[lamp]:
                plan.append(f"go to {name(spec.objects[lamp])}")
            plan.append(f"use {name(lamp)}")
        else:
            goto(first(spec.recep))
            plan.append(f"move {name(oid)} to {name(first(spec.recep))}")
    return plan


def verify_plan(env, data: dict[str, Any], plan: list[str]) -> bool:
    """Replay ``plan`` in the real engine: every command admissible, won at the end only."""
    with engine_guard():
        env.load(data)
        state = env.reset()
    if state["won"]:
        return False
    for i, command in enumerate(plan):
        if command not in state["admissible_commands"]:
            return False
        state, _, _ = env.step(command)
        if state["won"] != (i == len(plan) - 1):
            return False
    return True


def solve_and_verify(spec: GameSpec, data: dict[str, Any], env=None) -> list[str] | None:
    """The scripted expert's plan for a game if replaying it in the engine wins, else None."""
    own = env is None
    env = env or ENGINE_POOL.acquire()
    try:
        with engine_guard():
            env.load(data)
        names = {key: info.name for key, info in _inner(env)._entity_infos.items()}
        plan = scripted_plan(spec, names)
        if len(plan) > MAX_WALKTHROUGH_STEPS or not verify_plan(env, data, plan):
            return None
        return plan
    except Exception:  # noqa: BLE001 - an unusable draw is simply rejected (and redrawn)
        return None
    finally:
        if own:
            ENGINE_POOL.release(env)


# ------------------------------------------------------------------------------------- cache


def _game_rng(split: str, seed: int, index: int, attempt: int) -> random.Random:
    digest = hashlib.sha256(f"r3l-alfworld|{split}|{seed}|{index}|{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def game_folder_names(spec: GameSpec, index: int) -> tuple[str, str]:
    official = TASK_TYPES[spec.task_type]
    task_folder = f"{official}-{spec.obj}-None-{spec.recep or spec.toggle}-{spec.scene}"
    return task_folder, f"trial_r3lgen_{index:05d}"


def generate_game(split: str, seed: int, index: int, task_type: str, env=None,
                  max_attempts: int = 60) -> tuple[GameSpec, dict[str, Any]]:
    """Game ``index`` of (split, seed): deterministic, verified solvable by the planner + engine."""
    for attempt in range(max_attempts):
        rng = _game_rng(split, seed, index, attempt)
        spec = sample_game(task_type, rng)
        if spec is None:
            continue
        data = make_game_data(spec, f"r3l_{split}_{seed}_{index}")
        plan = solve_and_verify(spec, data, env)
        if plan is None:
            continue
        data["solvable"] = True
        data["walkthrough"] = plan
        return spec, data
    raise RuntimeError(f"could not generate a solvable {task_type} game (split={split}, seed={seed}, index={index})")


def cache_root() -> Path:
    return Path(os.environ.get("R3L_CACHE", Path.home() / ".cache" / "r3l_lightning")).expanduser()


def generated_dir(split: str, seed: int, task_types: list[str] | None = None) -> Path:
    types = [normalize_task_type(t) for t in (task_types or list(TASK_TYPES))]
    name = f"{split}-{seed}"
    if sorted(types) != sorted(TASK_TYPES):
        name += "-" + "+".join(types)
    return cache_root() / "alfworld" / name


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("generator_version") == GENERATOR_VERSION else None


def ensure_generated(split: str, seed: int, num_games: int, task_types: list[str] | None = None,
                     log: bool = True) -> Path:
    """Generate (once) ``num_games`` games into the cache; returns the root (``<root>/<split>/...``).

    Game i has task type ``task_types[i % len(task_types)]`` and is a pure function of
    (split, seed, i), so a larger request extends a smaller cache. The directory is written in a
    temporary sibling and renamed into place, so readers never see a partial cache.
    """
    types = [normalize_task_type(t) for t in (task_types or list(TASK_TYPES))]
    root = generated_dir(split, seed, types)
    manifest = _read_manifest(root)
    if manifest is not None and manifest["num_games"] >= num_games and manifest["task_types"] == types:
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{root.name}-{uuid.uuid4().hex[:8]}"
    have = 0
    if manifest is not None and manifest["task_types"] == types:
        shutil.copytree(root, tmp)
        have = manifest["num_games"]
    else:
        tmp.mkdir()
    games = list(manifest["games"]) if have else []
    t0 = time.perf_counter()
    env = ENGINE_POOL.acquire()
    try:
        for index in range(have, num_games):
            spec, data = generate_game(split, seed, index, types[index % len(types)], env)
            task_folder, trial = game_folder_names(spec, index)
            game_dir = tmp / split / task_folder / trial
            game_dir.mkdir(parents=True)
            (game_dir / GAME_FILE).write_text(json.dumps(data))
            (game_dir / TRAJ_FILE).write_text(json.dumps(traj_data(spec, split, seed, index), indent=1))
            games.append(f"{split}/{task_folder}/{trial}")
    finally:
        ENGINE_POOL.release(env)
    elapsed = time.perf_counter() - t0
    (tmp / MANIFEST_FILE).write_text(json.dumps({
        "generator_version": GENERATOR_VERSION, "split": split, "seed": seed, "task_types": types,
        "num_games": num_games, "games": games, "disclaimer": GENERATED_GAMES_DISCLAIMER,
        "generation_seconds": elapsed,
    }, indent=1))
    if log and num_games > have:
        print(f"[r3l] generated {num_games - have} ALFWorld games in {elapsed:.1f}s into {root} "
              f"({GENERATED_GAMES_DISCLAIMER})", file=sys.stderr)
    if root.exists():
        old = root.parent / f".old-{root.name}-{uuid.uuid4().hex[:8]}"
        try:
            root.rename(old)
        except OSError:
            pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:  # another process won the race: use its cache
        shutil.rmtree(tmp, ignore_errors=True)
    return root
