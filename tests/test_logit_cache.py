"""The top-k teacher-logit cache: the rebuilt distribution against the teacher's own log_softmax,
its tail and normalization, the KL it costs for each k (against a closed form), storage, atomic
save / load, corrupt files, the compute-once cache, classifiers and the distillers fed with it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.contracts import Outputs
from kdbench.logit_cache import TopKLogits, cache_key, cached_topk

V, N, T = 50, 6, 7
FP16 = 2.0 ** -11  # float16 relative rounding


def tiny_lm(seed: int = 0) -> nn.Module:
    """An embedding + linear language model; the weights are scaled so its distributions are peaked."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(V, 16), nn.Linear(16, V))
    with torch.no_grad():
        model[1].weight.mul_(4)
    return model


@pytest.fixture
def lm():
    torch.manual_seed(1)
    model, tokens = tiny_lm(), torch.randint(0, V, (N, T))
    with torch.no_grad():
        teacher = F.log_softmax(model(tokens), dim=-1)
    return model, tokens, teacher


def close_fp16(actual, expected):
    """Within float16 rounding of log-probabilities (plus the renormalization shift)."""
    assert ((actual - expected).abs() <= FP16 * (expected.abs() + 1)).all()


def test_k_equal_to_vocab_rebuilds_the_teacher_log_softmax(lm):
    model, tokens, teacher = lm
    cache = TopKLogits.compute(model, tokens, k=V, batch_size=4)
    rebuilt = cache.log_probs(torch.arange(N))
    assert rebuilt.shape == (N, T, V) and rebuilt.dtype == torch.float32
    close_fp16(rebuilt, teacher)
    assert torch.isneginf(cache.log_rest).all()  # no tail left
    # A subset of rows, in any order, gives those rows.
    close_fp16(cache.log_probs(torch.tensor([4, 1])), teacher[[4, 1]])


def test_top_k_exact_tail_uniform_rows_normalized(lm):
    model, tokens, teacher = lm
    k = 5
    cache = TopKLogits.compute(model, tokens, k=k)
    rebuilt = cache.log_probs(torch.arange(N))
    top = teacher.topk(k, dim=-1)
    assert torch.equal(cache.indices.long(), top.indices)
    assert cache.values.dtype == torch.float16 and cache.indices.dtype == torch.int32
    close_fp16(rebuilt.gather(-1, top.indices), top.values)
    # The tail: every entry equal to log((1 - top-k mass) / (V - k)), from the teacher's probabilities.
    tail_mass = 1 - top.values.exp().sum(-1)
    in_tail = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, top.indices, False)
    tail = rebuilt[in_tail].view(N, T, V - k)
    assert torch.allclose(tail, tail[..., :1].expand_as(tail))
    assert torch.allclose(tail[..., 0], (tail_mass / (V - k)).log(), atol=1e-3)
    assert torch.allclose(cache.log_rest.exp(), tail_mass, rtol=1e-4)
    assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(N, T), atol=1e-6)


def test_kl_to_the_teacher_matches_its_closed_form_and_shrinks_as_k_grows(lm):
    model, tokens, teacher = lm
    p = teacher.exp()
    kls = []
    for k in (1, 2, 5, 10, 25, 40, V):
        rebuilt = TopKLogits.compute(model, tokens, k=k).log_probs(torch.arange(N))
        kl = (p * (teacher - rebuilt)).sum(-1).mean().item()
        # Closed form: the tail of p against its mass spread uniformly, sum_tail p ln p - r ln(r / (V - k)).
        tail = teacher.sort(dim=-1, descending=True).values[..., k:]
        r = tail.exp().sum(-1)
        expected = (tail.exp() * tail).sum(-1) - (r * (r / (V - k)).log() if k < V else 0)
        assert kl == pytest.approx(expected.mean().item(), abs=1e-3)
        kls.append(kl)
    assert all(a > b for a, b in itertools.pairwise(kls)), kls
    assert kls[0] > 0.1 and kls[-1] < 1e-5  # top-1 is a poor copy, the full vocabulary a faithful one


def test_storage_is_six_bytes_per_entry_plus_four_per_token(lm):
    model, tokens, _ = lm
    assert TopKLogits.compute(model, tokens, k=V).bytes_per_token() == V * 6 + 4
    big = TopKLogits(torch.zeros(1, 1, 64, dtype=torch.float16), torch.zeros(1, 1, 64, dtype=torch.int32),
                     torch.zeros(1, 1), vocab_size=49152)
    assert big.bytes_per_token() == 388
    stored = sum(t.numel() * t.element_size() for t in (big.values, big.indices, big.log_rest))
    assert stored == 388


def test_save_load_round_trip_is_exact_and_leaves_no_temporary_file(lm, tmp_path):
    model, tokens, _ = lm
    cache = TopKLogits.compute(model, tokens, k=7)
    path = tmp_path / "logits" / "teacher.pt"
    cache.save(path)
    loaded = TopKLogits.load(path)
    for name in ("values", "indices", "log_rest"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name))
        assert getattr(loaded, name).dtype == getattr(cache, name).dtype
    assert (loaded.vocab_size, loaded.classifier) == (V, False)
    assert [p.name for p in path.parent.iterdir()] == ["teacher.pt"]


def test_truncated_or_foreign_file_raises_naming_the_file(lm, tmp_path):
    model, tokens, _ = lm
    path = tmp_path / "teacher.pt"
    TopKLogits.compute(model, tokens, k=7).save(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match="teacher.pt.*corrupt or truncated"):
        TopKLogits.load(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="teacher.pt.*not a format"):
        TopKLogits.load(path)


