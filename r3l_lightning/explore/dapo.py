"""``DAPOExplorer``: GRPO-style groups with DAPO's dynamic sampling and soft overlong penalty.

For every task (DAPO, Yu et al. 2025, arXiv 2503.14476):

1. roll out N trajectories from the task's prompt;
2. add the soft overlong penalty to each reward (eq. 13, :func:`overlong_penalty`);
3. drop the group when all its rewards are equal (dynamic sampling, without resampling); otherwise one group
   of N samples with advantages from the penalised rewards.

Clip-higher, the token-level loss and the warm-up are loss settings (``configs/methods/dapo.yaml``).
"""

from __future__ import annotations

from typing import Literal

from r3l_lightning.explore.episodes import RolloutCounters
from r3l_lightning.explore.group import GroupExplorer
from r3l_lightning.trajectory import TokenizedConversation

OverlongLength = Literal["longest_response", "after_first_prompt"]


def overlong_penalty(length: int, max_tokens: int, buffer_tokens: int, factor: float) -> float:
    """DAPO's soft overlong punishment (DAPO paper eq. 13; the reference code's ``compute_overlong_penalty``).

    With L_exp = max_tokens − buffer_tokens: 0 if length ≤ L_exp; (L_exp − length)/buffer_tokens · factor
    if L_exp < length ≤ max_tokens (linear from 0 to −factor); −factor beyond max_tokens.
    """
    expected = max_tokens - buffer_tokens
    if length <= expected:
        return 0.0
    if length > max_tokens:
        return -factor
    return (expected - length) / buffer_tokens * factor


class DAPOExplorer(GroupExplorer):
    """DAPO's exploration: ``group_size`` samples per task, penalised rewards, uniform groups dropped.

    ``drop_uniform_groups``: dynamic sampling (groups whose rewards are all equal are dropped, not
    resampled; counted in ``groups_dropped``). ``overlong_penalty`` (factor; 0 = off), ``overlong_max_tokens``
    (None: ``max_new_tokens``), ``overlong_buffer_tokens`` (defaults: the reference code's 1, 512 and 400): the soft overlong penalty added to the reward, see
    :func:`overlong_penalty`, on the length of the trajectory's longest response (``overlong_length:
    longest_response``) or, as the reference code, on every token after the first prompt, observations
    included (``after_first_prompt``). The other arguments are :class:`GroupExplorer`'s.
    """

    def __init__(
        self,
        drop_uniform_groups: bool = True,
        overlong_penalty: float = 1.0,
        overlong_max_tokens: int | None = 512,
        overlong_buffer_tokens: int = 400,
        overlong_length: OverlongLength = "longest_response",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        max_new_tokens = self.sampling.max_new_tokens
        self.drop_uniform_groups = drop_uniform_groups
        self.overlong_penalty = overlong_penalty
        self.overlong_max_tokens = overlong_max_tokens if overlong_max_tokens is not None else max_new_tokens
        self.overlong_buffer_tokens = overlong_buffer_tokens
        self.overlong_length = overlong_length
        if overlong_penalty and not 0 < overlong_buffer_tokens <= self.overlong_max_tokens:
            raise ValueError(
                f"overlong_penalty needs 0 < overlong_buffer_tokens <= overlong_max_tokens "
                f"({self.overlong_max_tokens}), got overlong_buffer_tokens={overlong_buffer_tokens}"
            )
        if overlong_length not in ("longest_response", "after_first_prompt"):
            raise ValueError(f"overlong_length must be longest_response or after_first_prompt, got {overlong_length!r}")

    def shaped_reward(self, reward: float, conversation: TokenizedConversation) -> float:
        if not self.overlong_penalty or not conversation.turn_spans:
            return reward
        if self.overlong_length == "longest_response":
            length = max(end - start for start, end in conversation.turn_spans)
        else:
            length = len(conversation.input_ids) - conversation.turn_spans[0][0]
        return reward + overlong_penalty(length, self.overlong_max_tokens, self.overlong_buffer_tokens,
                                         self.overlong_penalty)

    def keeps(self, rewards: list[float], counters: RolloutCounters) -> bool:
        if self.drop_uniform_groups and len(set(rewards)) <= 1:
            counters.add("groups_dropped")
            return False
        return True
