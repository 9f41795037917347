"""Size and load time of the ``r3l view`` page for a long run (default 20 epochs × 64 groups).

    python benchmarks/viewer_size.py [--epochs 20] [--groups 64] [--attempts 4] [--from RUN_DIR]

Writes a rollout log of ``epochs`` training files of ``groups`` groups each (plus one evaluation file of
``groups`` groups) through the real writer (``save_rollouts``: clipping, tagging, atomic files), builds
the page with ``write_viewer``, opens it in headless Chromium (Debian's chromium + chromium-driver,
selenium) and prints: the rollout log's size, the page's size and build time, the time from navigation
to the first rendered page of groups, the time one filter change takes, and the JS heap.

Groups are Countdown-shaped R³L groups (``attempts`` base trajectories of up to 3 turns with ~100-token
responses, a reflection each, a retry for every other one; every response text distinct), or, with
``--from RUN_DIR``, the groups of a real run repeated to the requested count.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from r3l_lightning.envs.countdown import CountdownEnv
from r3l_lightning.rollout_log import RolloutLog, save_rollouts
from r3l_lightning.viewer import find_log_dir, load_records, write_viewer

WORDS = ("add", "multiply", "the", "numbers", "then", "subtract", "equals", "target", "so", "we", "get", "try",
         "answer", "step", "first", "combine", "result", "check", "which", "gives")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(1, 99)) for _ in range(words))


def trajectory(rng: random.Random, system: str, task: str, turns: int, guidance: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
    observations = [task]
    for turn in range(turns):
        if guidance is not None and turn == turns - 1:
            messages.append({"role": "system", "content": guidance, "guidance": True})
        messages.append({"role": "assistant", "content": f"<think>{text(rng, 70)}</think><answer>{text(rng, 5)}</answer>"})
        if turn < turns - 1:
            observation = "Incorrect: the equation does not equal the target. Try again."
            messages.append({"role": "user", "content": observation})
            observations.append(observation)
    reward = float(rng.random() < 0.2)
    return {"messages": messages, "observations": observations, "reward": reward, "turns": turns,
            "feedback": f"Not solved after {turns} attempt(s) of 3.", "truncated": False, "error": None}


def synthetic_group(rng: random.Random, index: int, attempts: int, system: str) -> dict:
    numbers = [rng.randint(1, 20) for _ in range(3)]
    task = f"Using the numbers {numbers}, create an equation that equals {rng.randint(10, 60)}."
    out = []
    for i in range(attempts):
        turns = rng.randint(1, 3)
        base = trajectory(rng, system, task, turns)
        report = {"trajectory_summary": text(rng, 25), "root_cause_analysis": text(rng, 40),
                  "trajectory_outcome": "failure", "improvement_suggestion": text(rng, 25), "retry_from_step": turns - 1}
        retried = i % 2 == 0
        guidance = f"Your previous attempt at this task had issues. A review of it found:\n{json.dumps(report, indent=2)}"
        retry = trajectory(rng, system, task, turns, guidance) if retried else None
        samples = [{"kind": "base", "reward": base["reward"], "advantage": rng.uniform(-1, 3), "trainable_tokens": 90, "tokens": 400}]
        if retried:
            samples.append({"kind": "distill", "reward": retry["reward"], "advantage": rng.uniform(-1, 3), "trainable_tokens": 90, "tokens": 400})
        out.append({"base": base, "reflection": {"text": json.dumps(report), "report": report, "invalid_reason": None},
                    "pivot": turns - 1 if retried else None, "retry": retry, "samples": samples})
    return {"task_id": f"countdown-{index}", "task": {"numbers": numbers}, "attempts": out}


def measure_in_chromium(page: Path) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--enable-precise-memory-info", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        start = time.perf_counter()
        driver.get(page.resolve().as_uri())  # returns once the load event fired
        wall = time.perf_counter() - start
        rendered = driver.execute_script("return window.r3lRenderedAt")
        filter_ms = driver.execute_script("""
            const select = document.getElementById('filter-outcome');
            select.value = 'reflection-valid';
            const t = performance.now();
            select.dispatchEvent(new Event('change'));
            return performance.now() - t;""")
        heap = driver.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : 0")
        groups = driver.execute_script("return document.querySelectorAll('.group').length")
    finally:
        driver.quit()
    return {"wall_s": wall, "rendered_ms": rendered, "filter_ms": filter_ms, "heap_mib": heap / 2**20, "shown": groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--attempts", type=int, default=4, help="base trajectories per group (N/2; paper N = 8)")
    parser.add_argument("--from", dest="source", help="repeat the groups of this run instead of synthetic ones")
    args = parser.parse_args()

    rng = random.Random(0)
    system = CountdownEnv().system_prompt()
    real = [r for r in load_records(find_log_dir(args.source)) if r.get("split") == "train"] if args.source else []
    work = Path(tempfile.mkdtemp(prefix="r3l_viewer_bench_"))
    trainer = SimpleNamespace(log_dir=str(work), default_root_dir=str(work), world_size=1, is_global_zero=True,
                              loggers=[], global_step=0)
    config = RolloutLog(max_groups=args.groups)
    index = 0
    for epoch in range(args.epochs + 1):
        records = []
        for _ in range(args.groups):
            records.append(dict(real[index % len(real)], task_id=f"g{index}") if real
                           else synthetic_group(rng, index, args.attempts, system))
            index += 1
        save_rollouts(trainer, config, "train" if epoch < args.epochs else "eval", epoch, records)
    log_size = sum(p.stat().st_size for p in (work / "rollouts").iterdir())
    start = time.perf_counter()
    page, groups = write_viewer(work)
    build = time.perf_counter() - start
    print(f"rollout log: {args.epochs} epochs x {args.groups} groups + {args.groups} eval groups "
          f"({'from ' + args.source if real else f'synthetic, {args.attempts} attempts per group'}): "
          f"{log_size / 2**20:.1f} MiB of JSONL")
    print(f"page: {page.stat().st_size / 2**20:.1f} MiB for {groups} groups, built in {build:.2f} s")
    m = measure_in_chromium(page)
    print(f"chromium: first page of groups rendered {m['rendered_ms']:.0f} ms after navigation "
          f"(load returned after {m['wall_s']:.2f} s), a filter change re-renders in {m['filter_ms']:.0f} ms, "
          f"JS heap {m['heap_mib']:.0f} MiB, {m['shown']} groups on screen")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
