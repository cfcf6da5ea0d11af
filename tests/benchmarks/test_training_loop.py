"""The training loop costs little more than a bare PyTorch loop doing the same work.

Slow: ``python -m pytest -m slow tests/benchmarks/test_training_loop.py``. "The same work" is
checked, not assumed: both loops must end with bit-identical weights. The bare loop draws the
same batches, computes the same loss, steps the same optimizer, scores validation and test
after every epoch and keeps the best validation epoch's weights, as ``training.fit`` does;
it only leaves out what a framework adds (loss terms by name, hooks, checks, history).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdbench.config import Training
from kdbench.plugins import get_plugins
from kdbench.training import Tapped, Teacher, fit, predict, shuffled_batches, warm_up

from paired import paired, report

EPOCHS = 20  # the smoke grid's budget: 20 epochs of 23 steps on digits


def setting():
    plugins = get_plugins()
    task = plugins.build("task", "digits")
    data = task.load()
    return plugins, task, data


def accuracy(model, x, y) -> float:
    """As the harness scores a split (``predict``: batches of 512 after a first row)."""
    return (predict(model, x).argmax(-1) == y).float().mean().item()


def bare_loop(model, data, teacher_logits=None, temperature=4.0, alpha=0.9, seed=0):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    (x, y), (xv, yv), (xt, yt) = data.train.tensors, data.val.tensors, data.test.tensors
    best, best_state = None, None
    for _ in range(EPOCHS):
        model.train()
        total = 0.0
        for idx in shuffled_batches(len(x), 64, generator):
            out = model(x[idx])
            if teacher_logits is None:
                loss = F.cross_entropy(out, y[idx])
            else:
                t = temperature
                kl = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(teacher_logits[idx] / t, -1),
                              reduction="batchmean", log_target=True)
                loss = (1 - alpha) * F.cross_entropy(out, y[idx]) + alpha * (t * t * kl)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            score, _ = accuracy(model, xv, yv), accuracy(model, xt, yt)
        if best is None or score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return total


def models(plugins, data, n=2):
    out = []
    for _ in range(n):
        torch.manual_seed(0)
        out.append(plugins.build("model", "mlp", {"hidden": [32]}).build(data))
    return out


def same_weights(a, b) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.slow
def test_fit_costs_at_most_ten_percent_over_a_bare_loop(benchmark, capsys):
    plugins, task, data = setting()
    warm_up()
    training = Training(epochs=EPOCHS, batch_size=64)
    ours, bare = models(plugins, data)
    fit(ours, data, task, training, seed=0)
    bare_loop(bare, data)
    assert same_weights(ours, bare)  # the same work, to the bit

    def with_fit():
        fit(models(plugins, data, 1)[0], data, task, training, seed=0)

    def bare():
        bare_loop(models(plugins, data, 1)[0], data)

    ratio = benchmark.pedantic(lambda: paired("training loop (cross-entropy)", ("fit", with_fit),
                                              ("bare loop", bare), "<= 1.10", repeats=7),
                               rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
    assert ratio.meets(), ratio.line()


@pytest.mark.slow
def test_kd_from_cached_logits_costs_at_most_ten_percent_over_a_bare_loop(benchmark, capsys):
    plugins, task, data = setting()
    warm_up()
    torch.manual_seed(1)
    teacher = plugins.build("model", "mlp", {"hidden": [256, 256]}).build(data).eval()
    logits = predict(teacher, data.train.tensors[0])
    distiller = plugins.build("distiller", "hinton")
    training = Training(epochs=EPOCHS, batch_size=64)

    def kd(model):
        fit(model, data, task, training, seed=0, distiller=distiller, teacher=Teacher(teacher, []),
            student=Tapped(model, []), teacher_outputs=logits.__getitem__)

    ours, bare = models(plugins, data)
    kd(ours)
    bare_loop(bare, data, logits)
    assert same_weights(ours, bare)

    ratio = benchmark.pedantic(lambda: paired(
        "training loop (Hinton KD, cached teacher logits)",
        ("fit", lambda: kd(models(plugins, data, 1)[0])),
        ("bare loop", lambda: bare_loop(models(plugins, data, 1)[0], data, logits)), "<= 1.10", repeats=7),
        rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
    assert ratio.meets(), ratio.line()
