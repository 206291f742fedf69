"""Settings parsing: every problem reported at once, with the key that has it."""

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from stages.config import ConfigError, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_load():
    cfg = config_from_dict({})
    assert cfg.distill.lr == pytest.approx(5e-4)
    assert cfg.distill.kd.hard_weight == 1.0
    s = cfg.distill.student
    assert (s.config, s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads) == ("models/teacher", 2, 192, 768, 3)
    assert s.from_teacher is None and s.keep_layers is None and s.pretrained is None
    assert cfg.train_teacher.epochs == 2 and cfg.distill.epochs == 3  # one loop's settings, per-stage defaults


@pytest.mark.parametrize("text", ["5e-4", "5.0e-4", "1E+2", ".5", "2"])
def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path, text: str):
    # PyYAML (YAML 1.1) reads `5e-4` as a string; a float setting must still take it.
    params = tmp_path / "params.yaml"
    params.write_text(f"distill:\n  lr: {text}\n")
    assert load_config(params).distill.lr == float(text)
    assert load_config(tmp_path / "params.yaml", [f"train_teacher.lr={text}"]).train_teacher.lr == float(text)
    assert isinstance(load_config(params).distill.lr, float)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("batch_size", True, "expected int, got True"),  # bool is an int subclass in Python; not a count
        ("batch_size", 2.0, "expected int, got 2.0"),
        ("batch_size", "2", "expected int, got '2'"),
        ("batch_size", "5e-4", "expected int, got '5e-4'"),  # YAML-1.1 strings are floats only
        ("lr", True, "expected float, got True"),
        ("lr", "fast", "expected float, got 'fast'"),
        ("resume", 1, "expected true or false, got 1"),
        ("output", 3, "expected str, got 3"),
        ("caches", "a/b", "expected list, got 'a/b'"),
    ],
)
def test_types_are_strict(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"distill.{key}: {expected}")):
        config_from_dict({"distill": {key: value}})


@pytest.mark.parametrize("data, expected", [
    # an unknown key or a wrong type stops a section before its value rules: they must still be reported
    ({"distill": {"foo": 1, "lr": -1.0}}, ["distill.foo: unknown key", "distill.lr: must be > 0 (got -1.0)"]),
    ({"distill": {"epochs": "abc", "lr": -1.0}}, ["distill.epochs: expected float, got 'abc'",
                                                  "distill.lr: must be > 0 (got -1.0)"]),
    ({"precompute": {"lm": {"codec": "dens", "k": 0}}}, ["precompute.lm.codec: 'dens' is not one of",
                                                         "precompute.lm.k: must be >= 1 (got 0)"]),
    # a dropped required key is not reported again as missing (its section's other rules stay hidden then)
    ({"distill": {"teacher_signal": "online", "matches": [{"kind": "bogus", "teacher_layer": 1,
                                                          "student_layer": 1}], "lr": -1.0}},
     ["distill.matches[0].kind: 'bogus' is not one of"]),
])
def test_rules_behind_a_type_error_or_unknown_key_are_reported_too(data, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == len(expected)
    for line, want in zip(sorted(lines), sorted(expected)):
        assert line.strip().startswith(want)


def test_a_rule_about_a_mistyped_choice_is_not_judged_against_its_default():
    # codec "dens" is dropped for the second pass; max_dense_vocab must not be called a topk misfit
    with pytest.raises(ConfigError) as err:
        config_from_dict({"precompute": {"lm": {"codec": "dens", "max_dense_vocab": 10}}})
    assert "max_dense_vocab" not in str(err.value) and "precompute.lm.codec: 'dens'" in str(err.value)


def test_errors_are_collected_and_name_the_key():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"distill": {"lr": "fast", "epochs": "two", "bogus": 1}, "precompute": {"dtype": "int3"}})
    text = str(err.value)
    assert text.startswith("invalid settings:\n  ")
    for key in ("distill.lr", "distill.epochs", "distill.bogus: unknown key", "precompute.dtype"):
        assert key in text
    assert len(text.splitlines()) == 5  # the header and one line per problem


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"distill": {"kd": {"temprature": 2}}, "evaluat": {}})
    lines = str(err.value).splitlines()[1:]
    assert lines[0].strip().startswith("distill.kd.temprature: unknown key; valid keys here: loss, weight,")
    assert "temperature" in lines[0] and "teacher_weights" in lines[0]
    assert lines[1].strip() == ("evaluat: unknown key; valid keys here: data, prepare, augment, train_teacher, "
                                "precompute, distill, evaluate, tasks")


def test_choices_list_the_allowed_values_and_lists_name_the_item():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"precompute": {"dtype": "int3", "hidden_layers": [1, "two"]},
                          "distill": {"matches": [{"kind": "hidden_l1", "teacher_layer": 1, "student_layer": 1},
                                                  {"kind": "pkd", "teacher_layer": "x", "student_layer": 1}]}})
    text = str(err.value)
    assert "precompute.dtype: 'int3' is not one of 'float32', 'float16' or 'bfloat16'" in text
    assert "precompute.hidden_layers[1]: expected int, got 'two'" in text
    assert "distill.matches[0].kind: 'hidden_l1' is not one of 'hidden_mse', " in text and "'attention_ce'" in text
    assert "distill.matches[1].teacher_layer: expected a layer index or a list of them, got 'x'" in text


def test_a_section_that_is_not_a_mapping_and_a_missing_match_field():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": None, "distill": {"matches": [{"kind": "pkd", "teacher_layer": 1}]}})
    text = str(err.value)
    assert "data: expected a mapping of settings, got None" in text
    assert "distill.matches[0].student_layer: required setting is missing" in text


def test_settings_are_frozen():
    cfg = config_from_dict({})
    with pytest.raises(ValueError, match="frozen"):
        cfg.distill.kd.temperature = 2.0  # type: ignore[misc]
    assert cfg.distill.kd.temperature == 4.0


def test_config_to_dict_is_plain_and_round_trips():
    cfg = config_from_dict({"distill": {"matches": [{"kind": "mmd", "teacher_layer": [2, 2], "student_layer": [1, 1]}]},
                            "precompute": {"hidden_layers": [2]}})
    plain = config_to_dict(cfg)
    assert json.loads(json.dumps(plain)) == plain and yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert plain["distill"]["matches"][0]["teacher_layer"] == [2, 2]
    assert config_from_dict(plain) == cfg
    # Defaults are typed like parsed values: the same settings give the same text (fingerprints).
    assert json.dumps(config_to_dict(config_from_dict(plain))) == json.dumps(plain)
    assert plain["distill"]["epochs"] == 3.0 and isinstance(plain["distill"]["epochs"], float)
    assert config_to_dict(cfg.distill.kd) == plain["distill"]["kd"]  # any section, too


def test_set_needs_key_and_value(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(tmp_path / "params.yaml", ["distill.lr"])


def test_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist; pass an existing file to --params"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)


@pytest.mark.parametrize("module", ["config.py", "kinds.py"])
def test_config_stays_light(module: str):
    # The settings layer sits at the bottom: no torch or model code (the kinds registry is torch-free).
    tree = ast.parse((ROOT / "stages" / module).read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    top = {name.split(".")[0] for name in imported if name}
    assert top <= {"__future__", "copy", "dataclasses", "re", "pathlib", "typing", "yaml", "pydantic", "pydantic_core",
                   "cache_format", "stages"}, top
    assert {name for name in imported if name and name.startswith("stages")} <= {"stages.kinds"}
