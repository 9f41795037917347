"""Test doubles: scripted rollout engines, a small deterministic guessing environment, and a reward a random
model can learn (``TokenDirectionEnv``)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from typing import Callable

import lightning as L
import torch
import torch.distributed as dist
import lightning.pytorch.strategies.fsdp as lightning_fsdp
from lightning.pytorch.strategies import FSDPStrategy

from r3l_lightning.engines.base import Completion, RolloutEngine, SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.engines.hf import HFEngine
from r3l_lightning.envs.base import Environment, Episode, StepResult, Task, TaskSource
from r3l_lightning.explore import GroupExplorer, R3LExplorer


class ScriptedEngine(RolloutEngine):
    """Answers every prompt with ``script(prompt_text)``; records each generate call's batch size and the
    constraints it was asked to decode under (``constraints``, one list per call)."""

    def __init__(self, script: Callable[[str], str], tokenizer, eos_id: int) -> None:
        self.script = script
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.calls: list[int] = []
        self.constraints: list[list[Constraint | None] | None] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 constraints: list[Constraint | None] | None = None) -> list[list[Completion]]:
        self.calls.append(len(prompts))
        self.constraints.append(constraints)
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



class UnevenExplorer(GroupExplorer):
    """Rank-dependent exploration for multi-process tests: rank r samples ``group_size + 2·r`` episodes
    per task with ``max_new_tokens + 8·r`` new tokens, so ranks hold different numbers of samples and
    make different numbers of generation steps. Advantages alternate +1/−1 so that even a random
    model's zero rewards give a gradient."""

    def explore(self, tasks, ctx):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        explorer = GroupExplorer(self.group_size + 2 * rank, max_new_tokens=self.sampling.max_new_tokens + 8 * rank,
                                 seed=self.seed)
        result = explorer.explore(tasks, ctx)
        for group in result.groups:
            for i, sample in enumerate(group):
                sample.advantage = 1.0 if i % 2 == 0 else -1.0
        return result


class DumpWeights(L.Callback):
    """Saves every rank's full policy state dict to ``<dirpath>/rank<r>.pt`` when training ends."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.policy.state_dict().items()}
        torch.save(state, f"{self.dirpath}/rank{trainer.global_rank}.pt")


class DumpFullWeights(L.Callback):
    """When training starts (the policy sharded by then), saves what ``named_full_weights`` yields on every rank,
    in order, to ``<dirpath>/full_rank<r>.pt``, then stops the run."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer, pl_module):
        from r3l_lightning.models import named_full_weights

        weights = [(name, tensor.cpu().clone()) for name, tensor in named_full_weights(pl_module.policy)]
        torch.save(weights, f"{self.dirpath}/full_rank{trainer.global_rank}.pt")
        trainer.should_stop = True


class FixedExplorer(GroupExplorer):
    """Training data that depends only on the task ids (not on the model), for comparing a multi-process
    run with a single-process one on the same data. It still generates a rank-dependent number of
    sequences of rank-dependent lengths, so ranks are out of step while generating."""

    def explore(self, tasks, ctx):
        from r3l_lightning.explore import ExplorationResult
        from r3l_lightning.trajectory import TrainingSample

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        prompts = [[1, 2, 3 + i] for i in range(1 + 2 * rank)]
        ctx.engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4 + 6 * rank))
        result = ExplorationResult()
        for task in tasks:
            rng = random.Random(task.task_id)
            group = []
            for i in range(2 + int(task.task_id.rsplit("-", 1)[-1]) % 3):
                length = rng.randint(6, 14)
                ids = [rng.randint(3, 40000) for _ in range(length)]
                mask = [0.0] * (length // 2) + [1.0] * (length - length // 2)
                group.append(TrainingSample(ids, mask, 1.0 if i % 2 == 0 else -0.5, "base", task.task_id))
            result.groups.append(group)
        result.stats = {"samples_base": float(sum(len(g) for g in result.groups))}
        return result


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) on CPU over gloo. Lightning refuses the class itself without
    a GPU by an exact-type check; the FSDP1 code path (wrapping, gathers, clipping) is the same.

    Checkpoints: Lightning gathers full state dicts with ``offload_to_cpu=True``, which on CPU-resident
    FSDP1 parameters frees the storage the cloned views still read (segfault in torch's
    ``_full_post_state_dict_hook``); on CPU there is nothing to offload, so this double gathers without it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_without_offload


def _full_state_dict_context_without_offload(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


class SignallingExplorer(R3LExplorer):
    """R³L exploration that sends itself ``$R3L_TEST_SIGNAL`` (KILL or TERM) when its call number equals
    ``$R3L_TEST_SIGNAL_ON_CALL``: a crash or preemption at a known point of a run."""

    def explore(self, tasks, ctx):
        if os.environ.get("R3L_TEST_SIGNAL_ON_CALL") == str(self.calls + 1):
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("R3L_TEST_SIGNAL", "KILL")))
        return super().explore(tasks, ctx)


