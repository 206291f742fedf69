"""Settings rules: one source of defaults, settings that would have no effect, cross-section checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.train.loop import _flat  # the run-settings flattener: dotted keys of nested settings
from stages.config import ConfigError, config_from_dict, config_to_dict, load_config

SHIPPED_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

# The only keys where the shipped params.yaml may differ from the defaults: the demo's transfer
# set (IMDB sentences) suits the movie-review demo only, so by default there is none.
DEMO_ONLY = {"data.transfer", "prepare.transfer_source"}


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


# --------------------------------------------------------------------------- one source of defaults


def test_shipped_params_equal_the_defaults_except_demo_data():
    shipped = _flat(config_to_dict(load_config(SHIPPED_PARAMS)))
    default = _flat(config_to_dict(config_from_dict({})))
    differ = {k for k in default if shipped[k] != default[k]}
    assert differ == DEMO_ONLY, {k: (shipped[k], default[k]) for k in differ ^ DEMO_ONLY}


# --------------------------------------------------------------------------- student: no ignored keys


def test_student_sizes_left_with_from_teacher_are_errors_naming_each_key():
    # The user's mistake: switch to from_teacher and keep the sizes of the config student.
    lines = _problems({"distill": {"student": {"from_teacher": "models/teacher", "keep_layers": [0, 5],
                                               "num_layers": 2, "hidden_size": 192, "num_heads": 3}}})
    for key in ("num_layers", "hidden_size", "num_heads"):
        assert (f"distill.student.{key}: only applies to config: (a random-init student); from_teacher keeps "
                "the model's own size, so remove it") in lines
    assert not any("intermediate_size" in line for line in lines)  # not set, not reported


def test_sizes_and_keep_layers_with_pretrained_are_errors():
    lines = _problems({"distill": {"student": {"pretrained": "some/model", "keep_layers": [0, 5],
                                               "intermediate_size": 512}}})
    assert "distill.student.keep_layers: only applies to from_teacher, not to pretrained; remove it" in lines
    assert any(line.startswith("distill.student.intermediate_size: only applies to config:") for line in lines)


def test_keep_layers_with_config_is_an_error_and_from_teacher_needs_it():
    lines = _problems({"distill": {"student": {"keep_layers": [0, 5]}}})  # on top of the default config student
    assert lines == ["distill.student.keep_layers: only applies to from_teacher, not to config; remove it"]
    lines = _problems({"distill": {"student": {"from_teacher": "models/teacher"}}})
    assert lines == ["distill.student.keep_layers: from_teacher needs the teacher blocks to keep, e.g. [0, 5]"]


def test_student_section_merges_with_the_default_only_without_a_way_to_build():
    # Sizes alone adjust the default config student ...
    s = config_from_dict({"distill": {"student": {"num_layers": 4}}}).distill.student
    assert (s.config, s.num_layers, s.hidden_size) == ("models/teacher", 4, 192)
    # ... while naming from_teacher/pretrained/config describes the whole student (no leftover sizes).
    s = config_from_dict({"distill": {"student": {"from_teacher": "t", "keep_layers": [0, 3]}}}).distill.student
    assert (s.from_teacher, s.keep_layers, s.config, s.num_layers) == ("t", [0, 3], None, None)
    s = config_from_dict({"distill": {"student": {"from_teacher": None, "pretrained": "p"}}}).distill.student
    assert (s.pretrained, s.config, s.hidden_size) == ("p", None, None)
    s = config_from_dict({"distill": {"student": {"config": "c", "num_layers": 1}}}).distill.student
    assert (s.config, s.num_layers, s.hidden_size) == ("c", 1, None)  # None: the config's own width


def test_exactly_one_way_to_build_the_student():
    lines = _problems({"distill": {"student": {"from_teacher": "t", "keep_layers": [0], "config": "c"}}})
    assert lines[0].startswith("distill.student: set exactly one of from_teacher")
    assert "got ['from_teacher', 'config']" in lines[0]


def test_shipped_params_switched_to_from_teacher_names_the_leftovers(tmp_path: Path):
    # `dvc exp run -S` on the shipped file: every key that would be ignored is named.
    with pytest.raises(ConfigError) as err:
        load_config(SHIPPED_PARAMS, ["distill.student.from_teacher=models/teacher", "distill.student.config=null",
                                     "distill.student.keep_layers=[0, 5]"])
    text = str(err.value)
    for key in ("num_layers", "hidden_size", "intermediate_size", "num_heads"):
        assert f"distill.student.{key}: only applies to config:" in text


# --------------------------------------------------------------------------- data.label_names


def test_label_names_must_match_num_labels_and_be_unique_and_non_empty():
    assert config_from_dict({"data": {"label_names": ["neg", "pos"]}}).data.label_names == ["neg", "pos"]
    lines = _problems({"data": {"label_names": ["neg", "pos", "mixed"]}})
    assert lines == ["data.label_names: 3 names for data.num_labels: 2; give one name per class, in label-id "
                     "order, or fix num_labels"]
    assert config_from_dict({"data": {"label_names": ["neg", "pos", "mixed"], "num_labels": 3}}).data.num_labels == 3
    lines = _problems({"data": {"label_names": ["pos", "pos"]}})
    assert lines == ["data.label_names: ['pos'] listed more than once; each class needs its own name"]
    lines = _problems({"data": {"label_names": ["neg", " "]}})
    assert lines == ["data.label_names: names must be non-empty (got ['neg', ' '])"]


# --------------------------------------------------------------------------- matches (per match)


def test_match_layers_follow_the_kind_and_attention_has_no_projection():
    lines = _problems({"precompute": {"hidden_layers": [2], "attention_layers": [1]},
                       "distill": {"matches": [{"kind": "mmd", "teacher_layer": 2, "student_layer": [1, 1]},
                                               {"kind": "hidden_mse", "teacher_layer": [2, 2], "student_layer": 1},
                                               {"kind": "attention_ce", "teacher_layer": 1, "student_layer": 0,
                                                "projection": "linear"}]}})
    assert lines == [
        "distill.matches[0].teacher_layer: mmd takes a pair of layers [a, b], got 2",
        "distill.matches[1].teacher_layer: hidden_mse takes one layer index, got [2, 2]",
        "distill.matches[2].projection: attention_ce compares attention maps, which have no width to project; "
        "remove projection",
    ]


def test_unknown_match_preset_lists_the_valid_ones():
    lines = _problems({"distill": {"match_preset": "L3_hidden_mse+L5_hidden_mse", "teacher_signal": "online"}})
    assert len(lines) == 1 and lines[0].startswith("distill.match_preset: unknown preset(s) ['L5_hidden_mse']")
    assert "L3_hidden_mse" in lines[0] and "L6_attention_ce" in lines[0]


# --------------------------------------------------------------------------- cross-section rules


def test_match_on_an_uncached_layer_names_the_layer_and_the_fix():
    lines = _problems({"precompute": {"hidden_layers": [2]},
                       "distill": {"matches": [{"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 2},
                                               {"kind": "attention_mse", "teacher_layer": 1, "student_layer": 0}]}})
    assert lines == [
        "distill.matches[0].teacher_layer: layer(s) [4] are not cached; add them to precompute.hidden_layers "
        "(now [2]) or use distill.teacher_signal: online",
        "distill.matches[1].teacher_layer: layer(s) [1] are not cached; add them to precompute.attention_layers "
        "(now []) or use distill.teacher_signal: online",
    ]
    # Online teachers, or caches named explicitly, are not checked against precompute's settings.
    config_from_dict({"distill": {"teacher_signal": "online",
                                  "matches": [{"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 2}]}})
    config_from_dict({"distill": {"caches": ["caches/x"],
                                  "matches": [{"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 2}]}})


def test_first_token_cache_refuses_token_level_kinds_and_suggests_pkd():
    base = {"precompute": {"hidden_layers": [4], "hidden_tokens": "first"}}
    lines = _problems({**base, "distill": {"matches": [{"kind": "hidden_cosine", "teacher_layer": 4,
                                                        "student_layer": 2}]}})
    assert lines == ["distill.matches[0].kind: hidden_cosine needs every token but precompute.hidden_tokens is "
                     "'first'; set it to 'all' or use kind pkd"]
    ok = config_from_dict({**base, "distill": {"matches": [{"kind": "pkd", "teacher_layer": 4, "student_layer": 2}]}})
    assert ok.distill.matches[0].kind == "pkd"


def test_kd_weight_without_cached_logits_names_both_fixes():
    lines = _problems({"precompute": {"logits": False, "hidden_layers": [4]}})
    assert lines == ["distill.kd.weight: > 0 needs teacher logits; set precompute.logits: true or distill.kd.weight: 0"]
    config_from_dict({"precompute": {"logits": False, "hidden_layers": [4]}, "distill": {"kd": {"weight": 0}}})


def test_teacher_weights_count_must_match_the_teachers():
    two = {"teachers": ["a", "b"]}
    lines = _problems({"precompute": two, "distill": {"kd": {"teacher_weights": [1.0]}}})
    assert lines == ["distill.kd.teacher_weights: 1 weights for 2 teachers; give one weight per teacher, "
                     "in the same order"]
    config_from_dict({"precompute": two, "distill": {"kd": {"teacher_weights": [0.7, 0.3]}}})
    # Explicit caches (cached) or distill.teachers (online) are what gets combined, not precompute.teachers.
    lines = _problems({"precompute": two, "distill": {"caches": ["c1", "c2", "c3"], "kd": {"teacher_weights": [1, 1]}}})
    assert lines[0].startswith("distill.kd.teacher_weights: 2 weights for 3 teachers")
    config_from_dict({"precompute": two, "distill": {"teacher_signal": "online", "teachers": ["x"],
                                                     "kd": {"teacher_weights": [1.0]}}})


def test_no_teacher_refuses_matches_and_needs_the_label_term():
    lines = _problems({"distill": {"teacher_signal": "none", "match_preset": "L3_hidden_mse",
                                   "kd": {"hard_weight": 0}}})
    assert lines == [
        "distill.matches: intermediate matches need a teacher, but teacher_signal is 'none'; remove matches and "
        "match_preset or set teacher_signal: cached",
        "distill.kd.hard_weight: must be > 0 when teacher_signal is 'none' (nothing to learn)",
    ]


def test_task_kind_rules_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"distill.max_length: 48 differs from precompute.max_length 64; data.task "
                                          r"extractive_qa caches one teacher output per token of each window"):
        config_from_dict({"data": {"task": "extractive_qa"}, "distill": {"max_length": 48}})
    with pytest.raises(ConfigError, match=r"data.doc_stride: only applies to data.task: extractive_qa, not "
                                          r"sequence_classification; remove it"):
        config_from_dict({"data": {"doc_stride": 32}})
    with pytest.raises(ConfigError, match=r"distill.kd.temperature_schedule: flsw applies to one class "
                                          r"distribution per example, and data.task is token_classification"):
        config_from_dict({"data": {"task": "token_classification"}, "distill": {"kd": {"temperature_schedule": "flsw"}}})
    with pytest.raises(ConfigError, match=r"data.transfer: an unlabelled transfer set is not supported for "
                                          r"data.task: regression"):
        config_from_dict({"data": {"task": "regression", "transfer": "t.csv"}, "distill": {"kd": {"loss": "mse"}}})


def test_every_task_kind_in_the_settings_has_a_module_and_back():
    from stages.kinds import TASK_KINDS
    from stages.tasks import TASKS

    assert set(TASK_KINDS) == set(TASKS)
    assert all(TASKS[name].name == name for name in TASKS)
