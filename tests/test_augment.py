"""`kd augment`: each operation's views, their ids, the written file, and the views as a transfer set."""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cache_format as cf
from cache_format import KDError
from pipeline.cli import cli
from stages.augment import augment
from stages.distill import distill
from stages.precompute import precompute
from stages.augment import TagVocabulary, augment_examples
from stages.config import ConfigError, config_from_dict
from stages.data import IGNORE_LABEL, Examples, content_ids, load_examples
from stages.tasks import get_task
from tests.helpers import stage_params

augment_module = importlib.import_module("stages.augment")  # `stages.augment` is the stage function

SENTENCES = ["the movie was really quite good fun", "a dull and boring plot with weak acting",
             "the cast is charming and the music is superb", "overall the story was tedious",
             "a brilliant film with a moving ending and a funny script"]
DEFAULTS = {"mask": {"p": 0.15, "token": "[MASK]"}, "delete": {"p": 0.1}, "ngram": {"min_n": 3, "max_n": 8},
            "shuffle": {"window": 3}}


def _examples(texts=SENTENCES, pairs=None) -> Examples:
    return Examples(ids=[f"s{i}" for i in range(len(texts))], texts=list(texts), text_pairs=pairs, labels=None)


def _views(op: str, seed: int = 13, views: int = 1, examples: Examples | None = None, **settings):
    return augment_examples(examples or _examples(), {op: {**DEFAULTS.get(op, {}), **settings}}, views=views,
                            seed=seed)[0]


def _by_parent(views) -> dict[str, list[str]]:
    return {v.parent: v.words for v in views}


# --------------------------------------------------------------------------- each operation


def test_the_views_of_a_seed_are_pinned():
    # Ids and texts are cache keys and data: a change to how views are drawn must be deliberate.
    views, dropped = augment_examples(_examples(SENTENCES[4:]), DEFAULTS, views=1, seed=13)
    assert [(v.id, " ".join(v.words)) for v in views] == [
        ("s0~mask-a444386c", "a brilliant film with a moving ending [MASK] a funny script"),
        ("s0~delete-92e0b48d", "a brilliant with a moving ending and a funny script"),
        ("s0~ngram-036dc34c", "film with a moving ending and a funny"),
        ("s0~shuffle-9f9fc730", "a brilliant film a moving with and ending a funny script"),
    ]
    assert dropped == 0


@pytest.mark.parametrize("op", ["mask", "delete", "ngram", "shuffle"])
def test_each_operation_is_deterministic_and_the_seed_changes_it(op):
    first, again, other = _views(op, seed=1), _views(op, seed=1), _views(op, seed=2)
    assert [(v.id, v.words) for v in first] == [(v.id, v.words) for v in again]
    assert [v.words for v in first] != [v.words for v in other]
    assert {v.id.rsplit("-", 1)[1] for v in first}.isdisjoint({v.id.rsplit("-", 1)[1] for v in other})


def test_mask_replaces_words_in_place_and_at_least_one():
    for v in _views("mask", p=0.01, views=3):
        words = SENTENCES[int(v.parent[1:])].split()
        assert len(v.words) == len(words)
        changed = [i for i, (a, b) in enumerate(zip(v.words, words)) if a != b]
        assert len(changed) >= 1 and all(v.words[i] == "[MASK]" for i in changed)
    assert all(set(v.words) == {"<mask>"} for v in _views("mask", p=1.0, token="<mask>"))


def test_delete_keeps_an_ordered_subsequence_never_empty():
    for v in _views("delete", p=0.3, views=3):
        words = SENTENCES[int(v.parent[1:])].split()
        assert 1 <= len(v.words) < len(words)
        it = iter(words)
        assert all(w in it for w in v.words)  # a subsequence, in order
    assert all(len(v.words) == 1 for v in _views("delete", p=1.0))
    # A one-word sentence has nothing to delete: its view would repeat it, so none is written.
    assert _views("delete", examples=_examples(["alone"])) == []


def test_ngram_keeps_a_run_of_consecutive_words_of_the_asked_length():
    for v in _views("ngram", min_n=2, max_n=4, views=4):
        text = " " + SENTENCES[int(v.parent[1:])] + " "
        assert 2 <= len(v.words) <= 4 and f" {' '.join(v.words)} " in text