def signal_at(point: str, count: int) -> None:
    """Send this process ``$R3L_TEST_SIGNAL`` (KILL, TERM, USR1) when ``$R3L_TEST_SIGNAL_AT`` is ``point:count``
    (the ``count``-th time ``point`` is reached), writing the time sent to ``$R3L_TEST_SIGNAL_STAMP``."""
    if os.environ.get("R3L_TEST_SIGNAL_AT") != f"{point}:{count}":
        return
    if "R3L_TEST_SIGNAL_STAMP" in os.environ:
        with open(os.environ["R3L_TEST_SIGNAL_STAMP"], "w") as f:
            f.write(repr(time.time()))
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("R3L_TEST_SIGNAL", "TERM")))


class SignallingEngine(HFEngine):
    """The HF engine, which signals itself (:func:`signal_at`) at its n-th generate call of a phase: ``eval`` for
    calls at ``eval_temperature`` (the EvalCallback's), ``explore`` for the others. The signal arrives after the
    call's generation, as a signal that arrives while a call runs."""

    def __init__(self, max_batch_size: int = 64, eval_temperature: float = 0.4) -> None:
        super().__init__(max_batch_size)
        self.eval_temperature = eval_temperature
        self.phase_calls: dict[str, int] = {"eval": 0, "explore": 0}

    def generate(self, prompts, params, constraints=None):
        out = super().generate(prompts, params, constraints)
        phase = "eval" if params.temperature == self.eval_temperature else "explore"
        self.phase_calls[phase] += 1
        signal_at(phase, self.phase_calls[phase])
        return out


class SignalBeforeBackward(L.Callback):
    """Signals the process (:func:`signal_at`, point ``backward``) before its n-th micro-batch backward."""

    def __init__(self) -> None:
        self.backwards = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.backwards += 1
        signal_at("backward", self.backwards)


class NaNExplorer(GroupExplorer):
    """Exploration whose advantages are NaN: every training step's loss is non-finite."""

    def explore(self, tasks, ctx):
        result = super().explore(tasks, ctx)
        for group in result.groups:
            for sample in group:
                sample.advantage = float("nan")
        return result


class TokenDirectionEpisode(Episode):
    def __init__(self, env: "TokenDirectionEnv") -> None:
        self.env, self.turn, self.score = env, 0, 0.0

    def reset(self) -> str:
        self.turn, self.score = 0, 0.0
        return "Reply."

    def step(self, action: str) -> StepResult:
        self.turn += 1
        ids = self.env.tokenizer(action, add_special_tokens=False)["input_ids"]
        self.score = sum(i in self.env.rewarded for i in ids) / len(ids) if ids else 0.0
        done = self.score >= 1.0 or self.turn >= self.env.max_turns
        return StepResult(f"Score {self.score:.2f}. Try again.", self.score, done)

    def feedback(self) -> str:
        return f"The last reply scored {self.score:.2f}."


class TokenDirectionEnv(Environment):
    """A reward a random model can learn in a few optimizer steps: the fraction of a reply's tokens whose input
    embedding has a first coordinate above the ``1 - fraction`` quantile. Those tokens share a direction of
    the (tied) embedding matrix, so raising one coordinate of the last hidden state raises all of their
    logits together (a random subset of the vocabulary would have to be learned token by token). The
    reply (text) is re-tokenised to score it. Up to ``max_turns`` replies; the last one is scored."""

    def __init__(self, model: str = "tiny-random-smollm2", fraction: float = 0.2, max_turns: int = 2) -> None:
        from r3l_lightning.models import load_policy, load_tokenizer

        self.max_turns = max_turns
        self.tokenizer = load_tokenizer(model)
        first = load_policy(model).get_input_embeddings().weight[:, 0].detach()
        threshold = first.quantile(1.0 - fraction)
        self.rewarded = set((first > threshold).nonzero().flatten().tolist())

    def system_prompt(self) -> str:
        return "Reply with any words."

    def make_episode(self, task: Task) -> Episode:
        return TokenDirectionEpisode(self)


class ScriptedReflectionEngine(HFEngine):
    """The HF engine on the real policy, except that schema-constrained calls (reflections) get a scripted
    valid report: a failure that retries from the last turn, or a success when the schema allows only that."""

    def __init__(self, max_batch_size: int = 64) -> None:
        super().__init__(max_batch_size)
        self.reflections = 0

    def generate(self, prompts, params, constraints=None):
        if constraints is None or all(c is None or c.json_schema is None for c in constraints):
            return super().generate(prompts, params, constraints)
        out = []
        for schema in (c.json_schema for c in constraints):
            failure = "anyOf" not in schema
            steps = schema["properties"]["retry_from_step"]["enum"] if failure else None
            report = {"trajectory_summary": "lower-case reply", "root_cause_analysis": "ignored the instruction",
                      "trajectory_outcome": "failure" if failure else "success",
                      "improvement_suggestion": "use capitals" if failure else None,
                      "retry_from_step": steps[-1] if failure else None}
            ids = self.tokenizer(json.dumps(report), add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]]
            out.append([Completion(ids, [-1.0] * len(ids), "stop") for _ in range(params.n)])
            self.reflections += 1
        return out
