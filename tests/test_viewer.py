"""``r3l view``: the self-contained page, and what it shows in headless Chromium (Debian's chromium +
chromium-driver, driven by selenium; ``.ci/run`` installs them)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from r3l_lightning.callbacks.evaluation import evaluate_tasks
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.records import trajectories_record
from r3l_lightning.rollout_log import RolloutLog, save_rollouts
from r3l_lightning.viewer import find_log_dir, load_records, render_html, write_viewer
from scripted import GuessEnv, GuessTasks, ScriptedEngine
from test_explorer import REFLECTION, script

INJECTION = "</script><script>window.pwned = 1</script>"


def write_run(chat, log_dir: Path) -> None:
    """Epoch 0: two groups whose valid reflections retry from step 1 (pear → apple); epoch 1: one group
    with invalid reflections; eval 0: one group of two evaluation rollouts, one answering INJECTION."""
    trainer = SimpleNamespace(log_dir=str(log_dir), default_root_dir=str(log_dir), world_size=1,
                              is_global_zero=True, loggers=[], global_step=0)
    source = GuessTasks(3)
    for epoch, reflection, tasks in ((0, json.dumps(REFLECTION), [source[0], source[1]]), (1, "no idea", [source[2]])):
        engine = ScriptedEngine(script(reflection), chat.tokenizer, chat.tokenizer.eos_token_id)
        result = R3LExplorer(group_size=4).explore(tasks, RolloutContext(GuessEnv(max_turns=3), engine, chat))
        save_rollouts(trainer, RolloutLog(), "train", epoch, result.records)
    answers = iter(["apple", INJECTION])
    engine = ScriptedEngine(lambda p: next(answers), chat.tokenizer, chat.tokenizer.eos_token_id)
    rollouts = evaluate_tasks(RolloutContext(GuessEnv(max_turns=1), engine, chat), [source[0]], SamplingParams(), 2)
    save_rollouts(trainer, RolloutLog(), "eval", 0, [trajectories_record(source[0], rollouts)])


@pytest.fixture()
def run_dir(tmp_path, tiny_chat) -> Path:
    write_run(tiny_chat, tmp_path / "runs" / "job" / "csv" / "version_0")
    return tmp_path / "runs" / "job"


def test_page_is_self_contained_and_stores_repeated_text_once(run_dir):
    log_dir = find_log_dir(run_dir)
    assert log_dir == run_dir / "csv" / "version_0"
    records = load_records(log_dir)
    assert [(r["split"], r["epoch"]) for r in records] == [("train", 0), ("train", 0), ("train", 1), ("eval", 0)]
    page = render_html(records, "test")
    assert "<link" not in page and " src=" not in page and "http" not in page  # no CDN, no server: all inline
    assert INJECTION not in page  # model text cannot close the data script
    assert page.count("Play the guessing game. Answer with one word.") == 1  # the system prompt, in the string table


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


def test_chromium_renders_groups_pivot_and_reflection_and_filters_them(run_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page, groups = write_viewer(run_dir)
    assert groups == 4
    browser.get(page.resolve().as_uri())
    count = lambda: len(browser.find_elements(By.CSS_SELECTOR, ".group"))  # noqa: E731
    assert count() == 4
    assert browser.find_element(By.ID, "count").text == "4 groups"
    pivots = browser.find_elements(By.CSS_SELECTOR, ".side.base .msg.pivot")
    assert len(pivots) == 4  # one per retried base trajectory (2 groups x 2 attempts)
    assert pivots[0].text.startswith("step 1") and "pivot" in pivots[0].text and pivots[0].text.endswith("pear")
    assert pivots[0].value_of_css_property("background-color") == "rgba(255, 243, 224, 1)"  # highlighted
    retry = browser.find_element(By.CSS_SELECTOR, ".side.retry")
    assert "retry from step 1" in retry.text and "apple" in retry.text
    assert retry.find_element(By.CSS_SELECTOR, ".msg.guidance").is_displayed()
    panel = browser.find_element(By.CSS_SELECTOR, ".reflection").text
    assert "root_cause_analysis" in panel and REFLECTION["improvement_suggestion"] in panel
    chips = browser.find_element(By.CSS_SELECTOR, ".chips").text
    assert "base: R 0 · A -0.87" in chips and "distill: R 1 · A +3.00" in chips
    shot = Path(os.environ.get("R3L_VIEWER_SCREENSHOT", tmp_path / "viewer.png"))
    assert browser.save_screenshot(str(shot))

    Select(browser.find_element(By.ID, "filter-outcome")).select_by_value("reflection-invalid")
    assert count() == 1 and "invalid: no_json" in browser.find_element(By.CSS_SELECTOR, ".group").text
    Select(browser.find_element(By.ID, "filter-outcome")).select_by_value("all")
    Select(browser.find_element(By.ID, "filter-kind")).select_by_value("distill")
    assert count() == 2
    Select(browser.find_element(By.ID, "filter-kind")).select_by_value("all")
    Select(browser.find_element(By.ID, "filter-epoch")).select_by_value("eval:0")
    assert count() == 1
    group = browser.find_element(By.CSS_SELECTOR, ".group").text
    assert group.startswith("eval after 0 epochs · guess-0") and INJECTION in group  # shown as text
    assert browser.execute_script("return window.pwned === undefined")
    browser.get(page.resolve().as_uri() + "#outcome=reflection-invalid&epoch=train:1")  # filters in the address
    assert count() == 1 and browser.find_element(By.ID, "filter-outcome").get_attribute("value") == "reflection-invalid"