def test_cached_topk_computes_once_then_loads_and_replaces_a_corrupt_file(lm, tmp_path):
    model, tokens, teacher = lm
    calls = []

    def compute():
        calls.append(1)
        return TopKLogits.compute(model, tokens, k=V)

    path = tmp_path / "cache.pt"
    first, from_cache = cached_topk(path, compute)
    assert (from_cache, len(calls)) == (False, 1)
    second, from_cache = cached_topk(path, compute)
    assert (from_cache, len(calls)) == (True, 1)
    assert torch.equal(second.values, first.values)
    close_fp16(second.log_probs(torch.arange(N)), teacher)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="recomputing"):
        _, from_cache = cached_topk(path, compute)
    assert (from_cache, len(calls)) == (False, 2)
    assert TopKLogits.load(path).k == V


def test_a_classifier_output_comes_back_as_rows():
    torch.manual_seed(0)
    model, x = nn.Linear(8, V), torch.randn(10, 8) * 3
    with torch.no_grad():
        teacher = F.log_softmax(model(x), dim=-1)
    cache = TopKLogits.compute(model, x, k=V, batch_size=3)
    assert cache.values.shape == (10, 1, V) and cache.log_rest.shape == (10, 1)
    rebuilt = cache.log_probs(torch.arange(10))
    assert rebuilt.shape == (10, V)
    close_fp16(rebuilt, teacher)
    small = TopKLogits.compute(model, x, k=3).log_probs(torch.tensor([2]))
    close_fp16(small.gather(-1, teacher[[2]].topk(3).indices), teacher[[2]].topk(3).values)


def test_compute_restores_the_mode_and_does_not_track_gradients(lm):
    model, tokens, _ = lm
    model.train()
    cache = TopKLogits.compute(model, tokens, k=3)
    assert model.training and not cache.values.requires_grad
    assert torch.equal(TopKLogits.compute(model, tokens, k=3, batch_size=1).values, cache.values)


def test_bad_input_is_rejected_with_the_fix(lm):
    model, tokens, _ = lm
    with pytest.raises(ValueError, match="k = 51 exceeds the vocabulary size 50"):
        TopKLogits.compute(model, tokens, k=V + 1)
    with pytest.raises(ValueError, match="k and batch_size must be >= 1"):
        TopKLogits.compute(model, tokens, k=0)
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) or \(B, V\)"):
        TopKLogits.compute(nn.Flatten(0), torch.randn(4, 3), k=1)
    cache = TopKLogits.compute(model, tokens, k=3)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        cache.log_probs(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="float16"):
        TopKLogits(cache.values.float(), cache.indices, cache.log_rest, V)


def test_cache_key_is_stable_and_separates_what_changes_the_logits():
    spec = {"name": "shakespeare-tokens", "seq_len": 128}
    key = cache_key("smollm2", spec, "train", 64)
    assert key == cache_key("smollm2", {"seq_len": 128, "name": "shakespeare-tokens"}, "train", 64)
    others = {cache_key("smollm2", spec, "val", 64), cache_key("smollm2", spec, "train", 32),
              cache_key("other", spec, "train", 64), cache_key("smollm2", {**spec, "seq_len": 64}, "train", 64)}
    assert key not in others and len(others) == 4
    with pytest.raises(ValueError, match="positive integer"):
        cache_key("smollm2", spec, "train", 0)


def test_distillers_fed_the_cache(lm, plugins):
    """At k = V a token distiller sees the teacher; at k < V with T = 1 the forward-KL gradient is
    q - p~ (exact on the top k); at T = 2 only the ratios among the top k are the teacher's."""
    model, tokens, teacher = lm
    rows = teacher.view(-1, V)
    torch.manual_seed(2)
    student = torch.randn(len(rows), V, requires_grad=True)
    targets = torch.zeros(len(rows), dtype=torch.long)
    for name in ("forward-kl", "reverse-kl", "tvd", "hinton"):
        distiller = plugins.build("distiller", name, {"temperature": 2.0})
        full = TopKLogits.compute(model, tokens, k=V).log_probs(torch.arange(N)).view(-1, V)
        a = distiller.loss(Outputs(student, {}), Outputs(rows, {}), targets)
        b = distiller.loss(Outputs(student, {}), Outputs(full, {}), targets)
        for term in a:
            assert b[term].item() == pytest.approx(a[term].item(), rel=1e-3, abs=1e-5), (name, term)

    k = 5
    rebuilt = TopKLogits.compute(model, tokens, k=k).log_probs(torch.arange(N)).view(-1, V)
    forward = plugins.build("distiller", "forward-kl", {})
    (grad,) = torch.autograd.grad(forward.loss(Outputs(student, {}), Outputs(rebuilt, {}), targets)["forward-kl"],
                                  student)
    expected = (F.softmax(student, -1) - rebuilt.exp()).detach() / len(rows)
    assert torch.allclose(grad, expected, atol=1e-6)
    top = rows.topk(k, dim=-1).indices
    teacher_grad = (F.softmax(student, -1) - rows.exp()).detach() / len(rows)
    assert torch.allclose(grad.gather(-1, top), teacher_grad.gather(-1, top), atol=FP16 / len(rows))

    tempered_teacher = F.log_softmax(rows / 2, -1).gather(-1, top)
    tempered_cache = F.log_softmax(rebuilt / 2, -1).gather(-1, top)
    # Log-ratios to the most likely token: the same in both.
    assert torch.allclose(tempered_cache - tempered_cache[:, :1], tempered_teacher - tempered_teacher[:, :1],
                          atol=2e-3)
    # The uniform tail holds more tempered mass (Jensen): the top k come out smaller, never larger.
    assert (tempered_cache < tempered_teacher + 1e-3).all()
    assert (tempered_cache < tempered_teacher - 1e-3).any()
