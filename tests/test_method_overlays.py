"""Each method overlay resolves to the settings the README's "Method fidelity" tables give it (paper or
reference code), on top of the main task config. The behaviour behind each setting is tested elsewhere
(test_advantages, test_losses, test_r3l_rules, test_reflect_grpo, test_critique_grpo, test_explorer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from r3l_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "configs" / "countdown" / "r3l.yaml"

R3L = "r3l_lightning.explore.r3l.R3LExplorer"
GROUP = "r3l_lightning.explore.group.GroupExplorer"

EXPECTED = {
    "r3l_paper": {
        "explorer": (R3L, {"advantage": "r3l", "alpha": 3.0, "reflection_temperature": 0.7, "retries_per_base": 1,
                           "retry_selection": "all", "pivotal_credit": True, "sft_rule": "paper",
                           "correction_loss": "sft", "keep_success_reflections": False, "reflector": "policy",
                           "reflection_schema": "paper", "guidance_placement": "paper", "guidance_template": None,
                           "reflection_decoding": "schema", "retry_from": "pivot", "sft_reflections": True}),
        "model": {"loss": {"aggregation": "seq-mean-token-mean", "sft_coef": 1.0, "kl_coef": 0.0, "opmd_tau": 0.0,
                           "clip_low": None, "clip_high": None}, "weight_decay": 0.01, "max_grad_norm": 1.0},
    },
    "r3l_authors_code": {
        "explorer": (R3L, {"advantage": "r3l_reference", "alpha": 3.0, "reflection_temperature": 1.0,
                           "retries_per_base": 1, "pivotal_credit": True, "sft_rule": "authors",
                           "correction_loss": "reinforce", "keep_success_reflections": True, "sft_reflections": True,
                           "reflection_decoding": "free", "retry_from": "authors", "guidance_placement": "authors",
                           "temperature": 1.0, "reflection_max_new_tokens": 4096}),
        "model": {"loss": {"aggregation": "token-mean", "opmd_tau": 1.0, "kl_coef": 0.001, "kl_estimator": "k2",
                           "clip_low": None, "clip_high": None}, "weight_decay": 0.01, "max_grad_norm": 1.0},
    },
    "grpo": {
        "explorer": (GROUP, {"advantage": "grpo", "singleton": "no_signal"}),
        "model": {"loss": {"aggregation": "token-mean", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.01,
                           "kl_estimator": "k3"}},
    },
    "dapo": {
        "explorer": ("r3l_lightning.explore.dapo.DAPOExplorer",
                     {"advantage": "grpo", "drop_uniform_groups": True, "overlong_penalty": 1.0,
                      "overlong_max_tokens": 512, "overlong_buffer_tokens": 400, "overlong_length": "longest_response"}),
        "model": {"loss": {"aggregation": "token-mean", "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0},
                  "warmup_steps": 20},
    },
    "gspo": {
        "explorer": (GROUP, {"advantage": "grpo"}),
        "model": {"loss": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "kl_coef": 0.01,
                           "kl_estimator": "k3", "aggregation": "seq-mean-token-mean"}},
    },
    "opmd": {
        "explorer": (GROUP, {"advantage": "mean_baseline"}),
        "model": {"loss": {"aggregation": "token-mean", "opmd_tau": 1.0, "kl_coef": 0.0, "clip_low": None}},
    },
    "raft": {"explorer": ("r3l_lightning.explore.raft.RAFTExplorer", {"group_size": 1, "keep": "success"}),
             "model": {}},
    "reflect_grpo": {
        "explorer": ("r3l_lightning.explore.reflect_grpo.ReflectGRPOExplorer",
                     {"advantage": "grpo", "reflection_temperature": 0.7}),
        "model": {"loss": {"aggregation": "token-mean", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.01,
                           "kl_estimator": "k3"}},
    },
    "critique_grpo": {
        "explorer": ("r3l_lightning.explore.critique_grpo.CritiqueGRPOExplorer",
                     {"advantage": "grpo", "reflection_temperature": 0.7}),
        "model": {"loss": {"aggregation": "token-mean", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0,
                           "shaping_gamma": 0.1}},
    },
    "critique_grpo_reference": {
        "explorer": ("r3l_lightning.explore.critique_grpo.CritiqueGRPOReferenceExplorer",
                     {"advantage": "grpo", "reflection_temperature": 0.7}),
        "model": {"loss": {"aggregation": "token-mean", "clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0,
                           "shaping_gamma": 0.1}},
    },
    "r3l_policy_reflector": {"explorer": (R3L, {"reflector": "policy", "reflection_schema": "paper",
                                                   "sft_reflections": True}), "model": {}},
    "r3l_grounded": {"explorer": (R3L, {"reflector": "policy", "reflection_schema": "grounded",
                                                     "sft_reflections": True}), "model": {}},
    "r3l_no_pivot": {"explorer": (R3L, {"pivotal_credit": False, "advantage": "r3l"}), "model": {}},
    "r3l_no_amplification": {"explorer": (R3L, {"advantage": "grpo", "pivotal_credit": True}), "model": {}},
    "r3l_authors_code_no_amplification": {
        "explorer": (R3L, {"advantage": "mean_baseline", "singleton": "zero_baseline"}), "model": {}},
    "r3l_no_reflect_retry": {"explorer": (GROUP, {"advantage": "r3l"}), "model": {}},
    # the task's explorer; the learning rate and batch are the task config's (method table, "N, learning rate")
    "lora": {"explorer": (R3L, {}), "model": {"lr": 5e-4, "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0,
                                                                    "target_modules": "all-linear"}}},
}


def picked(actual: dict, expected: dict) -> dict:
    """The keys of ``expected`` from ``actual``; a nested block (``model.loss``, ``model.lora``) key by key as well."""
    return {k: picked(actual[k], v) if isinstance(v, dict) else actual[k] for k, v in expected.items()}


def resolved(overlay: str, capsys) -> dict:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(TASK), "--config", str(ROOT / "configs" / "methods" / f"{overlay}.yaml"),
                  "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_every_row_of_the_table_has_its_overlay():
    # a method outside the paper (docs/extending.md's best_of_n) needs no row: test_cli parses and trains every
    # overlay, and a new method is one explorer file, one overlay and one test, with nothing to register here
    assert set(EXPECTED) <= {p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml")}


@pytest.mark.parametrize("overlay", sorted(EXPECTED))
def test_overlay_resolves_to_its_table_settings(overlay, capsys):
    config = resolved(overlay, capsys)
    class_path, init_args = EXPECTED[overlay]["explorer"]
    explorer = config["data"]["explorer"]
    assert explorer["class_path"] == class_path
    assert {k: explorer["init_args"][k] for k in init_args} == init_args
    assert picked(config["model"], EXPECTED[overlay]["model"]) == EXPECTED[overlay]["model"]


def test_the_authors_code_overlay_after_the_paper_one_and_back(capsys):
    # whichever of the two R³L overlays comes last decides every key r3l_paper sets (r3l_authors_code also sets
    # the rollout temperature and the reflection budget, which r3l_paper leaves to the task config)
    paper, authors = EXPECTED["r3l_paper"], EXPECTED["r3l_authors_code"]
    for order, expected in ((["r3l_paper", "r3l_authors_code"], authors), (["r3l_authors_code", "r3l_paper"], paper)):
        args = ["fit", "--config", str(TASK)]
        for overlay in order:
            args += ["--config", str(ROOT / "configs" / "methods" / f"{overlay}.yaml")]
        with pytest.raises(SystemExit):
            cli_main(args + ["--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        init_args = expected["explorer"][1]
        assert {k: config["data"]["explorer"]["init_args"][k] for k in init_args} == init_args
        assert {k: config["model"]["loss"][k] for k in ("aggregation", "opmd_tau", "kl_coef")} == {
            k: expected["model"]["loss"][k] for k in ("aggregation", "opmd_tau", "kl_coef")}
