"""How the recipes of an experiment relate, and the controls that keep budgets equal.

A *compound* recipe begins with every stage of another recipe of the same experiment, its
*parent* (the longest such prefix): ``kd+prune`` is ``kd`` then prune and finetune. It is
compared with its parent, so that its row measures what its own stages add: ``kd+int8``
against ``kd`` is the cost of int8, where against ``scratch`` it would be KD's shortfall. A
recipe that starts from the teacher (``init: teacher``) and has no declared parent has the
teacher's own row as its parent.

When the stages a compound adds include training (a ``finetune``, or a compressor that
fine-tunes as it goes, such as ``gradual`` or ``qat``), it trains more than its parent. What
isolates the compression is the *equal-budget control*: the parent followed by the same
training with the same loss, without the compression. An experiment declares it as a recipe
of its own (any recipe with exactly those stages), or asks kdbench to derive it with
``controls: auto``.

Relations are computed on comparable stage items: parsed :class:`~kdbench.config.Stage`
objects when an experiment is loaded (to derive controls), stored stage specs (dicts) when a
report is built from a store (to find each row's parent and control among the stored rows).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .config import COMPRESSOR_KIND, TRAINING_OPS, Ref, Stage, parse_ref
from .errors import ConfigError, KdbenchError, unknown
from .params import defaults, parse_params

#: Values of the experiment key ``controls``.
CONTROL_MODES = ("none", "auto")
#: The name of the teacher's own row: the parent of recipes that start from the teacher.
TEACHER = "teacher"
INIT_TEACHER = Stage("init", source="teacher")
#: ``init: teacher`` as a stored stage spec.
INIT_TEACHER_SPEC = {"op": "init", "source": "teacher"}
#: Finetune stages are named ``ft`` in the names of derived controls.
_SHORT_OP = {"finetune": "ft"}


def parse_controls(raw: Any) -> str:
    """The ``controls`` key: ``auto`` derives equal-budget controls, ``none`` (the default)
    does not."""
    if raw is None:
        return "none"
    if not isinstance(raw, str) or raw not in CONTROL_MODES:
        raise ConfigError(unknown("value", str(raw), CONTROL_MODES) + "; 'auto' adds, for each compound "
                          "recipe whose added stages train, its parent trained for the same extra "
                          "epochs with the same loss", "controls")
    return raw


# ------------------------------------------------------------------ relations
def longest_prefix(stages: Sequence[Any], candidates: Mapping[str, Sequence[Any]]) -> str | None:
    """The candidate whose stages are the longest proper prefix of ``stages``; on a tie, the
    first in order."""
    best, size = None, 0
    for name, prefix in candidates.items():
        n = len(prefix)
        if size < n < len(stages) and list(stages[:n]) == list(prefix):
            best, size = name, n
    return best


def parents(recipes: Mapping[str, Sequence[Stage]]) -> dict[str, str | None]:
    """Each recipe's parent: the recipe whose stages are the longest proper prefix of its own;
    ``teacher`` for a recipe that starts from the teacher without one; else None."""
    out: dict[str, str | None] = {}
    for name, stages in recipes.items():
        parent = longest_prefix(stages, {k: v for k, v in recipes.items() if k != name})
        if parent is None and len(stages) > 1 and stages[0] == INIT_TEACHER:
            parent = TEACHER
        out[name] = parent
    return out


def compressor_schedule(cls: type, params: Any) -> list[tuple[int, Any]] | None:
    """The ``(epochs, distill)`` of each fine-tuning call a compressor makes with ``params``
    (its ``finetune_schedule``); None for one that fine-tunes (its parameters extend
    ``FinetuneParams``) without saying how."""
    from .contracts import Compressor, FinetuneParams

    declared = getattr(cls, "finetune_schedule", None)
    default = Compressor.finetune_schedule.__func__
    if declared is not None and getattr(declared, "__func__", declared) is not default:
        return [(int(epochs), distill) for epochs, distill in declared(params)]
    return None if isinstance(params, FinetuneParams) else []


def stage_training(stage: Stage, plugins, where: str = "") -> list[Stage]:
    """The training ``stage`` does, as stages that do the same training and compress nothing:
    a training stage is its own; a compressor that fine-tunes as it goes gives one
    ``finetune`` per call (same epochs, same distiller, the cell's training otherwise, as
    ``context.finetune`` trains); any other stage, none."""
    if stage.op in TRAINING_OPS:
        return [stage]
    if stage.op not in COMPRESSOR_KIND or stage.ref is None:
        return []
    schedule = compressor_schedule(plugins.get(stage.ref.kind, stage.ref.name).cls, stage.ref.params)
    if schedule is None:
        raise ConfigError(f"{stage.op}: {stage.ref.name} fine-tunes as it goes (its parameters take a "
                          "distiller) but does not declare how (Compressor.finetune_schedule), so no "
                          "equal-budget control can be derived; declare the control recipe yourself and "
                          "drop 'controls: auto', or add finetune_schedule to the plugin", where)
    def resolved(distill: Any):  # a parameter already resolved into a reference, or a name / mapping
        if not distill or isinstance(distill, Ref):
            return distill or None
        return parse_ref(plugins, "distiller", distill, f"{where}.distill")

    return [Stage("finetune", resolved(distill), {"epochs": epochs}) for epochs, distill in schedule if epochs]


def control_stages(parent: Sequence[Stage], compound: Sequence[Stage], plugins,
                   where: str = "") -> tuple[Stage, ...] | None:
    """The equal-budget control of ``compound`` (whose stages begin with ``parent``'s): the
    parent followed by the training of every added stage, in order. None when the added
    stages do not train, or when they only train (the compound is its own control)."""
    start = len(parent)
    extra = [t for i, stage in enumerate(compound[start:])
             for t in stage_training(stage, plugins, f"{where}[{start + i}]")]
    control = tuple(parent) + tuple(extra)
    return None if not extra or list(control) == list(compound) else control


def control_name(parent: str, extra: Sequence[Stage]) -> str:
    """``kd+ft3``: the parent's name and a tag per added training stage, repeats counted
    (``dense+3xft1:hinton``). Made of the stages alone, so the name (and the cells' ids) do
    not change when other recipes are added."""
    groups: list[list] = []
    for tag in (_tag(stage) for stage in extra):
        if groups and groups[-1][0] == tag:
            groups[-1][1] += 1
        else:
            groups.append([tag, 1])
    return parent + "+" + "+".join(tag if n == 1 else f"{n}x{tag}" for tag, n in groups)


def _tag(stage: Stage) -> str:
    text = _SHORT_OP.get(stage.op, stage.op)
    if "epochs" in stage.training:
        text += str(stage.training["epochs"])
    rest = {k: v for k, v in stage.training.items() if k != "epochs"}
    if rest:
        text += "(" + ",".join(f"{k}={value_text(v)}" for k, v in rest.items()) + ")"
    return text + (f":{stage.ref.label()}" if stage.ref is not None else "")


def derive_controls(recipes: Mapping[str, tuple[Stage, ...]], plugins
                    ) -> tuple[dict[str, tuple[Stage, ...]], dict[str, tuple[str, ...]]]:
    """``controls: auto``: the recipes, then an equal-budget control for each compound whose
    added stages train, unless the experiment declares one (a recipe with exactly its
    stages). One control serves every compound that needs the same stages. Returns the
    recipes and, for each derived control, the compounds it serves."""
    out = dict(recipes)
    served: dict[str, list[str]] = {}
    for name, parent in parents(recipes).items():
        if parent is None:
            continue
        parent_stages = (INIT_TEACHER,) if parent == TEACHER else recipes[parent]
        control = control_stages(parent_stages, recipes[name], plugins, f"recipes.{name}")
        if control is None:
            continue
        existing = next((k for k, v in out.items() if list(v) == list(control)), None)
        if existing is not None and existing not in served:
            continue  # declared by the experiment
        derived = existing or control_name(parent, control[len(parent_stages):])
        if derived in out and list(out[derived]) != list(control):
            raise ConfigError(f"controls: auto names the equal-budget control of '{name}' '{derived}', "
                              "but the experiment has a recipe of that name with other stages; rename "
                              "that recipe, or declare the control yourself", f"recipes.{derived}")
        out[derived] = control
        served.setdefault(derived, []).append(name)
    return out, {k: tuple(v) for k, v in served.items()}


# ------------------------------------------------------------------ stored stages
def plain(value: Any) -> Any:
    """A JSON-ready value as stored (tuples as lists), for comparing specs."""
    return json.loads(json.dumps(value, default=str))


def spec_training(spec: Mapping[str, Any], budget: Mapping[str, Any] | None, plugins,
                  trained: bool) -> list[dict] | None:
    """:func:`stage_training` for a stored stage spec: the specs of the stages that do the
    same training, as a derived control stores them. ``trained``: the stage's log shows
    training. None when it trained and how cannot be told (its plugin is not installed, or
    does not declare its fine-tuning)."""
    op = spec.get("op")
    if op in TRAINING_OPS:
        return [plain(spec)]
    if op not in COMPRESSOR_KIND:
        return []
    unknown_training = None if trained else []
    kind = COMPRESSOR_KIND[op]
    ref = spec.get(kind) or {}
    entry = plugins.entries.get(kind, {}).get(ref.get("name")) if plugins is not None else None
    if entry is None:
        return unknown_training
    try:
        params = parse_params(entry.cls.Params, {k: v for k, v in ref.items() if k != "name"}, op,
                              resolve=functools.partial(parse_ref, plugins))
        schedule = compressor_schedule(entry.cls, params)
        calls = [(epochs, (distill if isinstance(distill, Ref)
                           else parse_ref(plugins, "distiller", distill, "distill")).spec() if distill else None)
                 for epochs, distill in schedule or [] if epochs]
    except KdbenchError:
        return unknown_training
    if schedule is None or (calls and budget is None):
        return unknown_training
    return [plain({"op": "finetune", **({"distiller": d} if d else {}), "training": {**budget, "epochs": e}})
            for e, d in calls]


def training_epochs(specs: Sequence[Mapping[str, Any]]) -> int:
    """The epochs of training stage specs."""
    return sum(int((s.get("training") or {}).get("epochs", 0)) for s in specs)


def value_text(value: Any) -> str:
    """A parameter's value, short: ``4`` for 4.0, ``[head]`` for a list."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}={value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, dict, str)) and not value)


def ref_text(kind: str, ref: Mapping[str, Any], plugins=None) -> str:
    """``magnitude(sparsity=0.5)``: the name, the first parameter (the one a plugin declares
    first is its key one: the sparsity, the bits, the temperature) and every other that
    differs from its default; every parameter when the plugin is not installed."""
    name, params = ref.get("name"), {k: v for k, v in ref.items() if k != "name"}
    entry = plugins.entries.get(kind, {}).get(name) if plugins is not None else None
    shown = {k: v for k, v in params.items() if not _empty(v)}
    if entry is not None and dataclasses.is_dataclass(entry.cls.Params):
        fields = [f.name for f in dataclasses.fields(entry.cls.Params)]
        default = defaults(entry.cls.Params)
        shown = {k: v for k, v in shown.items()
                 if k == fields[0] or k not in default or plain(default[k]) != plain(v)}
    inner = ", ".join(f"{k}={value_text(v)}" for k, v in shown.items())
    return f"{name}({inner})" if inner else str(name)


def _training_diff(training: Mapping[str, Any], budget: Mapping[str, Any] | None, skip: tuple = ()) -> list[str]:
    if budget is None:
        return [f"epochs={training.get('epochs')}"] if "epochs" not in skip and "epochs" in training else []
    return [f"{k}={value_text(v)}" for k, v in training.items()
            if k not in skip and plain(budget.get(k)) != plain(v)]


def stage_text(spec: Mapping[str, Any], budget: Mapping[str, Any] | None, plugins=None) -> str:
    """One stored stage, compact: ``distill:hinton(temperature=6)``, ``prune:magnitude(sparsity=0.5)``,
    ``finetune(3, lr=0.0003, distill:hinton)``; a training stage's settings where they differ
    from the cell's budget, in brackets."""
    op = spec.get("op", "?")
    training = spec.get("training") or {}
    if op == "init":
        return f"init:{spec.get('source', 'teacher')}"
    if op == "finetune":
        parts = [str(training.get("epochs", "?"))] + _training_diff(training, budget, ("epochs",))
        if spec.get("distiller"):
            parts.append("distill:" + ref_text("distiller", spec["distiller"], plugins))
        return f"finetune({', '.join(parts)})"
    head = op
    if op == "distill" and spec.get("distiller"):
        head += ":" + ref_text("distiller", spec["distiller"], plugins)
    elif op in COMPRESSOR_KIND and spec.get(COMPRESSOR_KIND[op]):
        head += ":" + ref_text(COMPRESSOR_KIND[op], spec[COMPRESSOR_KIND[op]], plugins)
    diff = _training_diff(training, budget) if op in TRAINING_OPS else []
    return head + (f"[{', '.join(diff)}]" if diff else "")


def stages_text(specs: Sequence[Mapping[str, Any]], budget: Mapping[str, Any] | None, plugins=None) -> str:
    """A recipe's resolved stages: ``distill:hinton(temperature=6) > prune:magnitude(sparsity=0.5)
    > finetune(3)``; repeated stages once, counted (``finetune(1, distill:hinton) ×3``)."""
    groups: list[list] = []
    for text in (stage_text(s, budget, plugins) for s in specs):
        if groups and groups[-1][0] == text:
            groups[-1][1] += 1
        else:
            groups.append([text, 1])
    return " > ".join(text if n == 1 else f"{text} ×{n}" for text, n in groups) or "-"
