"""Same treatment: a note under the table names compressed rows of one model that skipped
other layers or were trained differently after compression (hand-made records)."""

from __future__ import annotations

from kdbench.report.document import Table
from kdbench.report.summary import frame, summarize
from kdbench.report.tables import leaderboard_blocks
from kdbench.report.terminal import terminal_view
from kdbench.report.treatment import treatment
from kdbench.store import Record

INIT = {"op": "init", "source": "teacher"}
KD = {"op": "distill", "distiller": {"name": "hinton", "temperature": 4.0, "alpha": 0.9},
      "training": {"epochs": 20, "lr": 0.001}}
FINETUNE = {"op": "finetune", "distiller": {"name": "hinton", "temperature": 4.0, "alpha": 0.9},
            "training": {"epochs": 3, "lr": 0.0003}}
KIND = {"prune": "pruner", "quantize": "quantizer", "decompose": "decomposer"}


def compressed(recipe: str, op: str, spec: dict, *, seed: int = 0, report: dict | None = None,
               history: int = 0, before: dict = INIT, after: tuple[dict, ...] = (),
               accuracy: float = 0.9) -> Record:
    """A student row: ``before`` then one compressor (its spec, report and inner epochs), then
    the training stages ``after``; configs and run log as the runner stores them."""
    specs = [before, {"op": op, KIND[op]: spec}, *after]
    log = [{"op": before["op"]},
           {"op": op, "name": spec["name"], "report": report or {},
            **({"history": [{"epoch": e + 1} for e in range(history)]} if history else {})},
           *({"op": s["op"], "history": [{"epoch": 1}]} for s in after)]
    return Record(cell_id=f"{recipe}-{seed}", experiment="x", role="student", task="digits", teacher="cnn",
                  student="cnn", recipe=recipe, seed=seed, status="done",
                  metrics={"test_accuracy": accuracy, "materialized": True},
                  config={"task": {"name": "digits"}, "stages": specs, "measure": {}, "budget": {"epochs": 20},
                          "plugins": {}, "experiment": "x", "recipe": recipe, "seed": seed},
                  stages=log, environment={"cpu": "Test CPU", "threads": 1}, started_at="t", finished_at="t")


def dense() -> Record:
    return Record(cell_id="dense-0", experiment="x", role="student", task="digits", teacher="cnn", student="cnn",
                  recipe="dense", seed=0, status="done", metrics={"test_accuracy": 0.95, "materialized": True},
                  config={"task": {"name": "digits"}, "stages": [INIT], "measure": {}, "budget": {"epochs": 20},
                          "plugins": {}, "experiment": "x"},
                  stages=[{"op": "init"}], environment={"cpu": "Test CPU", "threads": 1},
                  started_at="t", finished_at="t")


def notes(records) -> list[str]:
    table = next(b for b in leaderboard_blocks(summarize(frame(records))) if isinstance(b, Table))
    return [n for n in table.notes if "not treated alike" in n]


SKIPPED_HEAD = {"skipped_layers": {"head": "listed in skip"}}


def test_rows_that_skip_other_layers_are_named_with_what_they_skip():
    records = [dense(),
               compressed("magnitude-50", "prune", {"name": "magnitude", "skip": ["head"]}, report=SKIPPED_HEAD),
               compressed("wanda-50", "prune", {"name": "wanda", "skip": ["head"]}, report=SKIPPED_HEAD),
               # No skipped_layers in its report: its skip parameter says what it left alone.
               compressed("rtn-w8", "quantize", {"name": "weight-only", "skip": ["head"]}),
               compressed("dynamic-int8", "quantize", {"name": "dynamic-int8"},
                          report={"quantized_layers": 3})]
    [note] = notes(records)
    assert note.startswith("Rows compressed from the same model (init: teacher) are not treated alike: "
                           "layers left uncompressed — head: magnitude-50, wanda-50, rtn-w8 | none: dynamic-int8.")
    assert "training after compression" not in note  # none of them trains afterwards
    assert "dense" not in note  # it compresses nothing
    # The terminal's table says it too.
    assert "none: dynamic-int8" in " ".join(terminal_view(summarize(frame(records)), width=400).split())


def test_rows_trained_differently_after_compression_are_named_with_their_training():
    records = [compressed("magnitude-50", "prune", {"name": "magnitude"}, after=(FINETUNE,)),
               compressed("wanda-50", "prune", {"name": "wanda"}),
               compressed("gradual-90", "prune", {"name": "gradual", "distill": {"name": "hinton", "alpha": 0.9}},
                          history=3, report={"finetune_epochs": 3})]
    [note] = notes(records)
    assert ("training after compression — finetune 3 epochs, lr 0.0003 with hinton: magnitude-50 | "
            "none: wanda-50 | 3 epochs inside gradual with hinton: gradual-90.") in note
    assert "layers left uncompressed" not in note


def test_rows_treated_alike_get_no_note_and_other_models_are_not_compared():
    alike = [compressed("magnitude-50", "prune", {"name": "magnitude"}, after=(FINETUNE,)),
             compressed("wanda-50", "prune", {"name": "wanda"}, after=(FINETUNE,), seed=0),
             compressed("wanda-50", "prune", {"name": "wanda"}, after=(FINETUNE,), seed=1)]
    assert notes(alike) == []
    # A distilled student compressed without fine-tuning is another model: not compared with them.
    other = compressed("kd+prune", "prune", {"name": "magnitude"}, before=KD)
    assert notes(alike + [other]) == []
    assert treatment(other)["from"] == "distill: hinton"
    assert treatment(dense()) is None