def test_shuffle_moves_each_word_fewer_than_window_places():
    examples = _examples([" ".join(f"w{i}" for i in range(30))])
    for window in (2, 4):
        [v] = _views("shuffle", window=window, examples=examples)
        positions = [int(w[1:]) for w in v.words]
        assert sorted(positions) == list(range(30)) and positions != list(range(30))
        assert max(abs(new - old) for new, old in enumerate(positions)) < window


def test_text_pairs_are_changed_with_the_same_operation():
    pairs = ["it was good", "it was bad", "fine", "not for me", "a must see film"]
    views, _ = augment_examples(_examples(pairs=pairs), {"mask": {"p": 1.0, "token": "[MASK]"}}, views=1, seed=3)
    assert all(v.pair_words and set(v.pair_words) == {"[MASK]"} for v in views)


# --------------------------------------------------------------------------- ids


def test_ids_derive_from_parent_operation_settings_and_seed_and_are_unique():
    views, _ = augment_examples(_examples(), DEFAULTS, views=3, seed=13)
    ids = [v.id for v in views]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(rf"{v.parent}~{v.op}-[0-9a-f]{{8}}", v.id) for v in views)
    # The recipe (op, settings, seed, view number) names the view; the parent only prefixes it.
    recipes = {(v.op, v.id.rsplit("-", 1)[1]) for v in views}
    assert len(recipes) == 4 * 3
    changed, _ = augment_examples(_examples(), {**DEFAULTS, "mask": {"p": 0.5, "token": "[MASK]"}}, views=3,
                                  seed=13)
    same = {v.id: v.words for v in views if v.op != "mask"}
    assert {v.id: v.words for v in changed if v.op != "mask"} == same  # other operations' views are untouched
    assert {v.id for v in changed if v.op == "mask"}.isdisjoint(v.id for v in views)


def test_a_view_does_not_depend_on_the_order_or_the_other_examples():
    views, _ = augment_examples(_examples(), DEFAULTS, views=2, seed=5)
    backwards = Examples(ids=[f"s{i}" for i in range(5)][::-1], texts=SENTENCES[::-1], text_pairs=None, labels=None)
    reversed_views, _ = augment_examples(backwards, DEFAULTS, views=2, seed=5)
    assert {v.id: v.words for v in views} == {v.id: v.words for v in reversed_views}
    alone, _ = augment_examples(_examples(SENTENCES[:1]), DEFAULTS, views=2, seed=5)
    assert {v.id: v.words for v in alone}.items() <= {v.id: v.words for v in views}.items()


def test_views_repeating_an_example_or_an_earlier_view_are_dropped():
    texts = ["a b", "b a"]
    views, dropped = augment_examples(_examples(texts), {"shuffle": {"window": 2}, "ngram": {"min_n": 2, "max_n": 2}},
                                      views=4, seed=0)
    keys = [tuple(v.words) for v in views]
    assert len(keys) == len(set(keys)) and not set(keys) & {("a", "b"), ("b", "a")}
    assert dropped == 2 * 2 * 4  # every shuffle gives "a b" or "b a", every 2-gram the sentence itself


# --------------------------------------------------------------------------- part-of-speech replacement


TAGGED = [(["the", "cat", "sat", "on", "a", "mat"], ["DT", "NN", "VBD", "IN", "DT", "NN"]),
          (["a", "dog", "ran", "to", "the", "park"], ["DT", "NN", "VBD", "TO", "DT", "NN"]),
          (["the", "bird", "sang", "in", "the", "tree"], ["DT", "NN", "VBD", "IN", "DT", "NN"]),
          (["run", "fast"], ["VB", "RB"])]


def _tagged(rows=TAGGED) -> tuple[Examples, list[list[str]]]:
    words = [w for w, _ in rows]
    ex = Examples(ids=[f"t{i}" for i in range(len(rows))], texts=[" ".join(w) for w in words], text_pairs=None,
                  labels=None, words=words)
    return ex, [t for _, t in rows]


