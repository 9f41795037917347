"""Batched multi-turn episodes: every active episode is stepped together, one generate call per turn."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from r3l_lightning.engines.base import Completion, EngineDeadError, RolloutEngine, SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.envs.base import Environment, Episode, Task
from r3l_lightning.trajectory import ChatTokenizer, Message, Trajectory

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RolloutContext:
    """What an explorer needs to roll out: the task rules, the sampler and the chat format."""

    env: Environment
    engine: RolloutEngine
    chat: ChatTokenizer
    # called after every generate call with the number of sequences and the phase: "base", "reflection",
    # "retry", "eval" (the ``token_key`` of :func:`run_episodes` without its ``tokens_`` prefix)
    progress: Callable[[int, str], None] | None = None
    # generate calls made through this context, per phase
    calls: Counter = field(default_factory=Counter)
    # per phase: sampled sequences, their tokens, those cut at the token budget (finish "length"), the longest one,
    # and the seconds spent inside generate
    completions: Counter = field(default_factory=Counter)
    completion_tokens: Counter = field(default_factory=Counter)
    clipped: Counter = field(default_factory=Counter)
    longest: Counter = field(default_factory=Counter)
    generate_s: Counter = field(default_factory=Counter)
    # called before every generate call and environment step; raises to stop the rollout there (preemption)
    stop_point: Callable[[], None] | None = None

    def check_stop(self) -> None:
        """Give ``stop_point`` the chance to stop the rollout here."""
        if self.stop_point is not None:
            self.stop_point()

    def generate(self, prompts: list[list[int]], params: SamplingParams, phase: str,
                 constraints: list[Constraint | None] | None = None) -> list[list[Completion]]:
        """``engine.generate``, counted in ``calls``, then ``progress``. ``constraints`` reach the engine only when one of them is set,
        so engines written without constraints keep working wherever nothing is constrained. A stop requested
        before the call (:meth:`check_stop`) raises instead."""
        self.check_stop()
        start = time.perf_counter()
        if constraints is not None and any(c is not None for c in constraints):
            outputs = self.engine.generate(prompts, params, constraints)
        else:
            outputs = self.engine.generate(prompts, params)
        self.generate_s[phase] += time.perf_counter() - start
        self.calls[phase] += 1
        for completion in (c for per_prompt in outputs for c in per_prompt):
            self.completions[phase] += 1
            self.completion_tokens[phase] += len(completion.token_ids)
            self.clipped[phase] += completion.finish_reason == "length"
            self.longest[phase] = max(self.longest[phase], len(completion.token_ids))
        if self.progress is not None:
            self.progress(len(prompts), phase)
        return outputs

    def call_stats(self) -> dict[str, float]:
        """Engine calls made so far: ``engine_calls`` in all, ``engine_calls_<phase>`` per phase."""
        stats = {f"engine_calls_{phase}": float(n) for phase, n in sorted(self.calls.items())}
        return {"engine_calls": float(sum(self.calls.values())), **stats}

    def generation_totals(self) -> dict[str, float]:
        """Per phase: ``completions_<phase>``, ``completion_tokens_<phase>``, ``completions_clipped_<phase>`` (sums
        over ranks), ``completion_len_max_<phase>`` (a max over ranks) and ``time_generate_<phase>_s`` (an average
        over ranks, which generate side by side); :func:`completion_stats` turns them into means and rates."""
        stats = {}
        for phase in sorted(self.completions):
            stats.update({f"completions_{phase}": float(self.completions[phase]),
                          f"completion_tokens_{phase}": float(self.completion_tokens[phase]),
                          f"completions_clipped_{phase}": float(self.clipped[phase]),
                          f"completion_len_max_{phase}": float(self.longest[phase]),
                          f"time_generate_{phase}_s": float(self.generate_s[phase])})
        return stats


def completion_stats(totals: dict[str, float]) -> dict[str, float]:
    """From :meth:`RolloutContext.generation_totals` (of one rank, or reduced over ranks), per phase with
    completions: the mean and max completion length in tokens, the fraction of completions cut at the token
    budget, and generated tokens and sequences per second of generation (over all ranks when reduced)."""
    rates = {}
    for key, count in totals.items():
        if not key.startswith("completions_") or key.startswith("completions_clipped_") or not count:
            continue
        phase = key.removeprefix("completions_")
        tokens, seconds = totals[f"completion_tokens_{phase}"], totals[f"time_generate_{phase}_s"]
        rates.update({f"completion_len_mean_{phase}": tokens / count,
                      f"completion_len_max_{phase}": totals[f"completion_len_max_{phase}"],
                      f"completion_clipped_frac_{phase}": totals[f"completions_clipped_{phase}"] / count})
        if seconds > 0:
            rates.update({f"tokens_per_s_{phase}": tokens / seconds, f"samples_per_s_{phase}": count / seconds})
    return rates


@dataclass
class EpisodeState:
    """A running episode and its conversation so far."""

    task: Task
    episode: Episode
    trajectory: Trajectory
    done: bool = False
    turns: int = 0

    @property
    def messages(self) -> list[Message]:
        return self.trajectory.messages


@dataclass
class RolloutCounters:
    """Counted (never raised) problems and generated-token totals of a rollout phase."""

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, value: int = 1) -> None:
        self.counts[key] += value


def start_episode(ctx: RolloutContext, task: Task, counters: RolloutCounters) -> EpisodeState:
    """Reset a new episode of ``task``; an environment that raises costs this episode only."""
    episode = ctx.env.make_episode(task)
    trajectory = Trajectory(messages=[Message("system", ctx.env.system_prompt())], task_id=task.task_id)
    state = EpisodeState(task, episode, trajectory)
    try:
        observation = call_with_timeout(episode.reset, ctx.env.step_timeout_s)
    except Exception as err:  # noqa: BLE001 - an env crash costs one episode, not the run
        _fail(state, counters, f"environment error on reset: {err!r}")
        return state
    trajectory.observations.append(observation)
    trajectory.messages.append(Message("user", observation))
    return state


def call_with_timeout(fn: Callable[[], T], timeout_s: float | None) -> T:
    """``fn()``, or TimeoutError after ``timeout_s`` (the call is abandoned in a daemon thread)."""
    if timeout_s is None:
        return fn()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"environment call exceeded step_timeout_s={timeout_s}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _fail(state: EpisodeState, counters: RolloutCounters, reason: str, counter: str = "env_errors") -> None:
    counters.add(counter)
    log.warning("episode %s ended: %s", state.task.task_id, reason)
    state.done = True
    state.trajectory.reward = 0.0
    state.trajectory.feedback = reason
    state.trajectory.info["error"] = reason
    _close(state)


def _close(state: EpisodeState) -> None:
    try:
        state.episode.close()
    except Exception:  # noqa: BLE001
        log.exception("closing episode %s failed", state.task.task_id)


def run_episodes(
    ctx: RolloutContext,
    states: list[EpisodeState],
    params: SamplingParams,
    counters: RolloutCounters,
    token_key: str = "tokens_base",
) -> None:
    """Step all ``states`` to completion (or ``env.max_turns``), batching generation across them."""
    limit = ctx.engine.max_context()
    while True:
        active = [s for s in states if not s.done]
        if not active:
            return
        prompts = []
        stepping = []
        for state in active:
            prompt = ctx.chat.prompt_ids(state.messages)
            if limit is not None and len(prompt) + params.max_new_tokens > limit:
                counters.add("context_overflows")
                _finish(state, 0.0, f"The conversation exceeded the model context ({limit} tokens).")
                continue
            prompts.append(prompt)
            stepping.append(state)
        if not stepping:
            continue
        for state in stepping:
            _record_admissible(state)
        constraints = [ctx.env.response_constraint(state.task) for state in stepping]
        outputs = _generate_isolating_failures(ctx, stepping, prompts, params, token_key.removeprefix("tokens_"),
                                               constraints, counters)
        for state, output in zip(stepping, outputs):
            if output is None:  # its request raised: the episode was ended
                continue
            (completion,) = output
            counters.add(token_key, len(completion.token_ids))
            if completion.finish_reason == "length":
                counters.add("overlong_responses")
                state.trajectory.info["truncated"] = True
            message = ctx.chat.assistant_message(completion.token_ids, completion.logprobs)
            state.messages.append(message)
            state.trajectory.actions.append(message.content)
            state.turns += 1
            ctx.check_stop()
            try:
                result = call_with_timeout(lambda: state.episode.step(message.content), ctx.env.step_timeout_s)
            except Exception as err:  # noqa: BLE001 - an env crash costs one episode, not the run
                _fail(state, counters, f"environment error on step: {err!r}")
                continue
            if result.info.get("error"):  # the environment ended the episode itself (a dead simulator, a server)
                counters.add("env_errors")
                state.trajectory.info["error"] = str(result.info["error"])
            if result.done or state.turns >= ctx.env.max_turns:
                _finish(state, result.reward, _safe_feedback(state))
                continue
            state.trajectory.observations.append(result.observation)
            state.messages.append(Message("user", result.observation))


def _generate_isolating_failures(
    ctx: RolloutContext, states: list[EpisodeState], prompts: list[list[int]], params: SamplingParams, phase: str,
    constraints: list[Constraint | None], counters: RolloutCounters,
) -> list[list[Completion] | None]:
    """``ctx.generate`` of one turn's prompts. If the batched call raises, every prompt is sent alone, so that a
    request that raises ends only its own episode (``None``, counted as ``engine_errors``). An engine that is dead
    (:class:`EngineDeadError`), or that raises on each of several requests alone, stops the run naming it."""
    try:
        return ctx.generate(prompts, params, phase, constraints)
    except EngineDeadError:
        raise
    except Exception as err:  # noqa: BLE001 - find the request that raised
        log.warning("%s.generate raised on a batch of %d prompts (%r); retrying them one by one",
                    type(ctx.engine).__name__, len(prompts), err)
    outputs: list[list[Completion] | None] = []
    last_error: Exception | None = None
    for state, prompt, constraint in zip(states, prompts, constraints):
        try:
            outputs.append(ctx.generate([prompt], params, phase, [constraint])[0])
        except EngineDeadError:
            raise
        except Exception as err:  # noqa: BLE001 - one request's failure costs its episode, not the run
            last_error = err
            _fail(state, counters, f"engine error on generate: {err!r}", "engine_errors")
            outputs.append(None)
    if len(prompts) > 1 and all(output is None for output in outputs):
        raise EngineDeadError(f"rollout engine {type(ctx.engine).__name__} raised on each of {len(prompts)} requests "
                              f"sent alone (last: {last_error!r}): it is not serving; resume from the last "
                              "checkpoint with --ckpt_path last once it works") from last_error
    return outputs


def _record_admissible(state: EpisodeState) -> None:
    """Append the actions the environment admits at this turn to ``trajectory.info["admissible"]`` (one entry per
    turn, None where it lists none) once any turn has a list: grounded reflection fields are constrained to them."""
    try:
        actions = state.episode.admissible_actions()
    except Exception:  # noqa: BLE001 - a listing that fails only loses the constraint, never the episode
        actions = None
    listed = state.trajectory.info.get("admissible")
    if actions is None and listed is None:
        return
    if listed is None:
        listed = state.trajectory.info["admissible"] = [None] * state.turns  # turns replayed before: unknown
    listed.append(None if actions is None else list(actions))


def _safe_feedback(state: EpisodeState) -> str:
    try:
        return state.episode.feedback()
    except Exception as err:  # noqa: BLE001
        return f"(feedback unavailable: {err!r})"


def _finish(state: EpisodeState, reward: float, feedback: str) -> None:
    state.done = True
    state.trajectory.reward = float(reward)
    state.trajectory.feedback = feedback
    try:
        state.trajectory.info["reflection_hint"] = state.episode.reflection_hint()
    except Exception:  # noqa: BLE001
        state.trajectory.info["reflection_hint"] = ""
    _close(state)
