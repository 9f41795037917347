"""Test doubles: a scripted rollout engine and a small deterministic guessing environment."""

from __future__ import annotations

from typing import Callable

from r3l_lightning.engines.base import Completion, RolloutEngine, SamplingParams
from r3l_lightning.envs.base import Environment, Episode, StepResult, Task, TaskSource


class ScriptedEngine(RolloutEngine):
    """Answers every prompt with ``script(prompt_text)``; records each generate call's batch size."""

    def __init__(self, script: Callable[[str], str], tokenizer, eos_id: int) -> None:
        self.script = script
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.calls: list[int] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            text = self.script(self.tokenizer.decode(p, skip_special_tokens=False))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
            out.append([Completion(ids, [-1.0] * len(ids), "stop") for _ in range(params.n)])
        return out


class GuessEpisode(Episode):
    def __init__(self, env: "GuessEnv", task: Task) -> None:
        self.env, self.task, self.turn, self.last = env, task, 0, ""

    def reset(self) -> str:
        self.env.resets += 1
        self.turn = 0
        suffix = f" (reset {self.env.resets})" if self.env.nondeterministic else ""
        return f"Guess the secret word.{suffix}"

    def step(self, action: str) -> StepResult:
        self.turn += 1
        guess = action.strip()
        if guess == "crash":
            raise RuntimeError("simulator died")
        if guess in self.task.payload["rewards"]:
            self.last = f"'{guess}' scores {self.task.payload['rewards'][guess]}"
            return StepResult(self.last, self.task.payload["rewards"][guess], True)
        self.last = f"'{guess}' is wrong."
        return StepResult(self.last, 0.0, self.turn >= self.env.max_turns)

    def feedback(self) -> str:
        return f"Final: {self.last}"


class GuessEnv(Environment):
    """Guess a word; ``payload['rewards']`` maps winning words to rewards. Up to ``max_turns`` guesses."""

    def __init__(self, max_turns: int = 3, nondeterministic: bool = False) -> None:
        self.max_turns = max_turns
        self.nondeterministic = nondeterministic
        self.resets = 0

    def system_prompt(self) -> str:
        return "Play the guessing game. Answer with one word."

    def make_episode(self, task: Task) -> Episode:
        return GuessEpisode(self, task)


class GuessTasks(TaskSource):
    def __init__(self, n: int = 4, rewards: dict | None = None) -> None:
        self.rewards = rewards or {"apple": 1.0}
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Task:
        return Task(f"guess-{i}", {"rewards": self.rewards})
