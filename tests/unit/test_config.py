"""The typed config: defaults, and errors that name the key and what is allowed."""

from pathlib import Path

import pytest

from distill.config import Config, ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_load_and_match_schema():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.source == "stdlib"
    assert cfg.teacher.optim.steps > 0
    assert cfg.distill.divergence in ("forward_kl", "reverse_kl", "jsd")


def test_empty_params_give_defaults():
    assert build_config({}) == Config()


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"lrr": 1.0}}, "unknown key train.lrr"),
    ({"trian": {}}, "unknown key trian"),
    ({"teacher": {"optim": {"stepz": 3}}}, "unknown key teacher.optim.stepz"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number"),
    ({"train": {"steps": 2.5}}, "train.steps must be an integer"),
    ({"train": {"use_gpu": "yes"}}, "train.use_gpu must be true or false"),
    ({"train": {"lr": -1.0}}, "train.lr = -1.0 is out of range (must be > 0.0"),
    ({"distill": {"alpha": 1.5}}, "distill.alpha = 1.5 is out of range"),
    ({"distill": {"divergence": "kl"}}, "allowed: forward_kl, reverse_kl, jsd"),
    ({"gate": {"scenario": "cheap"}}, "gate.scenario = 'cheap' is not allowed"),
    ({"data": {"val_fraction": 0.0}}, "data.val_fraction = 0.0 is out of range"),
    ({"student": {"d_model": 30, "heads": 4}}, "student.d_model (30) must be divisible by student.heads (4)"),
    ({"train": {"steps": 10, "warmup_steps": 10}}, "train.warmup_steps (10) must be smaller"),
    ({"label": {"backend": "vllm", "tensor_parallel_size": 2, "gpus_per_actor": 1}},
     "label.gpus_per_actor ≥ 2"),
    ({"label": {"backend": "vllm", "gpus_per_actor": 1}, "distill": {"temperature": 2.0}},
     "label.backend = vllm needs distill.temperature = 1.0"),
    ({"data": 3}, "data must be a mapping"),
    ({"label": {"inline_blocks": -1}}, "label.inline_blocks = -1 is out of range"),
])
def test_bad_values_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert fragment in str(err.value)


def test_integers_written_as_floats_are_accepted():
    assert build_config({"teacher": {"pretrain_tokens": 1e6}, "train": {"steps": 1e2}}).train.steps == 100


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: parameters file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_overrides_are_validated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("seed: 1\n")
    assert load_config(path, {"train.steps": 70}).train.steps == 70
    with pytest.raises(ConfigError, match="unknown key train.nonsense"):
        load_config(path, {"train.nonsense": 7})
