"""WebShop (Yao et al., 2022) through a running WebShop text-environment HTTP server.

WebShop cannot run inside this package (it needs its product data, a pyserini search index, Java and
spaCy), so this adapter talks to a server the user starts. The server is AgentGym's
``agentenv-webshop`` (github.com/WooooDyy/AgentGym), the HTTP wrapper around WebShop's
``WebAgentTextEnv`` that agentic-RL frameworks call. Start it with::

    git clone https://github.com/WooooDyy/AgentGym && cd AgentGym/agentenv-webshop
    conda env create -n agentenv-webshop -f environment.yml && conda activate agentenv-webshop
    bash ./setup.sh
    webshop --host 0.0.0.0 --port 36001      # one worker: envs live in that process's memory

**Interface used** (read in AgentGym ``main`` @ 3ef9235, ``agentenv-webshop/agentenv_webshop/server.py``
and ``model.py``; the same calls are made by AgentGym's client ``agentenv/agentenv/envs/webshop.py``):

* ``POST /create`` (no body) → JSON int ``env_idx``: a new ``WebAgentTextEnv(observation_mode="text",
  num_products=1000)`` (``environment.py``).
* ``POST /reset`` ``{"env_idx": int, "session_id": int}`` → JSON ``[observation, null]`` (the return
  value of ``WebAgentTextEnv.reset(session=session_id)``). ``session_id`` selects the goal
  (instruction) with that index; resetting the same session again gives the same start page.
* ``GET /instruction_text?env_idx=N`` → JSON string, the instruction.
* ``GET /available_actions?env_idx=N`` → ``{"has_search_bar": bool, "clickables": [str, ...]}``
  (clickables lower-cased button texts, product ids and option values; ``"search"`` is the search
  button, not a click target).
* ``POST /step`` ``{"env_idx": int, "action": "search[...]" | "click[...]"}`` →
  ``{"state": str, "reward": float, "done": bool, "info": null}``; ``done`` with the attribute-match
  score as ``reward`` after ``click[buy now]``, else reward 0.
* An unknown ``env_idx`` is an HTTP 500; a bad body an HTTP 422. ``POST /close`` exists only in the
  unmerged AgentGym PR #74, so this adapter does not call it: server envs are reused instead (an
  episode leases one on ``reset`` and gives it back on ``close``; ``/create`` runs only when none is
  idle), so the server holds as many envs as episodes were ever live at once (an evaluation on 100
  sessions: 100). Each is a separate ``WebAgentTextEnv`` with its own products and search engine.

**Invalid actions.** The server never reports one: ``WebAgentTextEnv.step`` "performs nothing" (same
page, reward 0) for a click on something not on the page (``web_agent_site/envs/web_agent_text_env.py``).
So the adapter checks each action against ``/available_actions`` before sending it, with the rule of
the R³L reference code (``shiweijiezero/R3L``, ``trinity/common/workflows/envs/R3L/webshop/utils.py``,
``validate_action``): ``search[q]`` needs a non-empty ``q`` and a search bar on the page;
``click[x]`` needs ``x.lower()`` among the clickables. A response without ``search[...]``/``click[...]``
or with an invalid action ends the episode with reward 0 and a feedback message (paper §5.1;
``info["invalid_action"]``, plus ``info["unparseable"]`` for the former).

**Reward.** The server's reward (clamped to [0, 1]) when ``done`` (a purchase); 0 when the
``max_turns``-th (15) action did not buy anything.

**Failures.** Every request carries ``timeout=step_timeout_s``. A server that is down, times out,
answers an HTTP error or JSON of the wrong shape ends the episode: ``step`` returns ``done``, reward 0
and ``info["error"]`` (naming the URL and what went wrong), and ``reset`` raises
:class:`WebShopServerError` (the explorer turns that into a failed episode with ``info["error"]``).
The first error of an environment also says how to start a server. A server env that failed is not
reused. (The explorer also bounds a whole ``reset``/``step`` by ``step_timeout_s``; a ``reset`` makes
up to four requests, the first of a server env including ``/create``, which builds a WebShop env on
the server.)

**Sessions.** Goal indices differ between setups: AgentGym's server serves WebShop's *synthetic*
goals over its 1,000 bundled products (``human_goals`` is not passed), while the R³L reference code
runs ``WebAgentTextEnv(observation_mode="text_rich", num_products=None, human_goals=True)`` in process
and uses sessions 0–4095 for training and 4096–4195 (100) for evaluation
(``examples/R3L/webshop/get_webshop_data.py``); WebShop's own baselines use, with human goals,
0–499 test, 500–1499 dev, 1500+ train (``baseline_models/env.py``). Numbers from AgentGym's server
are therefore not comparable to the paper's. :class:`WebShopTasks` is a plain range of session ids.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from r3l_lightning.envs.base import Environment, Episode, StepResult, Task, TaskSource

DEFAULT_SERVER_URL = "http://127.0.0.1:36001"
START_HINT = (
    "Start a WebShop server with AgentGym's agentenv-webshop: in AgentGym/agentenv-webshop run "
    "`conda env create -n agentenv-webshop -f environment.yml && conda activate agentenv-webshop && "
    "bash ./setup.sh`, then `webshop --host 0.0.0.0 --port 36001`, and point server_url at it."
)
# The first search[...] / click[...] in a response, on one line; the argument may be empty (invalid).
_ACTION_RE = re.compile(r"\b(search|click)\s*\[([^\]\n]*)\]", re.IGNORECASE)


class WebShopServerError(RuntimeError):
    """The WebShop server is unreachable, timed out, or answered something unexpected."""


def parse_action(response: str) -> tuple[str, str] | None:
    """``(verb, argument)`` of the first ``search[...]``/``click[...]`` in ``response``; None if none."""
    match = _ACTION_RE.search(response)
    if match is None:
        return None
    return match.group(1).lower(), match.group(2).strip().strip("'\"`").strip()


def check_action(verb: str, arg: str, available: dict[str, Any]) -> str | None:
    """Why ``verb[arg]`` cannot be taken on a page with ``available`` actions; None when it can."""
    if not arg:
        return f"{verb}[...] needs {'a query' if verb == 'search' else 'a button text'} inside the brackets"
    if verb == "search":
        return None if available["has_search_bar"] else "there is no search bar on this page"
    if arg.lower() == "search" or arg.lower() not in available["clickables"]:
        return f"{arg!r} is not a button on this page"
    return None


def format_available(available: dict[str, Any]) -> str:
    actions = ["search[<query>]"] if available["has_search_bar"] else []
    actions += [f"click[{c}]" for c in available["clickables"] if c != "search"]
    return "Available actions: " + ", ".join(actions)


class WebShopClient:
    """The agentenv-webshop endpoints this adapter uses, with their answers' shapes checked."""

    def __init__(self, server_url: str, timeout_s: float) -> None:
        self.server_url = server_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              env_idx: int | None = None) -> Any:
        url = self.server_url + path
        if env_idx is not None:
            url += "?" + urllib.parse.urlencode({"env_idx": env_idx})
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        where = f"WebShop server {self.server_url}: {method} {path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            try:
                detail = err.read()[:300].decode(errors="replace")
            except (OSError, http.client.HTTPException):
                detail = ""
            raise WebShopServerError(f"{where} answered HTTP {err.code}: {detail}") from None
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                raise WebShopServerError(f"{where} timed out after {self.timeout_s} s") from None
            raise WebShopServerError(f"{where} failed: {reason!r}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise WebShopServerError(f"{where} answered malformed JSON: {raw[:300]!r}") from None

    def _malformed(self, call: str, answer: Any) -> WebShopServerError:
        return WebShopServerError(
            f"WebShop server {self.server_url}: {call} answered an unexpected JSON shape: {str(answer)[:300]}")

    def create(self) -> int:
        answer = self._call("POST", "/create")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise self._malformed("POST /create", answer)
        return answer

    def reset(self, env_idx: int, session_id: int) -> str:
        answer = self._call("POST", "/reset", {"env_idx": env_idx, "session_id": session_id})
        if not isinstance(answer, list) or not answer or not isinstance(answer[0], str):
            raise self._malformed("POST /reset", answer)
        return answer[0]

    def instruction_text(self, env_idx: int) -> str:
        answer = self._call("GET", "/instruction_text", env_idx=env_idx)
        if not isinstance(answer, str):
            raise self._malformed("GET /instruction_text", answer)
        return answer

    def available_actions(self, env_idx: int) -> dict[str, Any]:
        answer = self._call("GET", "/available_actions", env_idx=env_idx)
        if (not isinstance(answer, dict) or not isinstance(answer.get("has_search_bar"), bool)
                or not isinstance(answer.get("clickables"), list)
                or not all(isinstance(c, str) for c in answer["clickables"])):
            raise self._malformed("GET /available_actions", answer)
        return {"has_search_bar": answer["has_search_bar"], "clickables": answer["clickables"]}

    def step(self, env_idx: int, action: str) -> tuple[str, float, bool]:
        answer = self._call("POST", "/step", {"env_idx": env_idx, "action": action})
        if (not isinstance(answer, dict) or not isinstance(answer.get("state"), str)
                or not isinstance(answer.get("reward"), (int, float)) or not isinstance(answer.get("done"), bool)):
            raise self._malformed("POST /step", answer)
        return answer["state"], float(answer["reward"]), answer["done"]


# --------------------------------------------------------------------------------------------------


class WebShopTasks(TaskSource):
    """WebShop sessions (goal indices) ``start, start + 1, ..., start + size - 1``.

    The R³L reference trains on ``start=0, size=4096`` and evaluates on ``start=4096, size=100``
    (see the module docstring for what a session id means on which server). Payload: ``{"session_id"}``.
    """

    def __init__(self, start: int = 0, size: int = 100) -> None:
        if start < 0 or size < 1:
            raise ValueError(f"WebShopTasks needs start >= 0 and size >= 1, got start={start}, size={size}")
        self.start, self.size = start, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Task:
        if not -self.size <= index < self.size:
            raise IndexError(f"task {index} out of range [0, {self.size})")
        session = self.start + index % self.size
        return Task(f"webshop-{session}", {"session_id": session})


class WebShopEpisode(Episode):
    """One session on a server env leased from the environment until ``close``."""

    def __init__(self, env: WebShopEnv, task: Task) -> None:
        self.env, self.task = env, task
        self.session_id = int(task.payload["session_id"])
        self.env_idx: int | None = None
        self._clear()

    def _clear(self) -> None:
        self.turns = 0
        self.done = False
        self.reward = 0.0
        self.outcome = "not started"
        self.instruction = ""
        self.last_observation = ""
        self.available: dict[str, Any] = {"has_search_bar": False, "clickables": []}
        self.actions: list[str] = []

    def _format(self, page: str) -> str:
        return f"{page}\n\n{format_available(self.available)}" if self.env.show_available_actions else page

    def reset(self) -> str:
        """Reset the session on a (leased) server env; raises :class:`WebShopServerError` on failure."""
        self._clear()
        client = self.env.client
        try:
            if self.env_idx is None:
                self.env_idx = self.env.lease()
            page = client.reset(self.env_idx, self.session_id)
            self.instruction = client.instruction_text(self.env_idx)
            self.available = client.available_actions(self.env_idx)
        except WebShopServerError as err:
            self.env_idx = None  # not reused
            raise WebShopServerError(self.env.describe(err)) from None
        self.outcome = "running"
        self.last_observation = page
        return self._format(page)

    def step(self, action: str) -> StepResult:
        if self.done:
            return StepResult("The episode is over.", 0.0, True, {"outcome": self.outcome})
        if self.env_idx is None:
            return self._end("The episode was not started.", 0.0, "server error", {"error": "step before reset"})
        self.turns += 1
        info: dict[str, Any] = {"turn": self.turns}
        parsed = parse_action(action)
        if parsed is None:
            info.update(invalid_action=True, unparseable=True)
            return self._end("Invalid response: it contains no search[...] or click[...] action. The episode is over.",
                             0.0, "unparseable response", info)
        command = f"{parsed[0]}[{parsed[1]}]"
        info["action"] = command
        self.actions.append(command)
        problem = check_action(*parsed, self.available)
        if problem is not None:
            info["invalid_action"] = True
            return self._end(f"Invalid action {command}: {problem}. The episode is over.", 0.0, "invalid action", info)
        try:
            page, reward, done = self.env.client.step(self.env_idx, command)
            if not done and self.turns < self.env.max_turns:
                self.available = self.env.client.available_actions(self.env_idx)
        except WebShopServerError as err:
            self.env_idx = None  # not reused
            info["error"] = self.env.describe(err)
            return self._end(f"The WebShop server failed: {info['error']}", 0.0, "server error", info)
        if done:
            info["score"] = reward
            return self._end(page, min(1.0, max(0.0, reward)), "purchased", info)
        if self.turns >= self.env.max_turns:
            return self._end(page, 0.0, "turn limit", info)
        self.last_observation = page
        return StepResult(self._format(page), 0.0, False, info)

    def _end(self, observation: str, reward: float, outcome: str, info: dict[str, Any]) -> StepResult:
        self.done, self.reward, self.outcome = True, reward, outcome
        self.last_observation = observation
        info["outcome"] = outcome
        return StepResult(observation, reward, True, info)

    def feedback(self) -> str:
        head = {
            "purchased": f"A product was bought after {self.turns} actions; its match score (reward) is "
                         f"{self.reward:.2f} of 1.00 (attributes, options and price against the instruction).",
            "invalid action": f"Failure (reward 0): action {self.turns} was not available on the page, which "
                              "ended the episode.",
            "unparseable response": f"Failure (reward 0): response {self.turns} contained no search[...] or "
                                    "click[...] action, which ended the episode.",
            "turn limit": f"Failure (reward 0): nothing was bought within {self.env.max_turns} actions.",
            "server error": "The WebShop server failed; the episode was aborted (reward 0).",
        }.get(self.outcome, f"The episode is not finished ({self.turns} actions so far).")
        lines = [head]
        if self.instruction:
            lines.append(f"Instruction: {self.instruction}")
        if self.actions:
            lines.append(f"Actions: {' | '.join(self.actions)}")
        lines.append(f"Last observation: {self.last_observation.strip()}")
        return "\n".join(lines)

    def close(self) -> None:
        if self.env_idx is not None:
            self.env.give_back(self.env_idx)
        self.env_idx = None


class WebShopEnv(Environment):
    """WebShop episodes on a running agentenv-webshop server (see the module docstring)."""

    def __init__(self, server_url: str = DEFAULT_SERVER_URL, max_turns: int = 15, step_timeout_s: float = 30.0,
                 show_available_actions: bool = True) -> None:
        self.max_turns = max_turns
        self.step_timeout_s = step_timeout_s
        self.show_available_actions = show_available_actions
        self.client = WebShopClient(server_url, step_timeout_s)
        self._idle: list[int] = []
        self._lock = threading.Lock()
        self._hint_given = False

    def system_prompt(self) -> str:
        listed = ", followed by the actions available on it" if self.show_available_actions else ""
        return (
            "You are shopping in WebShop, a simulated online store, for the product that best matches an "
            "instruction. Each observation is the text of the current web page (it starts with the "
            f"instruction; \" [SEP] \" separates page elements){listed}.\n"
            "Respond with exactly ONE action per turn, on its own line:\n"
            "- search[query]: search for products (only on a page with a search bar)\n"
            "- click[button text]: click a button, product id or option shown on the page, e.g. "
            "click[Back to Search], click[Next >], click[< Prev], click[B078GWRC1J], click[Description], "
            "click[large], click[Buy Now]\n"
            "Select the options the instruction asks for (size, color, ...) on the product page before "
            "clicking Buy Now. Clicking Buy Now ends the episode; the reward (0 to 1) is how well the product, "
            "its options and its price match the instruction. A response without an action, or an action "
            f"that is not available on the page, ends the episode with no reward. You have at most "
            f"{self.max_turns} actions."
        )

    def make_episode(self, task: Task) -> WebShopEpisode:
        return WebShopEpisode(self, task)

    def lease(self) -> int:
        """An idle server env, or a new one (``POST /create``)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.client.create()

    def give_back(self, env_idx: int) -> None:
        with self._lock:
            self._idle.append(env_idx)

    def describe(self, err: WebShopServerError) -> str:
        """The error's message; the first one of this environment also says how to start a server."""
        with self._lock:
            first, self._hint_given = not self._hint_given, True
        return f"{err}. {START_HINT}" if first else str(err)