def test_pos_replaces_words_only_by_words_seen_with_the_same_tag():
    ex, tags = _tagged()
    vocab = TagVocabulary(ex.words, tags)
    seen = {(w, t) for ws, ts in zip(ex.words, tags) for w, t in zip(ws, ts)}
    views, _ = augment_examples(ex, {"pos": {"p": 0.5}}, views=20, seed=1, tags=tags)
    replaced = 0
    for v in views:
        row = int(v.parent[1:])
        assert v.tags == tags[row]  # a replaced word keeps its tag
        for new, old, tag in zip(v.words, ex.words[row], v.tags):
            assert (new, tag) in seen
            replaced += new != old
    assert replaced > 20
    # "run" is the only VB and "fast" the only RB: nothing else carries their tags, so that sentence has no view.
    assert not [v for v in views if v.parent == "t3"]
    assert vocab.words("VB") == ["run"]


def test_pos_draws_by_how_often_a_word_was_seen_and_never_the_word_itself():
    vocab = TagVocabulary([["a"] * 30 + ["b"] * 10 + ["c"]], [["X"] * 41])
    rng = np.random.default_rng(0)
    draws = [vocab.draw("X", "c", rng) for _ in range(4000)]
    assert set(draws) == {"a", "b"} and 0.7 < draws.count("a") / len(draws) < 0.8
    assert "a" not in {vocab.draw("X", "a", rng) for _ in range(200)}


def test_pos_without_tags_is_refused():
    with pytest.raises(ConfigError, match="no tags"):
        augment_examples(_examples(), {"pos": {"p": 0.2}}, views=1, seed=0)
    with pytest.raises(ConfigError, match=r"augment\.ops\.pos: .*plain text without tags"):
        config_from_dict({"augment": {"ops": {"pos": {}}}})


