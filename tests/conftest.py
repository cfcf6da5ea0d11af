"""Shared fixtures: an isolated cache per test and a tiny, fast experiment."""

from __future__ import annotations

import textwrap

import pytest

from kdbench.plugins import get_plugins

TINY = textwrap.dedent("""
    name: tiny
    seeds: [0]
    tasks: [digits]
    pairs:
      - teacher: {name: mlp, hidden: [64]}
        student: {name: mlp, hidden: [16]}
    recipes:
      scratch: [train]
      kd: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}]
      kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]
    training: {epochs: 3, batch_size: 64}
    measure: {latency_repeats: 2, latency_warmup: 1, latency_batch_sizes: [1, 32]}
""")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's real teacher cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def plugins():
    return get_plugins()


@pytest.fixture
def tiny_yaml(tmp_path):
    """Write the tiny experiment (optionally edited) and return its path."""
    def write(text: str = TINY, name: str = "tiny.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
