"""WebShop adapter (``r3l_lightning.envs.webshop``) against an in-test stub HTTP server.

The stub checks the adapter's protocol handling only: it answers AgentGym agentenv-webshop's
endpoints (``/create``, ``/reset``, ``/instruction_text``, ``/available_actions``, ``/step``) with the
JSON shapes documented in the module, from fixed canned pages of one scripted session. It is not a
WebShop simulation, and the adapter is untested against a real WebShop server here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from r3l_lightning.envs.base import Task
from r3l_lightning.envs.webshop import (
    START_HINT,
    WebShopEnv,
    WebShopServerError,
    WebShopTasks,
    check_action,
    format_available,
    parse_action,
)
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, start_episode

INSTRUCTION = "i need red running shoes in size 9, and price lower than 50.00 dollars"
START = f"WebShop [SEP] Instruction: [SEP] {INSTRUCTION} [SEP] Search"
RESULTS = (f"Instruction: [SEP] {INSTRUCTION} [SEP] Back to Search [SEP] Page 1 (Total results: 2) [SEP] Next > "
           "[SEP] B000RED001 [SEP] Red Runner [SEP] $30.0 [SEP] B000BLU002 [SEP] Blue Runner [SEP] $45.0")
ITEM = (f"Instruction: [SEP] {INSTRUCTION} [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] 8 [SEP] 9 [SEP] "
        "Red Runner [SEP] Price: $30.0 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
DONE = "Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] 0.75"
PAGES = {
    "start": (START, {"has_search_bar": True, "clickables": ["search"]}),
    "results": (RESULTS, {"has_search_bar": False,
                          "clickables": ["back to search", "next >", "b000red001", "b000blu002"]}),
    "item": (ITEM, {"has_search_bar": False, "clickables": ["back to search", "< prev", "description", "features",
                                                             "reviews", "buy now", "8", "9"]}),
}
# (page, lower-cased action) -> next page; anything else leaves the page as it is (like WebShop).
MOVES = {("start", "search[red running shoes]"): "results", ("results", "click[b000red001]"): "item",
         ("item", "click[9]"): "item", ("item", "click[buy now]"): "done"}
PURCHASE = ["Thought: search first.\nsearch[red running shoes]", "click[B000RED001]", "Action: `click[9]`",
            "<action>click[Buy Now]</action>"]


class Stub:
    """A scripted agentenv-webshop: records every request; ``hang``/``raw`` override paths."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, object]] = []
        self.pages: dict[int, str] = {}
        self.next_idx = 7
        self.hang: set[str] = set()
        self.raw: dict[str, bytes] = {}
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def log_message(self, *args) -> None:
                pass

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stub.requests.append((method, url.path, parse_qs(url.query), body))
                if url.path in stub.hang:
                    stub.release.wait(10)
                status, payload = stub.answer(method, url.path, parse_qs(url.query), body)
                data = stub.raw.get(url.path, json.dumps(payload).encode())
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout tests)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, method: str, path: str, query: dict, body) -> tuple[int, object]:
        if (method, path) == ("POST", "/create"):
            self.pages[self.next_idx] = "start"
            self.next_idx += 1
            return 200, self.next_idx - 1
        idx = body["env_idx"] if method == "POST" else int(query["env_idx"][0])
        if idx not in self.pages:  # the real server: KeyError -> HTTP 500
            return 500, "Internal Server Error"
        if (method, path) == ("POST", "/reset"):
            self.pages[idx] = "start"
            return 200, [START, None]
        if (method, path) == ("GET", "/instruction_text"):
            return 200, INSTRUCTION
        if (method, path) == ("GET", "/available_actions"):
            return 200, PAGES[self.pages[idx]][1]
        if (method, path) == ("POST", "/step"):
            page = MOVES.get((self.pages[idx], body["action"].lower()), self.pages[idx])
            if page == "done":
                return 200, {"state": DONE, "reward": 0.75, "done": True, "info": None}
            self.pages[idx] = page
            return 200, {"state": PAGES[page][0], "reward": 0.0, "done": False, "info": None}
        return 404, {"detail": "Not Found"}

    def steps(self) -> list[object]:
        return [body for method, path, _, body in self.requests if path == "/step"]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub():
    server = Stub()
    yield server
    server.stop()


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def episode(env: WebShopEnv, session: int = 4096):
    return env.make_episode(Task(f"webshop-{session}", {"session_id": session}))


# ------------------------------------------------------------------------------------------ helpers


def test_parse_action_finds_the_first_action_in_surrounding_text() -> None:
    assert parse_action("search[red shoes]") == ("search", "red shoes")
    assert parse_action("Thought: looks right.\nAction: `click[Buy Now]`") == ("click", "Buy Now")
    assert parse_action('<action>click["< Prev"]</action>') == ("click", "< Prev")
    assert parse_action("Click [Next >] then click[b1]") == ("click", "Next >")
    assert parse_action("search[]") == ("search", "")
    assert parse_action("I would search for red shoes") is None
    assert parse_action("search[red\nshoes]") is None
    assert parse_action("") is None


