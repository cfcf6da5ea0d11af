"""Evidence sized to the claim: compressions of a released model differ by seed in their
calibration sample (so seeds are replicates), and the LLM compression experiments use at
least 3 seeds and a test sample whose perplexity interval is a few percent wide."""

from __future__ import annotations

import dataclasses
import types

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.config import digest, load_experiment, parse_experiment
from kdbench.contracts import ModelFamily, Quantizer
from kdbench.runner import run_experiment
from kdbench.store import Store


class Released(ModelFamily):
    """A 'released checkpoint': the same weights whatever the seed, never trained here."""

    name = "released-mlp"
    description = "fixed weights, as a pretrained checkpoint"
    pretrained = True
    provenance = "fixed test weights, fp32"

    def build(self, data):
        generator = torch.Generator().manual_seed(123)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, data.num_classes))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        return model


class Recording(Quantizer):
    """Leaves the model as it is and reports which calibration inputs it was handed."""

    name = "recording"
    description = "records a digest of its calibration inputs"

    @dataclasses.dataclass(frozen=True)
    class Params:
        tag: int = 0  # two recipes of one compressor

    def apply(self, model, context):
        self._report = {"calibration": digest(context.calibration.tolist())}
        return model

    def report(self):
        return self._report


def test_compressions_of_a_released_model_calibrate_on_a_sample_drawn_by_seed(plugins, tmp_path, isolated_cache):
    module = types.ModuleType("evidence_plugin")
    module.kdbench_register_models = hookimpl(lambda register: register(Released))
    module.kdbench_register_quantizers = hookimpl(lambda register: register(Recording))
    with plugins.temporary(module, "evidence"):
        experiment = parse_experiment({
            "name": "released", "seeds": [0, 1, 2], "tasks": ["digits"],
            "pairs": [{"teacher": "released-mlp", "student": "released-mlp"}],
            "recipes": {"a": [{"init": "teacher"}, {"quantize": "recording"}],
                        "b": [{"init": "teacher"}, {"quantize": {"name": "recording", "tag": 1}}]},
            "measure": {"calibration_size": 32, "latency_repeats": 1, "latency_warmup": 0,
                        "latency_batch_sizes": [1]}}, plugins)
        with Store(tmp_path / "r.db") as store:
            summary = run_experiment(experiment, store, plugins, isolated_cache, progress=None)
            records = store.records()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    students = [r for r in records if r.role == "student"]
    sample = {(r.recipe, r.seed): r.stages[1]["report"]["calibration"] for r in students}
    assert len({sample["a", s] for s in (0, 1, 2)}) == 3  # each seed its own calibration sample
    assert all(sample["a", s] == sample["b", s] for s in (0, 1, 2))  # recipes of a seed share it
    # ... of one and the same released model: the teacher is no source of seed variation.
    teachers = {r.metrics["test_accuracy"] for r in records if r.role == "teacher"}
    assert len(teachers) == 1


def test_the_llm_compression_experiment_has_three_seeds_and_a_sized_test_sample(plugins):
    experiment = load_experiment("smollm2-compress", plugins)
    assert len(experiment.seeds) >= 3
    [task] = experiment.tasks
    # 128 windows of 128 tokens: SmolLM2's perplexity on the held-out plays within about ±6.5%
    # (a window's mean loss varies by 0.37 nats), where the file's 2,048 tokens gave ±18%.
    assert task.params.eval_tokens >= 16384
    assert experiment.measure.calibration_size <= len(range(0, task.params.train_tokens, task.params.context))
    # Every compressor leaves the LM head alone.
    for name, stages in experiment.recipes.items():
        for stage in stages[1:]:
            assert "lm.lm_head" in stage.ref.params.skip, name
