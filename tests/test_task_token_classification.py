"""data.task: token_classification (NER, POS): loading, word alignment, per-word teacher cache, losses, metrics,
and every stage end to end on tiny models (the real bundled MiniLM on WNUT and WSJ POS with -m slow)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification

import cache_format as cf
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.config import config_from_dict
from stages.data import DataError, collate
from stages.losses import hard_ce_loss
from stages.models import load_tokenizer
from tests.tiny_models import make_tiny_classifier
from stages.tasks import get_task
from stages.tasks import TokenClassification
from tests.helpers import stage_params

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
_FIRST = ["alice", "bob", "carol", "dave"]
_LAST = ["smith", "jones"]
_PLACES = ["paris", "london", "berlin"]
_FILLER = ["met", "in", "the", "city", "of", "yesterday", "and", "went", "to", "with", "friends", "a", "visit"]


def _sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        words, tags = [], []
        for _ in range(rng.randint(2, 5)):
            r = rng.random()
            if r < 0.25:
                name = [rng.choice(_FIRST)] + ([rng.choice(_LAST)] if rng.random() < 0.5 else [])
                words += name
                tags += ["B-PER"] + ["I-PER"] * (len(name) - 1)
            elif r < 0.4:
                words.append(rng.choice(_PLACES))
                tags.append("B-LOC")
            else:
                k = rng.randint(1, 3)
                words += rng.sample(_FILLER, k)
                tags += ["O"] * k
        if tuple(words) not in seen:
            seen.add(tuple(words))
            out.append((words, tags))
    return out


def _write_jsonl(path: Path, rows, start: int = 0, ints: bool = False) -> Path:
    with open(path, "w") as f:
        for i, (words, tags) in enumerate(rows):
            t = [TAGS.index(x) for x in tags] if ints else tags
            f.write(json.dumps({"id": f"s{start + i:04d}", "tokens": words, "tags": t}) + "\n")
    return path


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ner")
    rows = _sentences(240)
    _write_jsonl(root / "train.jsonl", rows[:160])
    _write_jsonl(root / "dev.jsonl", rows[160:200], 160)
    _write_jsonl(root / "test.jsonl", rows[200:], 200)
    return root


def _vocab(words_only: list[str]) -> list[str]:
    return [" ".join(words_only)]


@pytest.fixture(scope="module")
def ner_teacher(tmp_path_factory) -> Path:
    """Tiny random BERT token classifier whose vocabulary holds every word of the data."""
    return make_tiny_classifier(tmp_path_factory.mktemp("tok_teacher"), num_labels=len(TAGS), layers=3, hidden=32,
                                heads=2, intermediate=64, vocab_texts=_vocab(_FIRST + _LAST + _PLACES + _FILLER),
                                seed=1, auto_model=AutoModelForTokenClassification)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    """A student with ANOTHER tokenizer: names and places are not in its vocabulary (split into letters)."""
    return make_tiny_classifier(tmp_path_factory.mktemp("tok_student"), num_labels=len(TAGS), layers=1, hidden=32,
                                heads=2, intermediate=64, vocab_texts=_vocab(_FILLER), seed=2,
                                auto_model=AutoModelForTokenClassification)


def _params(tmp: Path, data: Path, teacher: Path, **sections) -> dict:
    files = {split: str(data / f"{split}.jsonl") for split in ("train", "dev", "test")}
    return stage_params(tmp, teacher, {"task": "token_classification", **files, "num_labels": len(TAGS),
                                       "label_names": TAGS},
                        keep_layers=(0, 2), kd={"hard_weight": 0.5, "temperature": 2.0}, **sections)


def _task(**data) -> TokenClassification:
    cfg = config_from_dict({"data": {"task": "token_classification", "num_labels": len(TAGS), "label_names": TAGS,
                                     **data}})
    task = get_task(cfg.data)
    assert isinstance(task, TokenClassification)
    return task


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForTokenClassification.from_pretrained(path).state_dict()


# ------------------------------------------------------------------------------------------------- loading


def test_loads_jsonl_with_tag_names_or_ids(tmp_path, ner_dir):
    ex = _task().load(ner_dir / "train.jsonl")
    assert len(ex) == 160 and ex.ids[0] == "s0000" and ex.words is not None
    words, tags = _sentences(240)[0]
    assert ex.words[0] == words and ex.texts[0] == " ".join(words)
    assert ex.labels[0].tolist() == [TAGS.index(t) for t in tags]
    ints = _task().load(_write_jsonl(tmp_path / "ints.jsonl", _sentences(240)[:160], ints=True))
    assert all(np.array_equal(a, b) for a, b in zip(ints.labels, ex.labels))


def test_loads_conll_columns_with_content_ids(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nalice NNP B-NP B-PER\nmet\tVBD\tO\n\n\n"
                    "paris\tB-LOC\n.\tO\n  \nbob B-PER\n")
    ex = _task(id_field=None).load(path)
    assert ex.words == [["alice", "met"], ["paris", "."], ["bob"]]
    assert [x.tolist() for x in ex.labels] == [[1, 0], [3, 0], [1]]
    # Content-hash ids: the same sentence has the same id wherever it sits in the file.
    moved = tmp_path / "moved.txt"
    moved.write_text("bob\tB-PER\n\nalice B-PER\nmet O\n")
    again = _task().load(moved)
    assert again.ids[0] == ex.ids[2] and again.ids[1] == ex.ids[0] and len(set(ex.ids)) == 3


@pytest.mark.parametrize("rows, expected", [
    ([{"id": "a", "tokens": ["alice", "met"], "tags": ["B-PER"]}],
     ["example a (row 1)", "2 words but 1 tags", "one tag per word"]),
    ([{"id": "a", "tokens": ["x"], "tags": ["O"]}, {"id": "b", "tokens": ["rome"], "tags": ["B-CITY"]}],
     ["example b (row 2)", "word 1 has tag 'B-CITY'", "add it to data.label_names"]),
    ([{"id": "a", "tokens": ["x", " "], "tags": ["O", "O"]}], ["example a (row 1)", "word 2 is empty"]),
    ([{"id": "a", "tokens": ["x"], "tags": [7]}], ["example a (row 1)", "tag 7", "[0, 5)"]),
    ([{"id": "a", "tokens": [], "tags": []}], ["example a (row 1)", "has no words"]),
    ([{"id": "a", "tokens": "alice met", "tags": ["O"]}], ["'tokens' (tokens_field)", "one list per row"]),
    ([{"id": "a", "words": ["x"], "tags": ["O"]}], ["column 'tokens' (tokens_field) not found", "words"]),
])
def test_bad_rows_are_one_line_errors_naming_the_file_and_row(tmp_path, rows, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        _task().load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for part in expected:
        assert part in msg, msg


def test_text_tags_without_label_names_list_the_tags_found(tmp_path, ner_dir):
    cfg = config_from_dict({"data": {"task": "token_classification", "num_labels": 5}})
    with pytest.raises(DataError) as err:
        get_task(cfg.data).load(ner_dir / "dev.jsonl")
    msg = str(err.value)
    assert "data.label_names" in msg and "'B-PER'" in msg and "'O'" in msg and "\n" not in msg


def test_bad_conll_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "x.bio"
    path.write_text("alice\tB-PER\nmet\n")
    with pytest.raises(DataError, match=r"x\.bio line 2: expected word<TAB>tag"):
        _task().load(path)


# ------------------------------------------------------------------------------------------------- encoding


def _examples(task, tmp_path, rows):
    return task.load(_write_jsonl(tmp_path / "e.jsonl", rows))


def test_first_subword_alignment_and_all_subwords(tmp_path, ner_teacher, other_student):
    rows = [(["alice", "met", "bob"], ["B-PER", "O", "B-PER"])]
    task = _task()
    ex = _examples(task, tmp_path, rows)
    enc = task.encode(load_tokenizer(str(other_student)), ex, 32)  # alice -> a ##l ##i ##c ##e
    batch, _ = collate(enc, [0])
    assert batch["word_index"][0].tolist() == [-1, 0, -1, -1, -1, -1, 1, 2, -1, -1, -1]
    assert batch["labels"][0].tolist() == [-100, 1, -100, -100, -100, -100, 0, 1, -100, -100, -100]
    all_sub = _task(label_all_subwords=True).encode(load_tokenizer(str(other_student)), ex, 32)
    assert collate(all_sub, [0])[0]["labels"][0].tolist() == [-100, 1, 1, 1, 1, 1, 0, 1, 1, 1, -100]
    # The teacher's tokenizer knows every word: one sub-token each, same word numbers.
    t_batch, _ = collate(task.encode(load_tokenizer(str(ner_teacher)), ex, 32), [0])
    assert t_batch["word_index"][0].tolist() == [-1, 0, 1, 2, -1]


def test_a_word_with_no_subtoken_keeps_later_words_in_place(tmp_path, ner_teacher):
    task = _task()
    ex = _examples(task, tmp_path, [(["alice", "\u200b", "met", "paris"], ["B-PER", "O", "O", "B-LOC"]),
                                    (["bob", "met", "\u200b"], ["B-PER", "O", "O"])])
    tok = load_tokenizer(str(ner_teacher))
    assert tok(["\u200b"], is_split_into_words=True, add_special_tokens=False)["input_ids"] == []
    enc = task.encode(tok, ex, 32)
    batch, _ = collate(enc, [0, 1])
    assert batch["word_index"][0].tolist() == [-1, 0, 1, 2, 3, -1]
    assert batch["labels"][0].tolist() == [-100, 1, 0, 0, 3, -100]
    assert batch["input_ids"][0, 2].item() == tok.unk_token_id
    assert task.lengths(batch).tolist() == [4, 3]


def test_truncated_words_have_no_position_and_count_as_wrong(tmp_path, ner_teacher):
    task = _task()
    ex = _examples(task, tmp_path, [(["alice", "met", "bob", "in", "paris"], ["B-PER", "O", "B-PER", "O", "B-LOC"])])
    enc = task.encode(load_tokenizer(str(ner_teacher)), ex, 4)  # [CLS] alice met [SEP]
    batch, _ = collate(enc, [0])
    assert task.lengths(batch).tolist() == [2]
    perfect_kept = [np.array([1, 0])]
    m = task.score(enc, perfect_kept)
    assert m["accuracy"] == pytest.approx(2 / 5) and m["truncated_words"] == 3.0
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(1 / 3)


def test_max_length_too_small_and_python_tokenizers_are_refused(tmp_path, ner_teacher):
    task = _task()
    ex = _examples(task, tmp_path, [(["alice"], ["B-PER"])])
    with pytest.raises(DataError, match="max_length >= 3"):
        task.encode(load_tokenizer(str(ner_teacher)), ex, 2)
    slow = type("PythonTokenizer", (), {"is_fast": False})()  # word_ids() needs a fast (Rust) tokenizer
    with pytest.raises(DataError, match="fast tokenizer"):
        task.encode(slow, ex, 8)


# ------------------------------------------------------------------------------------------------- signal, losses


def test_word_logits_losses_and_kd_mask():
    task = _task()
    word_index = torch.tensor([[-1, 0, -1, 1, 2, -1], [-1, 0, 1, -1, -1, -1]])
    token = torch.randn(2, 6, 5, requires_grad=True)
    labels = torch.tensor([[-100, 1, -100, 0, 3, -100], [-100, 2, 0, -100, -100, -100]])
    batch = {"word_index": word_index, "labels": labels}
    words = task.logits(type("Out", (), {"logits": token})(), batch)
    assert words.shape == (2, 3, 5) and task.lengths(batch).tolist() == [3, 2]
    assert torch.equal(words[0], token[0, [1, 3, 4]]) and torch.equal(words[1, :2], token[1, [1, 2]])
    assert not words[1, 2].any()
    # Hard loss on word logits == token-level CE on the first sub-tokens.
    assert torch.allclose(task.hard_loss(words, batch), hard_ce_loss(token, labels))
    words.sum().backward()
    assert token.grad[0, 2].abs().sum() == 0 and token.grad[0, 1].abs().sum() > 0

    # KD only over the words both sides kept: the teacher kept 1 word of row 0 (min(3, 1)), 2 of row 1.
    from stages import losses

    teacher = torch.randn(2, 3, 5)
    got = task.kd_loss(words, teacher, batch, temperature=2.0, kind="kl", temperature_squared=True,
                       teacher_lengths=torch.tensor([1, 5]))
    mask = torch.tensor([[True, False, False], [True, True, False]])
    want = losses.kd_loss(words, teacher, 2.0, kind="kl", mask=mask)
    assert torch.allclose(got, want)
    # Changing what lies outside the mask changes nothing.
    teacher2 = teacher.clone()
    teacher2[0, 1:] = 100.0
    assert torch.allclose(task.kd_loss(words, teacher2, batch, temperature=2.0, kind="kl", temperature_squared=True,
                                       teacher_lengths=torch.tensor([1, 5])), got)


def test_label_all_subwords_hard_loss_trains_every_subtoken():
    task = _task(label_all_subwords=True)
    word_index = torch.tensor([[-1, 0, -1, 1, -1]])
    labels = torch.tensor([[-100, 1, 1, 0, -100]])
    token = torch.randn(1, 5, 5)
    batch = {"word_index": word_index, "labels": labels}
    words = task.logits(type("Out", (), {"logits": token})(), batch)
    assert torch.allclose(task.hard_loss(words, batch), hard_ce_loss(token, labels))


def test_scores_entities_with_seqeval_and_pos_with_accuracy(tmp_path, ner_teacher):
    task = _task()
    ex = _examples(task, tmp_path, [(["alice", "smith", "met", "bob"], ["B-PER", "I-PER", "O", "B-PER"])])
    enc = task.encode(load_tokenizer(str(ner_teacher)), ex, 32)
    # One entity exactly right, one cut short (B-PER I-PER -> B-PER O): P = 1/2... of 2 predicted, R = 1/2.
    m = task.score(enc, [np.array([1, 0, 0, 1])])
    assert m["accuracy"] == 0.75 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    pos = _task(num_labels=3, label_names=["NN", "VB", "DT"])
    enc = pos.encode(load_tokenizer(str(ner_teacher)), pos.load(_write_jsonl(
        tmp_path / "pos.jsonl", [(["the", "city"], ["DT", "NN"])])), 32)
    m = pos.score(enc, [np.array([2, 1])])
    assert m["accuracy"] == 0.5 and "f1" not in m
    assert m["macro_f1"] == pytest.approx((1 + 0 + 0) / 3)


def test_settings_refuse_hidden_state_caching_and_matches(tmp_path, ner_dir, ner_teacher):
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="precompute.hidden_layers"):
        config_from_dict(_params(tmp_path, ner_dir, ner_teacher, precompute={"hidden_layers": [1]}))


# ------------------------------------------------------------------------------------------------- end to end


def test_stages_end_to_end_cached_equals_online_and_labels_only(tmp_path, ner_dir, ner_teacher):
    cfg = config_from_dict(_params(tmp_path, ner_dir, ner_teacher))
    train_teacher(cfg)
    t_metrics = json.loads((tmp_path / "m_teacher.json").read_text())
    assert {"dev_accuracy", "dev_f1", "dev_precision", "dev_recall"} <= set(t_metrics)

    [res] = precompute(cfg)
    reader = cf.CacheReader(res.path)
    assert len(reader) == 160 and reader.fields["logits"].shape == ("T", len(TAGS))
    # One cached logit vector per WORD (the tiny vocabulary tokenizes every word as one piece, so compare
    # with the word counts of the data).
    train = get_task(cfg.data).load(ner_dir / "train.jsonl")
    got = reader.gather(train.ids[:3], ["logits"])
    assert got["length"].tolist() == [len(w) for w in train.words[:3]]

    common = {"epochs": 1}
    distill(config_from_dict(_params(tmp_path, ner_dir, ner_teacher,
                                     distill={**common, "output": str(tmp_path / "s_cached")})))
    distill(config_from_dict(_params(tmp_path, ner_dir, ner_teacher, distill={
        **common, "teacher_signal": "online", "output": str(tmp_path / "s_online")})))
    a, b = _weights(tmp_path / "s_cached"), _weights(tmp_path / "s_online")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    start = _weights(ner_teacher)
    assert not torch.equal(a["classifier.weight"], start["classifier.weight"])

    distill(config_from_dict(_params(tmp_path, ner_dir, ner_teacher, distill={
        **common, "teacher_signal": "none", "output": str(tmp_path / "s_none")})))
    c = _weights(tmp_path / "s_none")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # the teacher signal changed the student

    results = evaluate(config_from_dict(_params(tmp_path, ner_dir, ner_teacher, evaluate={"models": {
        "teacher": str(tmp_path / "teacher"), "cached": str(tmp_path / "s_cached"),
        "labels_only": str(tmp_path / "s_none")}})))
    for r in results.values():
        assert {"accuracy", "macro_f1", "precision", "recall", "f1"} <= set(r) and 0 <= r["f1"] <= 1
    assert results["cached"]["parameters"] < results["teacher"]["parameters"]
    saved = AutoModelForTokenClassification.from_pretrained(tmp_path / "s_cached")
    assert saved.config.id2label == dict(enumerate(TAGS))


def test_student_with_another_tokenizer_distils_word_by_word(tmp_path, ner_dir, ner_teacher, other_student,
                                                            monkeypatch):
    import stages.tasks.token_classification as tc

    # The teacher kept at most 6 words (precompute.max_length 8); the student splits names into letters, so it
    # keeps fewer words of sentences with names at distill.max_length 12 and more of the others.
    cfg = _params(tmp_path, ner_dir, ner_teacher, precompute={"max_length": 8},
                  distill={"student": {"pretrained": str(other_student)}, "max_length": 12})
    precompute(config_from_dict(cfg))
    seen = []
    orig = tc.kd_loss

    def spy(student, teacher, temperature, *, kind, temperature_squared, mask):
        seen.append((student.shape, teacher.shape, mask.sum(1).tolist()))
        return orig(student, teacher, temperature, kind=kind, temperature_squared=temperature_squared, mask=mask)

    monkeypatch.setattr(tc, "kd_loss", spy)
    orig_kd = TokenClassification.kd_loss
    expected = []

    def kd(self, student, teacher, batch, **kw):
        expected.append(torch.minimum(self.lengths(batch), kw["teacher_lengths"]).tolist())
        return orig_kd(self, student, teacher, batch, **kw)

    monkeypatch.setattr(TokenClassification, "kd_loss", kd)
    out = distill(config_from_dict(cfg))
    assert out.fit.steps == 10 and len(seen) == 10
    student_words = [s[1] for s in seen]
    assert all(s == t for s, t, _ in seen)  # teacher logits sliced to the student's words
    assert [m for _, _, m in seen] == expected
    flat = [k for m in expected for k in m]
    assert max(flat) <= 6 and all(k >= 1 for k in flat)
    # Both sides limit: some rows where the student kept fewer words than the teacher and some the other way.
    task = get_task(config_from_dict(cfg).data)
    train = task.load(ner_dir / "train.jsonl")
    s_enc = task.encode(load_tokenizer(str(other_student)), train, 12)
    t_enc = task.encode(load_tokenizer(str(ner_teacher)), train, 8)
    s_kept = task.lengths(collate(s_enc, np.arange(len(train)))[0])
    t_kept = task.lengths(collate(t_enc, np.arange(len(train)))[0])
    assert bool((s_kept < t_kept).any()) and bool((s_kept > t_kept).any())
    assert student_words and all(torch.isfinite(p).all() for p in _weights(tmp_path / "student").values())


# ------------------------------------------------------------------------------------------------- slow: real data


def _real_params(tmp: Path, source: str, labels: list[str], epochs: float, max_examples: int | None) -> dict:
    data = tmp / "data"
    return {
        "data": {"task": "token_classification", "train": str(data / "train.jsonl"),
                 "dev": str(data / "dev.jsonl"), "test": str(data / "test.jsonl"), "num_labels": len(labels),
                 "label_names": labels},
        "prepare": {"source": source, "out_dir": str(data), "max_examples": max_examples},
        "train_teacher": {"model": "bundled:all-MiniLM-L6-v2", "output": str(tmp / "teacher"), "epochs": epochs,
                          "lr": 1e-4, "batch_size": 8, "max_length": 64, "metrics": str(tmp / "m_teacher.json")},
        "precompute": {"teachers": [str(tmp / "teacher")], "cache_root": str(tmp / "caches"), "max_length": 64},
        "distill": {"student": {"from_teacher": str(tmp / "teacher"), "keep_layers": [0, 5]}, "epochs": epochs,
                    "lr": 2e-4, "batch_size": 8, "max_length": 64, "output": str(tmp / "student"), "log_dir": str(tmp / "live"),
                    "metrics": str(tmp / "m_distill.json")},
        "evaluate": {"models": {"teacher": str(tmp / "teacher"), "student": str(tmp / "student")},
                     "max_length": 64, "throughput_batches": 1, "output": str(tmp / "m_eval.json"),
                     "predictions": str(tmp / "m_preds.json")},
    }


def _run_real(tmp: Path, source: str, epochs: float, max_examples: int | None) -> dict:
    from stages.prepare import prepare
    from stages.data import write_bundled

    # The label set of the whole source (split.json records it over every usable row).
    write_bundled(source, tmp / "probe", fractions={"train": 1.0}, seed=13, max_examples=1)
    labels = json.loads((tmp / "probe" / "split.json").read_text())["labels"]
    cfg = config_from_dict(_real_params(tmp, source, labels, epochs, max_examples))
    prepare(cfg)
    train_teacher(cfg)
    [res] = precompute(cfg)
    assert cf.verify_cache(res.path).ok
    distill(cfg)
    return evaluate(cfg)


@pytest.mark.slow
def test_minilm_on_wnut16_ner(tmp_path):
    # As examples/ner_wnut16.yaml: fewer or larger steps leave the teacher predicting only "O" (F1 0).
    results = _run_real(tmp_path, "bundled:wnut16_ner", epochs=3, max_examples=1000)
    for r in results.values():
        assert {"precision", "recall", "f1", "accuracy"} <= set(r)
    # Chance (or all-"O") entity F1 is 0; the example's run reaches about 0.35 on its 100 test tweets.
    assert results["teacher"]["f1"] > 0.1 and results["student"]["f1"] > 0.1


@pytest.mark.slow
def test_minilm_on_wsj_pos(tmp_path):
    results = _run_real(tmp_path, "bundled:pos_wsj", epochs=3, max_examples=400)
    for r in results.values():
        assert "f1" not in r and {"accuracy", "macro_f1"} <= set(r)
    # 44 tags: chance is ~2%, always-NN ~13%.
    assert results["teacher"]["accuracy"] > 0.5 and results["student"]["accuracy"] > 0.3