def test_check_action_and_listing_follow_the_page() -> None:
    start, results = PAGES["start"][1], PAGES["results"][1]
    assert check_action("search", "shoes", start) is None
    assert "no search bar" in check_action("search", "shoes", results)
    assert "query" in check_action("search", "", start)
    assert check_action("click", "Next >", results) is None
    assert "not a button" in check_action("click", "search", start)
    assert "not a button" in check_action("click", "Buy Now", results)
    assert format_available(start) == "Available actions: search[<query>]"
    assert format_available(results).endswith("click[next >], click[b000red001], click[b000blu002]")


def test_system_prompt_explains_the_action_syntax() -> None:
    prompt = WebShopEnv().system_prompt()
    assert "search[query]" in prompt and "click[button text]" in prompt
    assert "ONE action" in prompt and "at most 15 actions" in prompt


def test_tasks_are_a_range_of_session_ids() -> None:
    train, test = WebShopTasks(0, 4096), WebShopTasks(start=4096, size=100)
    assert len(train) == 4096 and len(test) == 100
    assert test[0] == Task("webshop-4096", {"session_id": 4096})
    assert test[-1].payload["session_id"] == 4195 and train[4095].task_id == "webshop-4095"
    with pytest.raises(IndexError):
        test[100]
    for bad in ({"start": -1}, {"size": 0}):
        with pytest.raises(ValueError):
            WebShopTasks(**bad)


# ----------------------------------------------------------------------------------- with the stub


def test_reset_creates_a_server_env_and_returns_the_instruction_page(stub) -> None:
    ep = episode(WebShopEnv(stub.url))
    observation = ep.reset()
    assert observation == f"{START}\n\nAvailable actions: search[<query>]"
    assert ep.instruction == INSTRUCTION
    assert stub.requests == [
        ("POST", "/create", {}, None),
        ("POST", "/reset", {}, {"env_idx": 7, "session_id": 4096}),
        ("GET", "/instruction_text", {"env_idx": ["7"]}, None),
        ("GET", "/available_actions", {"env_idx": ["7"]}, None),
    ]
    assert episode(WebShopEnv(stub.url, show_available_actions=False)).reset() == START


def test_search_and_clicks_send_exact_bodies_and_end_with_the_server_reward(stub) -> None:
    ep = episode(WebShopEnv(stub.url))
    ep.reset()
    results = [ep.step(response) for response in PURCHASE]
    assert [r.done for r in results] == [False, False, False, True]
    assert [r.reward for r in results] == [0.0, 0.0, 0.0, 0.75]
    assert results[0].observation.startswith(RESULTS) and "click[b000red001]" in results[0].observation
    assert results[-1].observation == DONE
    assert results[-1].info == {"turn": 4, "action": "click[Buy Now]", "score": 0.75, "outcome": "purchased"}
    assert stub.steps() == [{"env_idx": 7, "action": a}
                            for a in ("search[red running shoes]", "click[B000RED001]", "click[9]", "click[Buy Now]")]
    assert stub.requests[-1][1] == "/step"  # nothing is asked after the purchase
    feedback = ep.feedback()
    assert "0.75" in feedback and INSTRUCTION in feedback and "click[Buy Now]" in feedback
    assert ep.step("click[Buy Now]").done and len(stub.steps()) == 4


def test_unparseable_response_ends_the_episode_with_zero(stub) -> None:
    ep = episode(WebShopEnv(stub.url))
    ep.reset()
    result = ep.step("I think I should look for red shoes first.")
    assert result.done and result.reward == 0.0
    assert result.info["invalid_action"] and result.info["unparseable"]
    assert "no search[...] or click[...]" in result.observation
    assert "contained no" in ep.feedback()
    assert stub.steps() == []


@pytest.mark.parametrize("actions, bad", [
    ([], "click[Buy Now]"),                            # not a button on the start page
    ([], "click[search]"),                             # the search button is not a click target
    ([], "search[  ]"),                                # empty query
    (["search[red running shoes]"], "search[shoes]"),  # no search bar on the results page
])
def test_invalid_action_ends_the_episode_with_zero_without_sending_it(stub, actions, bad) -> None:
    ep = episode(WebShopEnv(stub.url))
    ep.reset()
    for action in actions:
        assert not ep.step(action).done
    result = ep.step(bad)
    assert result.done and result.reward == 0.0 and result.info["invalid_action"]
    assert "Invalid action" in result.observation and "not available on the page" in ep.feedback()
    assert len(stub.steps()) == len(actions)


