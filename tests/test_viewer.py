"""``r3l view``: the self-contained page, and what it shows in headless Chromium (Debian's chromium +
chromium-driver, driven by selenium; ``.ci/run`` installs them). ``R3L_VIEWER_SCREENSHOTS=DIR`` keeps the
screenshots (1400 and 700 px wide) in DIR."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from r3l_lightning.callbacks.evaluation import evaluate_tasks
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.records import trajectories_record
from r3l_lightning.rollout_log import RolloutLog, save_rollouts
from r3l_lightning.trajectory import ChatTokenizer
from r3l_lightning.viewer import config_summary, find_log_dir, load_records, render_html, write_viewer
from scripted import GuessEnv, GuessTasks, ScriptedEngine
from test_explorer import REFLECTION, script

INJECTION = "</script><script>window.pwned = 1</script>"
CONFIG = {
    "seed_everything": 7,
    "model": {"model_name_or_path": "tiny-random-smollm2"},
    "data": {"environment": {"class_path": "scripted.GuessEnv", "init_args": {"max_turns": 3}},
             "train_tasks": {"class_path": "scripted.GuessTasks", "init_args": {"n": 11}},
             "explorer": {"class_path": "r3l_lightning.explore.r3l.R3LExplorer", "init_args": {"group_size": 4}},
             "tasks_per_epoch": 2},
    "trainer": {"max_epochs": 3},
}


def write_run(chat, log_dir: Path) -> None:
    """Epoch 0: two groups whose valid reflections retry from step 1 (pear → apple: improved); epoch 1: one group
    with invalid reflections; epoch 2: one group whose valid reflections retry with the base's own answer (pear →
    pear: the same as the base at the pivot). Eval 0 and eval 2 (before and after training): tasks guess-1 and
    guess-10 (an id that contains the other), two rollouts each; before training guess-1's second answers INJECTION,
    after training both of guess-1's rollouts solve it."""
    trainer = SimpleNamespace(log_dir=str(log_dir), default_root_dir=str(log_dir), world_size=1,
                              is_global_zero=True, loggers=[], global_step=0)
    source = GuessTasks(11)
    valid = json.dumps(REFLECTION)
    for epoch, reflection, retry, tasks in ((0, valid, "apple", [source[0], source[1]]), (1, "no idea", "apple", [source[2]]),
                                            (2, valid, "pear", [source[3]])):
        engine = ScriptedEngine(script(reflection, retry), chat.tokenizer, chat.tokenizer.eos_token_id)
        result = R3LExplorer(group_size=4).explore(tasks, RolloutContext(GuessEnv(max_turns=3), engine, chat))
        save_rollouts(trainer, RolloutLog(), "train", epoch, result.records)
    for epoch, answers in ((0, ["pear", INJECTION, "pear", "pear"]), (2, ["apple", "apple", "pear", "apple"])):
        replies = iter(answers)
        engine = ScriptedEngine(lambda p: next(replies), chat.tokenizer, chat.tokenizer.eos_token_id)
        tasks = [source[1], source[10]]
        rollouts = evaluate_tasks(RolloutContext(GuessEnv(max_turns=1), engine, chat), tasks, SamplingParams(), 2)
        records = [trajectories_record(task, rollouts[2 * i: 2 * i + 2]) for i, task in enumerate(tasks)]
        save_rollouts(trainer, RolloutLog(), "eval", epoch, records)
    (log_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    write_run(ChatTokenizer(tiny_tokenizer, [tiny_tokenizer.eos_token_id]), root / "runs" / "job" / "csv" / "version_0")
    return root / "runs" / "job"


def test_page_is_self_contained_and_stores_repeated_text_once(run_dir):
    log_dir = find_log_dir(run_dir)
    assert log_dir == run_dir / "csv" / "version_0"
    assert find_log_dir(log_dir / "rollouts") == log_dir  # the rollouts folder itself is accepted
    records = load_records(log_dir)
    assert [(r["split"], r["epoch"]) for r in records] == [
        ("train", 0), ("train", 0), ("train", 1), ("train", 2), ("eval", 0), ("eval", 0), ("eval", 2), ("eval", 2)]
    page = render_html(records, "test")
    assert "<link" not in page and " src=" not in page and "http" not in page  # no CDN, no server: all inline
    assert INJECTION not in page  # model text cannot close the data script
    assert page.count("Play the guessing game. Answer with one word.") == 1  # the system prompt, in the string table


def test_config_summary_names_method_model_seed_and_tasks():
    assert config_summary(CONFIG) == [
        ["method", "R3LExplorer(group_size: 4)"],
        ["model", "tiny-random-smollm2"],
        ["seed", "7"],
        ["environment", "GuessEnv(max_turns: 3)"],
        ["train tasks", "GuessTasks(n: 11)"],
        ["schedule", "3 epochs × 2 tasks"],
    ]


def test_missing_records_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="r3l fit` writes them to <log_dir>/rollouts/"):
        find_log_dir(tmp_path)


CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if CHROMEDRIVER is None or shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(run_dir) -> str:
    page, groups = write_viewer(run_dir)
    assert groups == 8
    return page.resolve().as_uri()


def screenshot(browser, tmp_path, name: str, width: int = 1400) -> None:
    """Save the whole page (``R3L_VIEWER_SCREENSHOTS`` keeps it) at ``width`` px."""
    folder = Path(os.environ.get("R3L_VIEWER_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, min(max(height + 120, 600), 4000))
    assert browser.save_screenshot(str(folder / name))
    browser.set_window_size(1400, 1000)


def groups(browser) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#groups .group")


def cells(row) -> list[str]:
    from selenium.webdriver.common.by import By

    return [c.text for c in row.find_elements(By.CSS_SELECTOR, "td")]


def test_chromium_overview_config_and_compact_attempts_that_expand(page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    assert len(groups(browser)) == 8 and browser.find_element(By.ID, "count").text == "8 groups"
    config = browser.find_element(By.ID, "config").text
    assert "method R3LExplorer(group_size: 4)" in config and "seed 7" in config and "model tiny-random-smollm2" in config
    rows = browser.find_elements(By.CSS_SELECTOR, "#overview tr.epoch-row")
    # per epoch: groups, bases solved, reflections, informative, retried, improved, retry = base, zero-spread, SFT
    # epoch 0: 2 groups x 2 failed bases, each reflected on (valid, informative) and retried to apple (solved), each
    # correction giving an sft_reflect and an sft_retry sample
    assert [cells(r) for r in rows] == [
        ["train 0", "2", "0/4", "4", "4/4", "4", "4/4", "0", "0/2", "8"],
        ["train 1", "1", "0/2", "2", "0/2", "0", "0/0", "0", "1/1", "0"],  # invalid reflections: no retry
        ["train 2", "1", "0/2", "2", "2/2", "2", "0/2", "2", "1/1", "0"],  # the retries repeat pear: all rewards 0
        ["eval after 0", "2", "0/4", "–", "–", "–", "–", "–", "–", "–"],
        ["eval after 2", "2", "3/4", "–", "–", "–", "–", "–", "–", "–"],
    ]
    first = groups(browser)[0]
    assert first.find_elements(By.CSS_SELECTOR, ".side") == []  # compact: one line per attempt, nothing expanded
    lines = first.find_elements(By.CSS_SELECTOR, "tr.row")
    assert len(lines) == 2
    assert cells(lines[0])[:7] == ["0", "pear", "0", "failure informative by policy", "1", "apple", "1"]
    assert "informative reflections 2/2" in first.find_element(By.CSS_SELECTOR, "h2").text
    lines[0].click()  # expands the attempt below its line
    pivot = first.find_element(By.CSS_SELECTOR, ".side.base .msg.pivot")
    assert pivot.text.startswith("step 1") and "pivot" in pivot.text and pivot.text.endswith("pear")
    assert pivot.value_of_css_property("background-color") == "rgba(255, 243, 224, 1)"  # highlighted
    retry = first.find_element(By.CSS_SELECTOR, ".side.retry")
    assert "retry from step 1 (" in retry.text and "apple" in retry.text
    assert retry.find_element(By.CSS_SELECTOR, ".msg.guidance").is_displayed()
    panel = first.find_element(By.CSS_SELECTOR, ".reflection").text
    assert "verdict on the trajectory: failure" in panel and REFLECTION["improvement_suggestion"] in panel
    chip = first.find_element(By.CSS_SELECTOR, ".chips .chip")
    assert chip.text.startswith("base: R 0 · A ") and "R = the reward" in chip.get_attribute("title")
    screenshot(browser, tmp_path, "viewer_1400.png")
    screenshot(browser, tmp_path, "viewer_700.png", width=700)
    lines[0].click()  # and folds it again
    assert first.find_elements(By.CSS_SELECTOR, ".side") == []

    same = groups(browser)[3]  # epoch 2: the retries repeat the base's answer at the pivot
    assert "retry = base 2" in same.find_element(By.CSS_SELECTOR, "h2").text
    assert "zero reward spread" in same.find_element(By.CSS_SELECTOR, "h2").text
    assert cells(same.find_elements(By.CSS_SELECTOR, "tr.row")[0])[5] == "= base pear"


def test_chromium_labels_say_what_they_mean(page_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(page_url + "#epoch=eval:0")
    evals = groups(browser)
    assert [g.find_element(By.CSS_SELECTOR, "h2").text.split(" · ")[0] for g in evals] == ["eval after 0 epochs"] * 2
    evals[0].find_elements(By.CSS_SELECTOR, "tr.row")[1].click()
    text = evals[0].text
    assert INJECTION in text and browser.execute_script("return window.pwned === undefined")  # shown as text
    assert "rollout 1 · reward 0" in text and "trajectory (1 turn)" in text  # not "base reward", not "1 turns"
    assert "base reward" not in text and "no training sample" not in text  # an eval rollout trains nothing
    browser.get(page_url + "#epoch=train:1")
    browser.find_element(By.CSS_SELECTOR, "#groups tr.row").click()
    text = groups(browser)[0].text
    assert "reflection's verdict: none (invalid)" in text and "invalid: no_json" in text
    assert "base trajectory (3 turns)" in text


def test_chromium_filters_round_trip_through_the_address(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(page_url)
    Select(browser.find_element(By.ID, "filter-outcome")).select_by_value("retry-same")
    assert len(groups(browser)) == 1
    assert browser.execute_script("return location.hash") == "#outcome=retry-same"  # the address follows
    Select(browser.find_element(By.ID, "filter-kind")).select_by_value("distill")
    assert browser.execute_script("return location.hash") == "#kind=distill&outcome=retry-same"
    browser.refresh()  # a reload (or a shared link) shows the same selection
    assert browser.find_element(By.ID, "filter-outcome").get_attribute("value") == "retry-same"
    assert browser.find_element(By.ID, "filter-kind").get_attribute("value") == "distill"
    box = browser.find_element(By.ID, "filter-task")
    box.send_keys("guess-1")
    assert "task=guess-1" in browser.execute_script("return location.hash")
    # a link names only some filters: the others go back to their defaults, text in the task box included
    browser.get(page_url + "#epoch=train:1")
    browser.refresh()
    assert browser.find_element(By.ID, "filter-outcome").get_attribute("value") == "all"
    assert browser.find_element(By.ID, "filter-task").get_attribute("value") == ""
    assert len(groups(browser)) == 1
    browser.get(page_url + "#outcome=reflection-invalid&epoch=train:1")  # the README's kind of link
    assert len(groups(browser)) == 1
    browser.get(page_url + "#task=guess-1")  # an exact id: guess-1 only, not guess-10
    assert {g.get_attribute("data-task") for g in groups(browser)} == {"guess-1"}
    browser.get(page_url + "#task=guess-")  # any other text: ids containing it
    assert len(groups(browser)) == 8


def test_chromium_eval_before_and_after_side_by_side(page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url + "#view=eval-pairs")
    pairs = browser.find_elements(By.CSS_SELECTOR, "#groups .pair")
    assert [p.find_element(By.CSS_SELECTOR, "h2").text.split(" ")[:4] for p in pairs] == [
        ["guess-1", "·", "solved", "0/2"], ["guess-10", "·", "solved", "0/2"]]
    assert "solved 0/2 → 2/2" in pairs[0].text and "solved 0/2 → 1/2" in pairs[1].text
    sides = pairs[0].find_elements(By.CSS_SELECTOR, ".pairs > div")
    assert [s.find_element(By.CSS_SELECTOR, "h3").text for s in sides] == [
        "eval after 0 epochs (before training)", "eval after 2 epochs"]
    assert [cells(r)[1] for r in sides[1].find_elements(By.CSS_SELECTOR, "tr.row")] == ["apple", "apple"]
    screenshot(browser, tmp_path, "viewer_eval_pairs.png")
    browser.get(page_url + "#view=eval-pairs&task=guess-1")  # exact: one pair
    assert len(browser.find_elements(By.CSS_SELECTOR, "#groups .pair")) == 1


def test_chromium_pager_at_top_and_bottom(tmp_path, run_dir, browser):
    from selenium.webdriver.common.by import By

    log_dir = tmp_path / "many"
    (log_dir / "rollouts").mkdir(parents=True)
    record = load_records(find_log_dir(run_dir))[0]
    lines = [json.dumps(dict(record, task_id=f"task-{i}")) for i in range(25)]
    (log_dir / "rollouts" / "epoch_0.jsonl").write_text("\n".join(lines) + "\n")
    page, _ = write_viewer(log_dir)
    browser.get(page.resolve().as_uri())
    assert len(groups(browser)) == 20  # 20 groups a page
    bottom = browser.find_element(By.ID, "pager-bottom")
    assert "page 1 / 2" in bottom.text and "page 1 / 2" in browser.find_element(By.ID, "pager-top").text
    bottom.find_element(By.CSS_SELECTOR, "button.next").click()
    assert len(groups(browser)) == 5 and browser.execute_script("return location.hash") == "#page=2"
    browser.refresh()
    assert len(groups(browser)) == 5 and "page 2 / 2" in browser.find_element(By.ID, "pager-bottom").text
