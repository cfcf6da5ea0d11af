"""Caching the teacher's outputs saves its forward pass in every epoch of every cell.

Slow: ``python -m pytest -m slow tests/benchmarks``. One distillation is timed twice in one
process, with the teacher running beside the student batch by batch and with its logits
read from the cache the runner builds; the cached run must be faster and train the same model.
"""

from __future__ import annotations

import time

import pytest
import torch

from kdbench.config import Training
from kdbench.logit_cache import compute_logits
from kdbench.plugins import get_plugins
from kdbench.training import Tapped, Teacher, fit


@pytest.mark.slow
def test_cached_teacher_logits_make_distillation_faster_and_change_nothing(capsys):
    plugins = get_plugins()
    task = plugins.build("task", "digits")
    data = task.load()
    torch.manual_seed(0)
    # A teacher much wider than its student, as in distillation: its forward dominates.
    teacher = plugins.build("model", "mlp", {"hidden": [2048, 2048]}).build(data).eval()
    distiller = plugins.build("distiller", "hinton")
    training = Training(epochs=4, batch_size=64)
    seconds, states = {}, {}
    for mode in ("warm-up", "online", "cached"):  # the first fit in a process pays one-off costs
        torch.manual_seed(1)
        student = plugins.build("model", "mlp", {"hidden": [32]}).build(data)
        start = time.perf_counter()
        outputs = compute_logits(teacher, data.train.tensors[0]).__getitem__ if mode == "cached" else None
        fit(student, data, task, training, seed=0, distiller=distiller, teacher=Teacher(teacher, [], []),
            student=Tapped(student, [], []), teacher_outputs=outputs)
        seconds[mode] = time.perf_counter() - start
        states[mode] = student.state_dict()
    assert all(torch.equal(v, states["online"][k]) for k, v in states["warm-up"].items())  # deterministic
    with capsys.disabled():
        print(f"\nhinton KD, digits, 4 epochs, teacher mlp [2048, 2048]: online {seconds['online']:.2f} s, "
              f"cached (including computing the cache) {seconds['cached']:.2f} s, "
              f"saving {1 - seconds['cached'] / seconds['online']:.0%}")
    assert seconds["cached"] < 0.8 * seconds["online"]
    for name, value in states["online"].items():
        torch.testing.assert_close(states["cached"][name], value, rtol=1e-4, atol=1e-5)