def test_step_limit_ends_with_zero(stub) -> None:
    ep = episode(WebShopEnv(stub.url, max_turns=2))
    ep.reset()
    assert not ep.step(PURCHASE[0]).done
    result = ep.step(PURCHASE[1])
    assert result.done and result.reward == 0.0 and result.info["outcome"] == "turn limit"
    assert result.observation == ITEM
    assert "within 2 actions" in ep.feedback()


def test_server_envs_are_reused_after_close(stub) -> None:
    env = WebShopEnv(stub.url)
    first, second = episode(env), episode(env, 4097)
    first.reset()
    second.reset()  # both live: two server envs
    assert (first.env_idx, second.env_idx) == (7, 8)
    first.close()
    third = episode(env, 4098)
    third.reset()
    assert third.env_idx == 7
    assert [path for _, path, _, _ in stub.requests].count("/create") == 2


def test_restore_replays_on_the_same_server_env(stub) -> None:
    env = WebShopEnv(stub.url)
    base = episode(env)
    observations = [base.reset()]
    observations += [base.step(a).observation for a in PURCHASE[:2]]
    retry = episode(env)
    retry.reset()
    assert retry.restore(PURCHASE[:2], observations)
    assert retry.step(PURCHASE[3]).reward == 0.75


def test_dead_server_fails_reset_with_the_url_and_a_start_hint() -> None:
    url = dead_url()
    env = WebShopEnv(url, step_timeout_s=0.5)
    with pytest.raises(WebShopServerError) as first:
        episode(env).reset()
    assert url in str(first.value) and "ConnectionRefused" in str(first.value)
    assert START_HINT in str(first.value) and "webshop --host 0.0.0.0 --port 36001" in START_HINT
    # in the explorer: that episode ends with reward 0 and info["error"]; nothing raises
    ctx = RolloutContext(env=env, engine=None, chat=None)
    state = start_episode(ctx, WebShopTasks(4096, 1)[0], RolloutCounters())
    assert state.done and state.trajectory.reward == 0.0
    assert url in state.trajectory.info["error"] and START_HINT not in state.trajectory.info["error"]


def test_server_that_dies_mid_episode_ends_it_with_an_error(stub) -> None:
    ep = episode(WebShopEnv(stub.url))
    ep.reset()
    stub.stop()
    result = ep.step(PURCHASE[0])
    assert result.done and result.reward == 0.0
    assert stub.url in result.info["error"] and START_HINT in result.info["error"]
    assert ep.env_idx is None and "server failed" in ep.feedback()


@pytest.mark.parametrize("path", ["/step", "/available_actions"])
def test_hanging_server_times_out_and_ends_the_episode(stub, path) -> None:
    ep = episode(WebShopEnv(stub.url, step_timeout_s=0.5))
    ep.reset()
    stub.hang.add(path)
    started = time.monotonic()
    result = ep.step(PURCHASE[0])
    assert time.monotonic() - started < 3
    assert result.done and result.reward == 0.0
    assert f"{path} timed out after 0.5 s" in result.info["error"] and stub.url in result.info["error"]


def test_hanging_reset_raises_a_timeout(stub) -> None:
    stub.hang.add("/reset")
    with pytest.raises(WebShopServerError, match="/reset timed out after 0.5 s"):
        episode(WebShopEnv(stub.url, step_timeout_s=0.5)).reset()


@pytest.mark.parametrize("path, raw, message", [
    ("/step", b"<html>Bad Gateway</html>", "malformed JSON"),
    ("/step", b'{"observation": "page", "reward": 0}', "unexpected JSON shape"),
    ("/available_actions", b'{"has_search_bar": false, "clickables": "all"}', "unexpected JSON shape"),
])
def test_malformed_answers_end_the_episode_with_an_error(stub, path, raw, message) -> None:
    ep = episode(WebShopEnv(stub.url))
    ep.reset()
    stub.raw[path] = raw
    result = ep.step(PURCHASE[0])
    assert result.done and result.reward == 0.0
    assert message in result.info["error"] and path in result.info["error"]


def test_malformed_answer_on_reset_raises(stub) -> None:
    stub.raw["/create"] = b'"seven"'
    with pytest.raises(WebShopServerError, match="POST /create answered an unexpected JSON shape"):
        episode(WebShopEnv(stub.url)).reset()


def test_server_that_lost_the_env_answers_500_and_only_the_first_error_has_the_hint(stub) -> None:
    env = WebShopEnv(stub.url)
    first, second = episode(env), episode(env, 4097)
    first.reset()
    second.reset()
    stub.pages.clear()  # e.g. the server was restarted
    errors = [ep.step(PURCHASE[0]).info["error"] for ep in (first, second)]
    assert all("/step answered HTTP 500" in e for e in errors)
    assert START_HINT in errors[0] and START_HINT not in errors[1]
    first.close()
    second.close()  # broken server envs are not given back for reuse
    third = episode(env, 4098)
    third.reset()
    assert third.env_idx == 9
