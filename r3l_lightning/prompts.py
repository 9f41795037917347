"""Every prompt the explorers write to the policy, in one place.

Each one is also an init argument of the explorer that uses it, defaulting to the constant here, so a
config can override it (``data.explorer.init_args.guidance_template: "..."``). Templates name their
fields in braces (``{report}``); they are filled by plain substitution, so other braces (JSON examples)
are kept as written. The fields and structure follow the R³L reference code; the wording is our own.
"""

from __future__ import annotations

# R³L reflection (the system message; the user message carries the task instructions, the numbered
# trajectory, the environment feedback and REFLECTION_REQUEST). The paper's five fields (§4.1, Distillation Trajectories).
# Their descriptions stand outside the JSON and the one JSON shown is a filled-in report on an unrelated task, so
# there is no placeholder value a small model can copy into its report (a copy of the example is still caught:
# ``informativeness`` -> ``copies_prompt``).
REFLECTION_SYSTEM_PROMPT = """You review an agent's attempt at a task and diagnose it, so that a second attempt can do better.
Answer with ONE JSON object and nothing else. Its fields:
- trajectory_summary: what the agent did at each step and what came of it.
- root_cause_analysis: why it went wrong, traced back to the first cause; null only if nothing went wrong.
- trajectory_outcome: "success", "success_but_inefficient" or "failure".
- improvement_suggestion: what to do differently, concrete enough to act on; null if and only if the outcome is success.
- retry_from_step: the earliest step number where the cause shows, 0 if the plan was wrong from the start; null if and only if the outcome is success.

For the format only, a report on an unrelated task (convert 3 km to metres):
{"trajectory_summary": "Step 0 answered 300 m and the checker rejected it.", "root_cause_analysis": "It used 100 metres per kilometre; a kilometre is 1000 metres.", "trajectory_outcome": "failure", "improvement_suggestion": "Multiply by 1000: 3 km is 3000 m.", "retry_from_step": 0}"""

# ``reflection_schema: grounded``: the fields an environment adds (``Environment.grounded_fields``), one line each
# under this header in the user message, before REFLECTION_REQUEST.
GROUNDED_FIELDS_HEADER = "# Also fill these fields of the report (null if and only if the outcome is success)"

REFLECTION_REQUEST = "Write the JSON diagnosis now."

# R³L / Reflect-GRPO retry guidance; {report} is the reflection JSON.
GUIDANCE_TEMPLATE = """Your previous attempt at this task had issues. A review of it found:
{report}
Apply these lessons in your next responses. Do not mention this guidance or the previous attempt."""

# Critique-GRPO, reference-code variant: a free-text critique of a failed attempt, asked in one user
# message; {trajectory} is the numbered trajectory, {reward} its final reward.
CRITIQUE_TEMPLATE = """Below is an agent's attempt at a task. Critique it so that the next attempt does better.

# The attempt
{trajectory}

# Outcome
Final reward: {reward} (1 means solved, 0 means failed).

# What to write
1. The mistakes: which steps or decisions were wrong, and why.
2. What was misunderstood about the task or its goal.
3. Concrete corrections: what to do instead, step by step where it helps.
Keep it short and specific; every point should help the next attempt."""

# Critique-GRPO, reference-code variant: appended to the system prompt of the refinement; {critique}
# is the critique's text.
REFINEMENT_TEMPLATE = """# Critique of your previous attempt
{critique}

# Your task now
Solve the task again, avoiding the mistakes described above, as directly as you can."""


def fill(template: str, **fields: str) -> str:
    """``template`` with every ``{name}`` replaced by ``fields[name]`` (other braces untouched)."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


def check_template(argument: str, template: str, *fields: str) -> str:
    """``template`` if it names every field; otherwise a ValueError naming the argument and the field."""
    missing = [f for f in fields if "{" + f + "}" not in template]
    if missing:
        raise ValueError(
            f"{argument} must contain {', '.join('{' + f + '}' for f in missing)} (where the text goes); "
            f"see r3l_lightning/prompts.py for the default"
        )
    return template