def test_token_classification_views_keep_their_tags_and_load_as_data(tmp_path):
    src = tmp_path / "pos.jsonl"
    src.write_text("".join(json.dumps({"id": f"t{i}", "tokens": w, "tags": t}) + "\n" for i, (w, t) in
                           enumerate(TAGGED)))
    names = ["DT", "NN", "VBD", "IN", "TO", "VB", "RB"]
    data = {"task": "token_classification", "train": str(src), "tokens_field": "tokens", "tags_field": "tags",
            "id_field": "id", "label_field": None, "num_labels": len(names), "label_names": names, "dev": None,
            "test": None}
    out = tmp_path / "views.jsonl"
    cfg = config_from_dict({"data": data, "augment": {
        "input": str(src), "output": str(out), "include_input": True, "views": 2,
        "ops": {"pos": {"p": 0.3}, "delete": {"p": 0.3}, "shuffle": {"window": 3}, "ngram": {"min_n": 2}}}})
    res = augment(cfg)
    loaded = get_task(cfg.data).load(out)  # the task's own reader takes the file as it takes the input
    assert len(loaded) == 4 + sum(res.views.values()) and loaded.ids[:4] == ["t0", "t1", "t2", "t3"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    source = {f"t{i}": dict(zip(w, t)) for i, (w, t) in enumerate(TAGGED)}
    for r in rows[4:]:
        if r["op"] in ("delete", "shuffle", "ngram"):  # words move or go with their own tags
            assert all(source[r["parent"]][w] == t for w, t in zip(r["tokens"], r["tags"]))
    with pytest.raises(ConfigError, match=r"augment\.output: .*write a \.jsonl file"):
        config_from_dict({"data": data, "augment": {"ops": {"pos": {}}}})


# --------------------------------------------------------------------------- the stage and the CLI


def _params_file(tmp: Path, data_dir: Path, **augment_settings) -> Path:
    params = {"data": {"train": str(data_dir / "train.csv"), "dev": str(data_dir / "dev.csv"),
                       "test": str(data_dir / "test.csv")},
              "augment": {"input": str(data_dir / "train.csv"), "output": str(tmp / "aug" / "views.csv"),
                          "ops": {"mask": {}, "delete": {}, "ngram": {}, "shuffle": {}}, **augment_settings}}
    path = tmp / "params.yaml"
    path.write_text(json.dumps(params))
    return path


def test_cli_writes_the_views_atomically_and_a_rerun_is_identical(tmp_path, tiny_data_dir, monkeypatch):
    params = _params_file(tmp_path, tiny_data_dir)
    out = tmp_path / "aug" / "views.csv"
    result = CliRunner().invoke(cli, ["augment", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert re.search(r"\d+ views of 200 examples \(mask \d+, delete \d+, ngram \d+, shuffle \d+; \d+ dropped",
                     result.output)
    first = out.read_bytes()
    views = load_examples(out, text_field="text", id_field="id")
    assert len(views) > 600 and all("~" in i for i in views.ids)
    assert CliRunner().invoke(cli, ["augment", "--params", str(params)]).exit_code == 0
    assert out.read_bytes() == first

    # A run that dies while writing leaves the finished file as it was, and no partial file.
    def broken(table, f):
        f.write(b"id,parent")
        raise OSError("disk full")

    monkeypatch.setattr(augment_module.pa_csv, "write_csv", broken)
    result = CliRunner().invoke(cli, ["augment", "--params", str(params), "--set", "augment.seed=2"])
    assert result.exit_code != 0
    assert out.read_bytes() == first and sorted(p.name for p in out.parent.iterdir()) == ["views.csv"]


def test_off_by_default_and_include_input_writes_the_input_first(tmp_path, tiny_data_dir):
    params = _params_file(tmp_path, tiny_data_dir, ops={})
    result = CliRunner().invoke(cli, ["augment", "--params", str(params)])
    assert result.exit_code == 0 and "augmentation is off" in result.output, result.output
    assert (tmp_path / "aug" / "views.csv").read_text().strip() == '"id","parent","op","text"'
    params = _params_file(tmp_path, tiny_data_dir, ops={"mask": {"p": 0.5}}, include_input=True)
    assert CliRunner().invoke(cli, ["augment", "--params", str(params)]).exit_code == 0
    written = load_examples(tmp_path / "aug" / "views.csv", text_field="text", id_field="id")
    train = load_examples(tiny_data_dir / "train.csv", text_field="text", id_field="id")
    assert written.ids[:200] == train.ids and written.texts[:200] == train.texts
    # One masked view per sentence, less the few that repeat an earlier view.
    assert 190 <= len(written) - 200 <= 200 and all("~mask-" in i for i in written.ids[200:])


def test_mask_token_from_a_tokenizer_folder_is_the_token_the_tokenizer_reads(tmp_path, tiny_data_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    cfg = config_from_dict(json.loads(_params_file(tmp_path, tiny_data_dir, ops={"mask": {
        "p": 0.3, "token": f"tokenizer:{tiny_model_dir}"}}).read_text()))
    augment(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    views = load_examples(cfg.augment.output, text_field="text")
    assert all("[MASK]" in t for t in views.texts)
    assert tok.mask_token_id in tok(views.texts[0])["input_ids"]  # one token, not "[", "mask", "]"
    with pytest.raises(KDError, match=r"augment\.ops\.mask\.token: .* is not a folder"):
        augment(cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"ops": cfg.augment.ops.model_copy(
            update={"mask": cfg.augment.ops.mask.model_copy(update={"token": "tokenizer:no/such/folder"})})})}))


@pytest.mark.parametrize("settings, message", [
    ({"ops": {"mask": {"p": 0}}}, "augment.ops.mask.p: must be in (0, 1] (got 0.0)"),
    ({"ops": {"delete": {"p": 1.5}}}, "augment.ops.delete.p: must be in (0, 1] (got 1.5)"),
    ({"ops": {"ngram": {"min_n": 5, "max_n": 2}}}, "augment.ops.ngram: needs 1 <= min_n <= max_n"),
    ({"ops": {"shuffle": {"window": 1}}}, "augment.ops.shuffle.window: must be >= 2"),
    ({"ops": {"mask": {"token": "two words"}}}, "augment.ops.mask.token: 'two words' must be one word"),
    ({"ops": {"swap": {}}}, "augment.ops.swap: unknown key; valid keys here: mask, delete, ngram, shuffle, pos"),
    ({"views": 0}, "augment.views: must be >= 1"),
    ({"output": "views.parquet"}, "augment.output: 'views.parquet': write a .csv or .jsonl file"),
    ({"input": "data/train.csv", "output": "data/train.csv"}, "augment.output: is the input file"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(settings, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"augment": settings})
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(message), lines


def test_other_task_kinds_are_refused_only_when_augmentation_is_on():
    params = {"data": {"task": "regression", "num_labels": 1, "text_pair_field": "text_pair"},
              "distill": {"kd": {"loss": "mse"}}}
    config_from_dict(params)  # off (the default): nothing to refuse
    with pytest.raises(ConfigError, match=r"augment\.ops: views are made for data\.task sequence_classification"):
        config_from_dict({**params, "augment": {"ops": {"mask": {}}}})


# --------------------------------------------------------------------------- end to end


def test_views_as_the_transfer_set_are_labelled_once_and_distilled(tmp_path, tiny_data_dir, tiny_teacher_dir):
    files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
    views_file = tmp_path / "aug" / "views.csv"
    params = stage_params(tmp_path, tiny_teacher_dir, {**files, "transfer": str(views_file)}, augment={
        "input": files["train"], "output": str(views_file), "ops": {"mask": {}, "delete": {}}})
    cfg = config_from_dict(params)
    res = augment(cfg)
    n = sum(res.views.values())
    assert n > 300

    [first] = precompute(cfg)
    assert first.status == "written" and first.examples == 200 + n
    reader = cf.CacheReader(first.path)
    views = load_examples(views_file, text_field="text")
    # A transfer set is keyed by the content of its text, as for any data.transfer file.
    transfer_ids = sorted(i for i in reader.ids if i.startswith("transfer-"))
    assert transfer_ids == sorted("transfer-" + i for i in content_ids(views.texts))
    assert set(reader.gather(transfer_ids[:8], fields=["label"])["label"].tolist()) == {IGNORE_LABEL}

    # A rerun of augment writes the same views, so the teacher's labels are reused, not recomputed.
    augment(cfg)
    [again] = precompute(cfg)
    assert again.status == "up to date" and again.written == 0 and again.path == first.path
    # Two students read the one cache of the views.
    steps = math.ceil((200 + n) / 16)
    assert distill(cfg).fit.steps == steps
    other = config_from_dict({**params, "distill": {**params["distill"], "seed": 7,
                                                    "output": str(tmp_path / "student2")}})
    assert distill(other).fit.steps == steps


@pytest.mark.slow
def test_bundled_model_and_data_views_through_precompute_and_distill(tmp_path):
    """The real Rotten Tomatoes split and the bundled MiniLM: the views with the tokenizer's own mask token."""
    import yaml

    from stages.prepare import prepare
    from stages.train_teacher import train_teacher
    from stages.models import resolve_model

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    data, models = tmp_path / "data", tmp_path / "models"
    params["data"].update({s: str(data / f"{s}.csv") for s in ("train", "dev", "test")},
                          transfer=str(tmp_path / "views.csv"))
    params["prepare"].update(max_examples=400, transfer_source=None, out_dir=str(data))
    params["augment"].update(input=str(data / "train.csv"), output=str(tmp_path / "views.csv"), ops={
        "mask": {"token": f"tokenizer:{resolve_model(params['train_teacher']['model'])}"}, "delete": {},
        "ngram": {}, "shuffle": {}})
    params["train_teacher"].update(output=str(models / "teacher"), epochs=1, metrics=str(tmp_path / "t.json"))
    params["precompute"].update(teachers=[str(models / "teacher")], cache_root=str(tmp_path / "caches"))
    params["distill"].update(student={"config": str(models / "teacher"), "num_layers": 2, "hidden_size": 192,
                                      "intermediate_size": 768, "num_heads": 3}, epochs=1,
                             output=str(models / "student"), log_dir=str(tmp_path / "live"),
                             metrics=str(tmp_path / "d.json"))
    cfg = config_from_dict(params)
    prepare(cfg)
    res = augment(cfg)
    first = Path(cfg.augment.output).read_bytes()
    assert res.examples == 320 and 4 * 320 * 0.9 < sum(res.views.values()) <= 4 * 320
    assert augment(cfg) == res and Path(cfg.augment.output).read_bytes() == first
    train_teacher(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models / "teacher")
    views = load_examples(cfg.augment.output, text_field="text")
    masked = [t for t in views.texts if tok.mask_token in t]
    assert tok.mask_token == "[MASK]" and len(masked) == res.views["mask"]
    assert tok.mask_token_id in tok(masked[0])["input_ids"]
    [cache] = precompute(cfg)
    assert cache.examples == 320 + len(views)
    assert distill(cfg).fit.steps == math.ceil(cache.examples / cfg.distill.batch_size)
