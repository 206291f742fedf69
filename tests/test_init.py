"""`kd init`: settings for your own files (columns, task kind, label names, max_length, splits, transfer), and the
checks it and the stages make of the data: string labels named from the training split, unseen dev labels, a bad
test file stopped before training, no transfer set the params do not name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from stages.config import config_from_dict, load_config
from stages.data import DataError, resolve_labels, with_label_names
from stages.init import InitError, init
from stages.prepare import prepare
from stages.tasks import check_data, checked
from tests.test_own_data import topic_rows, write_topics
from tests.helpers import write_csv, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# kd init: what it writes


def test_init_writes_params_for_a_topic_csv_with_nothing_left_from_the_demo(here, tiny_model_dir):
    write_topics(here / "topics.csv", topic_rows(90))
    res = init(["topics.csv"], teacher=str(tiny_model_dir))
    text = (here / "params.yaml").read_text()
    params = yaml.safe_load(text)
    data = params["data"]
    assert data["label_names"] == ["business", "sports", "world"] and data["num_labels"] == 3
    assert (data["text_field"], data["label_field"], data["task"]) == ("body", "topic", "sequence_classification")
    assert data["id_field"] is None  # no id column: hashes of the text
    assert (data["train"], data["dev"], data["test"]) == ("data/train.csv", "data/dev.csv", "data/test.csv")
    assert params["prepare"]["source"] == "topics.csv"
    assert params["prepare"]["transfer_source"] == "bundled:ptb_sentences"
    assert params["prepare"]["transfer_examples"] == 19931 and data["transfer"] == "data/transfer.csv"
    assert "94.2%" in text and "30,000" in text  # the measured reason, as a comment
    values = json.dumps(params)  # no demo leftovers among the settings (the comment may name IMDB as a choice)
    assert "imdb" not in values and "rotten_tomatoes" not in values and "movie" not in values
    assert res.split == {"train": 72, "dev": 9, "test": 9}
    # max_length: the 95th percentile of the token counts, up to a multiple of 16, everywhere
    assert res.max_length % 16 == 0 and res.max_length >= res.length_p95
    for section in ("train_teacher", "precompute", "distill", "evaluate"):
        assert params[section]["max_length"] == res.max_length
    cfg = load_config(here / "params.yaml")
    assert cfg.data.label_names == ["business", "sports", "world"]


def test_init_params_hold_every_key_dvc_yaml_reads(here, tiny_model_dir):
    write_topics(here / "topics.csv", topic_rows(60))
    init(["topics.csv"], teacher=str(tiny_model_dir))
    params = yaml.safe_load((here / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keys = {k for s in stages.values() for k in s.get("params", [])}
    keys |= {part[2:-1] for s in stages.values() for d in s.get("deps", []) for part in [str(d)]
             if part.startswith("${")}
    for key in sorted(keys):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml reads {key}, which kd init does not write"
            node = node[part]


def test_init_refuses_to_overwrite_params_unless_forced(here, tiny_model_dir):
    write_topics(here / "topics.csv", topic_rows(60))
    (here / "params.yaml").write_text("# mine\n")
    with pytest.raises(InitError, match=r"params.yaml exists; pass --force"):
        init(["topics.csv"], teacher=str(tiny_model_dir))
    assert (here / "params.yaml").read_text() == "# mine\n"
    out = CliRunner().invoke(cli, ["init", "topics.csv", "--teacher", str(tiny_model_dir)])
    assert out.exit_code == 1 and "exists; pass --force" in out.output
    assert (here / "params.yaml").read_text() == "# mine\n"
    init(["topics.csv"], teacher=str(tiny_model_dir), force=True)
    assert "label_names" in (here / "params.yaml").read_text()
    assert not list(here.glob("*.partial")) and not list(here.glob(".*tmp*"))


def test_init_that_cannot_tell_the_columns_says_so_in_one_line(here, tiny_model_dir):
    write_csv(here / "x.csv", ["headline", "body", "kind"], [("a b", "c d", "x"), ("e f", "g h", "y")])
    out = CliRunner().invoke(cli, ["init", "x.csv", "--teacher", str(tiny_model_dir)])
    assert out.exit_code == 1
    message = out.output.strip()
    assert message.count("\n") == 0, message
    assert "columns: headline, body, kind" in message and "--label-field" in message, message
    assert not (here / "params.yaml").exists()
    write_csv(here / "two.csv", ["text", "category", "sentiment"], [("a b", "x", "pos"), ("c d", "y", "neg")])
    with pytest.raises(InitError, match=r"which column of two.csv holds the label \(columns: text, category, "
                                        r"sentiment\); name it with --label-field"):
        init(["two.csv"], teacher=str(tiny_model_dir))
    # Named, it works (and the text is the one string column left).
    res = init(["x.csv"], teacher=str(tiny_model_dir), label_field="kind", text_field="body", transfer=False)
    assert res.label_names == ["x", "y"] and res.text_field == "body"


def test_init_points_qa_and_language_model_data_to_the_docs(here, tiny_model_dir):
    write_jsonl(here / "qa.jsonl", [{"question": "q", "context": "c", "answers": {"text": ["c"], "answer_start": [0]}}])
    with pytest.raises(InitError, match=r"looks like extractive QA"):
        init(["qa.jsonl"], teacher=str(tiny_model_dir))
    (here / "lm.txt").write_text("some text\n")
    with pytest.raises(InitError, match=r"causal_lm\) needs params written by hand"):
        init(["lm.txt"], teacher=str(tiny_model_dir))


def test_init_with_three_files_takes_them_as_they_are_and_ids_only_when_every_file_has_them(here, tiny_model_dir):
    rows = [(f"e{i}", text, label) for i, (_, text, label) in enumerate(topic_rows(60))]
    for name, part in (("train", rows[:40]), ("dev", rows[40:50]), ("test", rows[50:])):
        write_csv(here / f"{name}.csv", ["id", "text", "label"], part)
    res = init(["train.csv", "dev.csv", "test.csv"], teacher=str(tiny_model_dir), transfer=False)
    data = yaml.safe_load((here / "params.yaml").read_text())["data"]
    assert (data["train"], data["dev"], data["test"], data["id_field"]) == ("train.csv", "dev.csv", "test.csv", "id")
    assert yaml.safe_load((here / "params.yaml").read_text())["prepare"]["source"] is None
    assert res.split is None and data["transfer"] is None
    # A test file without the id column: ids become text hashes.
    write_csv(here / "test.csv", ["text", "label"], [r[1:] for r in rows[50:]])
    init(["train.csv", "dev.csv", "test.csv"], teacher=str(tiny_model_dir), transfer=False, force=True)
    assert yaml.safe_load((here / "params.yaml").read_text())["data"]["id_field"] is None


def test_init_with_two_files_splits_dev_off_train_and_keeps_the_test_file(here, tiny_model_dir):
    rows = topic_rows(60)
    write_csv(here / "train.csv", ["text", "label"], [(t, lab) for _, t, lab in rows[:50]])
    write_csv(here / "test.csv", ["text", "label"], [(t, lab) for _, t, lab in rows[50:]])
    res = init(["train.csv", "test.csv"], teacher=str(tiny_model_dir), transfer=False)
    params = yaml.safe_load((here / "params.yaml").read_text())
    assert (res.train, res.dev, res.test) == ("data/train.csv", "data/dev.csv", "test.csv")
    assert params["prepare"]["source"] == "train.csv" and params["prepare"]["fractions"] == {"train": 0.9, "dev": 0.1}
    assert sum(res.split.values()) == 50 and set(res.split) == {"train", "dev"}
    paths = prepare(load_config(here / "params.yaml"))  # kd prepare writes the two splits, then checks all three
    assert sorted(paths) == ["dev", "train"]
    assert json.loads((here / "data" / "check.json").read_text())["files"]["data.test"]["examples"] == 10


def test_init_names_a_dev_label_the_training_file_lacks(here, tiny_model_dir):
    rows = topic_rows(30)
    write_csv(here / "train.csv", ["text", "label"], [(t, lab) for _, t, lab in rows[:20]])
    write_csv(here / "test.csv", ["text", "label"], [(t, "politics" if i == 3 else lab)
                                                for i, (_, t, lab) in enumerate(rows[20:])])
    with pytest.raises(InitError, match=r"test.csv has labels \['politics'\] that the training file train.csv does "
                                        r"not have"):
        init(["train.csv", "test.csv"], teacher=str(tiny_model_dir))


@pytest.mark.parametrize("shape", ["multi_label", "regression", "token_classification", "class_ids", "pairs"])
def test_init_tells_the_task_kind_from_the_label_shape(here, tiny_model_dir, shape):
    if shape == "multi_label":
        rows = [{"text": f"text number {i}", "labels": ["a", "b"][: 1 + i % 2] + (["c"] if i % 3 == 0 else [])}
                for i in range(30)]
    elif shape == "regression":
        rows = [{"sentence": f"text number {i}", "score": i / 7} for i in range(30)]
    elif shape == "token_classification":
        rows = [{"tokens": ["word", f"w{i}"], "tags": ["O", "B-X" if i % 2 else "O"]} for i in range(30)]
    elif shape == "class_ids":
        rows = [{"text": f"text number {i}", "label": i % 3} for i in range(30)]
    else:
        rows = [{"premise": f"text number {i}", "hypothesis": f"other {i}", "label": ["yes", "no"][i % 2]}
                for i in range(30)]
    files = [write_jsonl(here / f"{s}.jsonl", rows[k::3]) for k, s in enumerate(("train", "dev", "test"))]
    res = init([str(f) for f in files], teacher=str(tiny_model_dir))
    cfg = load_config(here / "params.yaml")
    expected = {"multi_label": ("multi_label", ["a", "b", "c"], 3), "regression": ("regression", None, None),
                "token_classification": ("token_classification", ["B-X", "O"], 2),
                "class_ids": ("sequence_classification", None, 3),
                "pairs": ("sequence_classification", ["no", "yes"], 2)}[shape]
    assert (res.task, res.label_names, res.num_labels) == expected
    assert cfg.data.task == expected[0]
    if shape == "regression":
        assert cfg.distill.kd.loss == "mse"
    if shape == "pairs":
        assert cfg.data.text_pair_field == "hypothesis"
    # A transfer set only where the kind takes one (single texts of sequence_classification).
    assert (cfg.prepare.transfer_source is not None) == (shape == "class_ids")
    check_data(cfg, transfer=False)  # the files read as the stages read them (no transfer set before prepare)


def test_init_proposes_the_users_unlabelled_file_as_transfer_source(here, tiny_model_dir):
    write_topics(here / "topics.csv", topic_rows(60))
    write_csv(here / "more.csv", ["body"], [("one more unlabelled sentence about a market today. Short.",),
                                       ("another unlabelled sentence about the team and its coach.",)])
    res = init(["topics.csv"], teacher=str(tiny_model_dir), unlabelled="more.csv")
    assert (res.transfer_source, res.transfer_examples) == ("more.csv", 2)
    write_csv(here / "other.csv", ["sentence"], [("a text in another column than the labelled one",)])
    with pytest.raises(InitError, match=r"--unlabelled other.csv has no column 'body'"):
        init(["topics.csv"], teacher=str(tiny_model_dir), unlabelled="other.csv", force=True)


# ---------------------------------------------------------------------------------------------------------------
# String labels named from the training split, in every stage


def _string_label_files(root: Path, dev_labels: list[str] | None = None) -> dict:
    # File order sports, world, business: the names must come out sorted, not in order of appearance.
    train = [("goal by the team", "sports"), ("border talks", "world"), ("bank profit", "business"),
             ("league match", "sports"), ("summit treaty", "world"), ("market shares", "business")]
    dev = [(f"dev text {i}", lab) for i, lab in enumerate(dev_labels or ["world", "sports"])]
    return {"train": str(write_csv(root / "train.csv", ["text", "label"], train)),
            "dev": str(write_csv(root / "dev.csv", ["text", "label"], dev)),
            "test": str(write_csv(root / "test.csv", ["text", "label"], dev)), "id_field": None, "transfer": None}


def test_string_labels_without_label_names_are_the_sorted_labels_of_train(tmp_path):
    cfg = config_from_dict({"data": _string_label_files(tmp_path, ["world", "sports"])})
    assert cfg.data.label_names is None
    resolved = resolve_labels(cfg)
    assert resolved.data.label_names == ["business", "sports", "world"]
    assert resolved.data.num_labels == 3
    found = check_data(cfg)
    assert found["label_names"] == ["business", "sports", "world"] and found["label_names_from"] == "data.train"
    # Given names win, and a num_labels that disagrees with the training labels is refused.
    given = config_from_dict({"data": {**_string_label_files(tmp_path), "label_names": ["x", "y"]}})
    assert with_label_names(given.data).label_names == ["x", "y"]
    wrong = config_from_dict({"data": {**_string_label_files(tmp_path), "num_labels": 2}})
    with pytest.raises(DataError, match=r"has 3 labels \['business', 'sports', 'world'\] but data.num_labels is 2"):
        resolve_labels(wrong)


def test_every_stage_command_names_string_labels_from_train(tmp_path, monkeypatch, tiny_teacher_dir):
    monkeypatch.chdir(tmp_path)
    data = _string_label_files(tmp_path)
    params = {"data": data, "train_teacher": {"model": str(tiny_teacher_dir), "epochs": 1, "max_length": 16,
                                              "batch_size": 4, "output": "models/teacher"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = CliRunner().invoke(cli, ["train-teacher"])
    assert out.exit_code == 0, out.output
    config = json.loads((tmp_path / "models" / "teacher" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == ["business", "sports", "world"]


def test_a_dev_label_that_train_lacks_is_one_line_naming_it(tmp_path):
    cfg = config_from_dict({"data": _string_label_files(tmp_path, ["world", "politics", "arts", "world"])})
    with pytest.raises(DataError) as err:
        check_data(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.dev (") and 'has labels ["arts", "politics"] that data.train' in message, message


# ---------------------------------------------------------------------------------------------------------------
# The up-front data check; no transfer set the params do not name


def test_a_bad_test_file_stops_the_run_before_any_training(tmp_path, monkeypatch, tiny_teacher_dir):
    monkeypatch.chdir(tmp_path)
    rows = [(f"e{i}", t, lab) for i, (_, t, lab) in enumerate(topic_rows(30))]
    write_csv(tmp_path / "train.csv", ["id", "text", "label"], rows[:20])
    write_csv(tmp_path / "dev.csv", ["id", "text", "label"], rows[20:25])
    write_csv(tmp_path / "test.csv", ["text", "label"], [r[1:] for r in rows[25:]])  # no id column
    params = {"data": {"train": "train.csv", "dev": "dev.csv", "test": "test.csv", "id_field": "id"},
              "prepare": {"source": None, "out_dir": "prepared"},
              "train_teacher": {"model": str(tiny_teacher_dir), "epochs": 1, "max_length": 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["prepare"], ["train-teacher"], ["precompute"], ["distill"]):
        out = CliRunner().invoke(cli, command)
        assert out.exit_code == 1, (command, out.output)
        assert "column 'id' (id_field) not found in test.csv" in out.output, (command, out.output)
    assert not (tmp_path / "models").exists() and not (tmp_path / "caches").exists()


def test_the_stage_functions_check_the_data_and_name_labels_as_the_commands_do(tmp_path, tiny_teacher_dir):
    """The Python API is the same code: a stage function called directly checks every data file first."""
    from stages.distill import distill
    from stages.precompute import precompute
    from stages.train_teacher import train_teacher

    rows = [(f"e{i}", t, lab) for i, (_, t, lab) in enumerate(topic_rows(30))]
    for name, part in (("train", rows[:20]), ("dev", rows[20:25])):
        write_csv(tmp_path / f"{name}.csv", ["id", "text", "label"], part)
    write_csv(tmp_path / "test.csv", ["text", "label"], [r[1:] for r in rows[25:]])  # no id column
    data = {f: str(tmp_path / f"{f}.csv") for f in ("train", "dev", "test")}
    cfg = config_from_dict({"data": {**data, "id_field": "id"},
                            "train_teacher": {"model": str(tiny_teacher_dir), "output": str(tmp_path / "t")},
                            "precompute": {"teachers": [str(tiny_teacher_dir)], "cache_root": str(tmp_path / "c")},
                            "distill": {"output": str(tmp_path / "s")}})
    for stage in (train_teacher, precompute, distill):
        with pytest.raises(DataError, match="column 'id' \\(id_field\\) not found in .*test.csv"):
            stage(cfg)
    assert not any((tmp_path / d).exists() for d in ("t", "c", "s"))
    assert checked(cfg.model_copy(update={"data": cfg.data.model_copy(update={"test": None})})).data.label_names \
        == sorted({r[2] for r in rows[:20]})


def test_prepare_adds_no_transfer_set_the_params_do_not_name(tmp_path):
    source = write_topics(tmp_path / "topics.csv", topic_rows(60))
    data = {"train": str(tmp_path / "out/train.csv"), "dev": str(tmp_path / "out/dev.csv"),
            "test": str(tmp_path / "out/test.csv"), "text_field": "body", "label_field": "topic", "id_field": None,
            "label_names": ["business", "sports", "world"], "num_labels": 3}
    cfg = config_from_dict({"data": data, "prepare": {"source": str(source), "out_dir": str(tmp_path / "out")}})
    assert cfg.prepare.transfer_source is None
    paths = prepare(cfg)
    assert set(paths) == {"train", "dev", "test"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["check.json", "dev.csv", "split.json",
                                                                    "test.csv", "train.csv"]
    # Named, it is built: here the bundled general-text sentences, none of them a labelled text.
    cfg = config_from_dict({"data": {**data, "transfer": str(tmp_path / "out/transfer.csv")},
                            "prepare": {"source": str(source), "out_dir": str(tmp_path / "out"),
                                        "transfer_source": "bundled:ptb_sentences", "transfer_examples": 25}})
    paths = prepare(cfg)
    with open(paths["transfer"], newline="") as f:
        transfer = list(csv.DictReader(f))
    assert len(transfer) == 25 and list(transfer[0]) == ["id", "body"]
    found = json.loads((tmp_path / "out" / "check.json").read_text())
    assert found["files"]["data.transfer"]["examples"] == 25


def test_prepare_without_a_source_checks_the_files_and_keeps_them_out_of_its_folder(tmp_path):
    rows = [(t, lab) for _, t, lab in topic_rows(30)]
    for name, part in (("train", rows[:20]), ("dev", rows[20:25]), ("test", rows[25:])):
        write_csv(tmp_path / f"{name}.csv", ["text", "label"], part)
    data = {"train": str(tmp_path / "train.csv"), "dev": str(tmp_path / "dev.csv"),
            "test": str(tmp_path / "test.csv"), "id_field": None}
    cfg = config_from_dict({"data": data, "prepare": {"source": None, "out_dir": str(tmp_path / "prepared")}})
    assert prepare(cfg) == {}
    found = json.loads((tmp_path / "prepared" / "check.json").read_text())
    assert found["label_names"] == ["business", "sports", "world"]
    inside = config_from_dict({"data": data, "prepare": {"source": None, "out_dir": str(tmp_path)}})
    with pytest.raises(DataError, match=r"data.train .* lies in prepare.out_dir"):
        prepare(inside)


def test_prepare_settings_that_would_do_nothing_are_refused():
    with pytest.raises(Exception, match=r"prepare.fractions: only applies when prepare.source names something"):
        config_from_dict({"prepare": {"source": None, "fractions": {"train": 0.5, "test": 0.5}}})
    with pytest.raises(Exception, match=r"prepare.transfer_source: 'bundled:wiki' is not a bundled transfer source"):
        config_from_dict({"prepare": {"transfer_source": "bundled:wiki"}})


def test_the_shipped_params_say_what_prepare_does_with_the_transfer_source():
    text = (ROOT / "params.yaml").read_text()
    assert "another source gets none" not in text
    assert "whenever this is set" in text and "whatever" in text
