"""Settings parsing: every problem reported at once, with the key that has it."""

from pathlib import Path

import pytest

from stages.config import ConfigError, config_from_dict, load_config


def test_defaults_load():
    cfg = config_from_dict({})
    assert cfg.distill.lr == pytest.approx(1e-4)
    assert cfg.distill.student.keep_layers == [0, 5]


@pytest.mark.parametrize("text", ["5e-4", "5.0e-4", "1E+2", ".5", "2"])
def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path, text: str):
    # PyYAML (YAML 1.1) reads `5e-4` as a string; a float setting must still take it.
    params = tmp_path / "params.yaml"
    params.write_text(f"distill:\n  lr: {text}\n")
    assert load_config(params).distill.lr == float(text)
    assert load_config(tmp_path / "params.yaml", [f"train_teacher.lr={text}"]).train_teacher.lr == float(text)


def test_errors_are_collected_and_name_the_key():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"distill": {"lr": "fast", "epochs": "two", "bogus": 1}, "precompute": {"dtype": "int3"}})
    text = str(err.value)
    for key in ("distill.lr", "distill.epochs", "distill.bogus: unknown key", "precompute.dtype"):
        assert key in text


def test_set_needs_key_and_value(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(tmp_path / "params.yaml", ["distill.lr"])
