"""Compression that claims speed delivers it: batch-256 latency ratios measured in one run.

Slow (about half a minute): ``python -m pytest -m slow tests/benchmarks``. The models are
untrained (latency does not depend on the weights' values); every ratio compares two models
timed by the harness's interleaved protocol in the same process.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from kdbench.contracts import CompressionContext, TaskData
from kdbench.measure import export, latency
from kdbench.plugins import get_plugins


def cnn_and_data():
    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    data = TaskData(*[TensorDataset(x, y)] * 3, (1, 28, 28), 10)
    model = get_plugins().build("model", "cnn", {"channels": [32, 64], "hidden": 128}).build(data).eval()
    return model, data, CompressionContext(data, x, None, 0, calibration_targets=y)


def b256_ms(model, x) -> float:
    return latency(model, {256: x}, warmup=3, repeats=15)["latency_b256_ms"]


@pytest.mark.slow
@pytest.mark.parametrize("method, params, at_least", [
    ("channel", {"ratio": 0.5}, 1.3),      # structured pruning removes real work
    ("static-int8", {}, 1.5),              # int8 conv and linear kernels
])
def test_compressed_cnn_is_faster_at_batch_256(benchmark, method, params, at_least):
    model, data, context = cnn_and_data()
    kind = "pruner" if method == "channel" else "quantizer"
    compressed = export(get_plugins().build(kind, method, params).apply(export(model), context))
    x = data.train.tensors[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense_ms, compressed_ms = b256_ms(model, x), b256_ms(compressed, x)
        benchmark.pedantic(compressed, args=(x,), rounds=5, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert dense_ms / compressed_ms >= at_least, (dense_ms, compressed_ms)
