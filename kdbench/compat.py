"""Which model families can serve which tasks, checked when an experiment is parsed.

A task declares what it gives (``Task.inputs``: one kind of input; ``Task.targets``: one
kind of target) and a model family what it takes (``ModelFamily.inputs``) and predicts
(``ModelFamily.targets``), as tuples. Without this, an ``mlp`` on ``bbc-news`` (token ids)
is only found out when the teacher's first batch fails deep in torch; with it, the
experiment is refused before anything runs, with the families that do fit.

An undeclared attribute (``None`` on a task, ``()`` on a family: the defaults, so plugins
written before these attributes existed keep working) means "not said": that side of the
check is skipped. A declared name outside the vocabulary below is a plugin error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, PluginError, did_you_mean

if TYPE_CHECKING:  # plugins imports this module (for ``kdbench list``)
    from .config import Pair, Ref
    from .plugins import Entry, Plugins

#: What a task's input tensors are (one example; the batch dimension comes first).
INPUTS: dict[str, str] = {
    "features": "feature vectors",  # float (D,)
    "signals": "1-D signals",  # float (L,) or (C, L): a sequence of real values (mnist1d)
    "images": "images",  # float (C, H, W)
    "tokens": "token ids",  # integer (T,), with TaskData.vocab_size set
}
#: What a task's targets are, and so what shape of logits a model must return.
TARGETS: dict[str, str] = {
    "labels": "one label per example",  # targets (N,), logits (B, classes)
    "positions": "a label per position",  # targets (N, T) (language modelling), logits (B, T, V)
}


def family_kinds(value: Any) -> tuple[str, ...]:
    """A family's declaration as a tuple (a bare string counts as one name)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def declaration_problems(kind: str, cls: type) -> list[str]:
    """What is wrong with a task's or a family's ``inputs`` / ``targets`` (empty: nothing)."""
    problems = []
    for attr, vocabulary in (("inputs", INPUTS), ("targets", TARGETS)):
        value = getattr(cls, attr, None)
        if kind == "task":
            if value is not None and not isinstance(value, str):
                problems.append(f"{attr} is {value!r}; a task gives one kind: a string such as "
                                f"{next(iter(vocabulary))!r}, or None when not declared")
                continue
            names = () if value is None else (value,)
        else:
            if isinstance(value, str) or value is None:
                names = family_kinds(value)
            elif not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                problems.append(f"{attr} is {value!r}; declare a tuple of names")
                continue
            else:
                names = tuple(value)
        for name in names:
            if name not in vocabulary:
                problems.append(f"{attr} names {name!r}{did_you_mean(name, vocabulary)}; the names "
                                f"are {', '.join(vocabulary)}")
    return problems


def _or(names: Iterable[str], vocabulary: dict[str, str]) -> str:
    words = [vocabulary.get(n, repr(n)) for n in names]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def mismatch(task: type, family: type) -> str | None:
    """Why ``family`` cannot serve ``task`` (the clause after "model X ..."), or None when it
    can or when either side does not say."""
    given, taken = getattr(task, "inputs", None), family_kinds(getattr(family, "inputs", ()))
    if given is not None and taken and given not in taken:
        return f"takes {_or(taken, INPUTS)}, but task '{task.name}' gives {_or([given], INPUTS)}"
    wanted, predicted = getattr(task, "targets", None), family_kinds(getattr(family, "targets", ()))
    if wanted is not None and predicted and wanted not in predicted:
        return (f"predicts {_or(predicted, TARGETS)}, but task '{task.name}' has "
                f"{_or([wanted], TARGETS)}")
    return None


def declares(kind: str, cls: type) -> bool:
    if kind == "task":
        return getattr(cls, "inputs", None) is not None or getattr(cls, "targets", None) is not None
    return bool(family_kinds(getattr(cls, "inputs", ())) or family_kinds(getattr(cls, "targets", ())))


def fitting_families(task: type, plugins: "Plugins") -> list[str]:
    """Registered families that declare the inputs they take and fit ``task``."""
    return [name for name, entry in sorted(plugins.entries["model"].items())
            if family_kinds(getattr(entry.cls, "inputs", ())) and not declaration_problems("model", entry.cls)
            and mismatch(task, entry.cls) is None]


def _checked(plugins: "Plugins", kind: str, name: str) -> type:
    entry = plugins.get(kind, name)
    problems = declaration_problems(kind, entry.cls)
    if problems:
        raise PluginError(f"{kind} '{name}' (plugin '{entry.plugin}'): {'; '.join(problems)}. "
                          "Fix the class attribute (see CONTRIBUTING.md, 'Inputs and targets')")
    return entry.cls


def check_experiment(tasks: Sequence["Ref"], pairs: Sequence["Pair"], plugins: "Plugins") -> None:
    """Every (task, teacher) and (task, student) combination must fit, as far as both sides
    declare; the first that does not is a ``ConfigError`` at that model's place in the file."""
    for t, task_ref in enumerate(tasks):
        task = _checked(plugins, "task", task_ref.name)
        for i, pair in enumerate(pairs):
            for role in ("teacher", "student"):
                ref = getattr(pair, role)
                reason = mismatch(task, _checked(plugins, "model", ref.name))
                if reason is None:
                    continue
                fit = fitting_families(task, plugins)
                listing = (f"families that fit task '{task.name}': {', '.join(fit)}" if fit
                           else f"no registered family declares that it fits task '{task.name}'")
                raise ConfigError(f"model '{ref.name}' {reason} (tasks[{t}]); {listing}",
                                  f"pairs[{i}].{role}")


def describe(kind: str, cls: type) -> str:
    """One line for ``kdbench list``: what a task gives or a family takes; '' if undeclared."""
    if kind == "task":
        given, wanted = getattr(cls, "inputs", None), getattr(cls, "targets", None)
        parts = [f"gives {_or([given], INPUTS)}" if given else "",
                 _or([wanted], TARGETS) if wanted else ""]
    elif kind == "model":
        taken = family_kinds(getattr(cls, "inputs", ()))
        predicted = family_kinds(getattr(cls, "targets", ()))
        parts = [f"takes {_or(taken, INPUTS)}" if taken else "",
                 f"predicts {_or(predicted, TARGETS)}" if predicted else ""]
    else:
        return ""
    return "; ".join(p for p in parts if p)


def entry_io(entry: "Entry") -> dict[str, Any]:
    """The declaration as stored data (``kdbench list --json``): only what is declared."""
    out: dict[str, Any] = {}
    if entry.kind == "task":
        for attr in ("inputs", "targets"):
            if getattr(entry.cls, attr, None) is not None:
                out[attr] = getattr(entry.cls, attr)
    elif entry.kind == "model":
        for attr in ("inputs", "targets"):
            value = family_kinds(getattr(entry.cls, attr, ()))
            if value:
                out[attr] = list(value)
    return out
