"""Caching the teacher's outputs saves its forward pass in every epoch of every cell.

Slow: ``python -m pytest -m slow tests/benchmarks/test_teacher_output_cache.py``. One
distillation is timed with the teacher running beside the student batch by batch, and with
its logits computed once (as the runner's cache does; the computation is counted) and read
back; the cached run must be faster and train the same model.
"""

from __future__ import annotations

import pytest
import torch

from kdbench.config import Training
from kdbench.logit_cache import compute_logits
from kdbench.plugins import get_plugins
from kdbench.training import Tapped, Teacher, fit, warm_up

from paired import paired, report


@pytest.mark.slow
def test_cached_teacher_logits_make_distillation_faster_and_change_nothing(benchmark, capsys):
    plugins = get_plugins()
    task = plugins.build("task", "digits")
    data = task.load()
    warm_up()
    torch.manual_seed(0)
    # A teacher much wider than its student, as in distillation: its forward dominates.
    teacher = plugins.build("model", "mlp", {"hidden": [2048, 2048]}).build(data).eval()
    distiller = plugins.build("distiller", "hinton")
    training = Training(epochs=4, batch_size=64)
    states = {}

    def distill(mode: str):
        torch.manual_seed(1)
        student = plugins.build("model", "mlp", {"hidden": [32]}).build(data)
        outputs = compute_logits(teacher, data.train.tensors[0]).__getitem__ if mode == "cached" else None
        fit(student, data, task, training, seed=0, distiller=distiller, teacher=Teacher(teacher, [], []),
            student=Tapped(student, [], []), teacher_outputs=outputs)
        states[mode] = student.state_dict()

    ratio = benchmark.pedantic(lambda: paired(
        "teacher-output cache (KD from an MLP [2048, 2048] on digits, 4 epochs)",
        ("cached", lambda: distill("cached")), ("online", lambda: distill("online")), "<= 0.8"),
        rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
    assert ratio.meets(), ratio.line()
    for name, value in states["online"].items():
        torch.testing.assert_close(states["cached"][name], value, rtol=1e-4, atol=1e-5)
