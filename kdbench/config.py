"""The experiment file: parsed, validated and expanded into a grid of cells before any work.

Every plugin reference is a name or a mapping ``{name: ..., <params>}``, also where it is a
parameter of another one (the distiller a compressor fine-tunes with): it is resolved the same
way, and its spec and plugin version are part of the cell id. Any unknown key, name or
parameter is a ``ConfigError`` carrying the file, the path inside it, the allowed values and a
"did you mean".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import weakref
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from . import __version__, yamlfile
from .compat import check_experiment as check_compatibility
from .errors import ConfigError, did_you_mean, unknown
from .params import as_dict, defaults, parse_params
from .plugins import Plugins

DEFAULT_EXPERIMENT = "quickstart.yaml"
TOP_LEVEL_KEYS = ("name", "description", "seeds", "tasks", "pairs", "recipes", "training",
                  "measure", "executor", "teacher_cache", "controls")
PAIR_KEYS = ("teacher", "student", "teacher_training", "student_training")
STAGE_OPS = ("init", "train", "distill", "finetune", "prune", "quantize", "decompose")
TRAINING_OPS = ("train", "distill", "finetune")
COMPRESSOR_KIND = {"prune": "pruner", "quantize": "quantizer", "decompose": "decomposer"}


@dataclasses.dataclass(frozen=True)
class Training:
    """How a model is trained: the ``training`` block, a stage's overrides, a task's budget."""

    epochs: int = 20
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    milestones: tuple[int, ...] = ()  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0, per step
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    checkpoint: Literal["best", "last"] = "best"  # best = best validation metric
    # A stage is still improving when the best validation value of its last 20 % of epochs
    # beats the best before by more than this share of that best (kdbench/convergence.py).
    # 0.005: on digits' 360-example validation split one example is 0.28 points, 0.31 % of a
    # 90 % best, so a best that moved by one example (noise) passes as flat and a gain of two
    # examples or more is flagged; on larger splits it asks for a real half-percent gain.
    converge_tolerance: float = 0.005
    require_converged: bool = False  # fail a cell whose trained stage was still improving

    #: Fields added after results were stored: hashed only when set away from their default,
    #: so that stores written before keep their cell ids (see ``training_spec``).
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("converge_tolerance", "require_converged")
    #: Fields that judge a training run and leave its weights alone: no part of a teacher's
    #: cache key, nor of the budget a protocol compares.
    JUDGING: ClassVar[tuple[str, ...]] = ("converge_tolerance", "require_converged")

    def __post_init__(self):
        if self.converge_tolerance < 0:
            raise ValueError(f"converge_tolerance must be >= 0 (0: any gain counts), got {self.converge_tolerance}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
        if not 0 <= self.label_smoothing < 1 or self.grad_clip < 0 or self.warmup_epochs < 0:
            raise ValueError("label_smoothing must be in [0, 1), grad_clip and warmup_epochs >= 0")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones, e.g. [150, 180, 210]")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError("nesterov applies to the sgd optimizer only")


@dataclasses.dataclass(frozen=True)
class Measure:
    """The measurement protocol; part of what makes two rows comparable."""

    latency_batch_sizes: tuple[int, ...] = (1, 256)
    latency_warmup: int = 3
    latency_repeats: int = 15
    eval_batch_size: int = 512
    calibration_size: int = 256  # training inputs handed to compressors
    # Linear-probe accuracy of the model's deepest feature point (its embedding), fitted on
    # the training split, and its agreement with the teacher's embedding: for embedding models.
    probe: bool = False

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("probe",)

    def __post_init__(self):
        if self.latency_repeats < 1 or self.eval_batch_size < 1 or not self.latency_batch_sizes:
            raise ValueError("latency_repeats and eval_batch_size must be >= 1, "
                             "latency_batch_sizes non-empty")


@dataclasses.dataclass(frozen=True)
class Ref:
    """A resolved reference to a registered thing, with validated parameters."""

    kind: str
    name: str
    params: Any
    plugin: str
    version: str
    short: str | None = dataclasses.field(default=None, compare=False)  # the plugin's own label
    data_version: str = "1"  # a task's ``version``: its data and splits

    def spec(self) -> dict[str, Any]:
        """Name and parameters, as stored and hashed into cell ids. A parameter a plugin lists
        in its ``Params.ADDED_LATER`` appears only when set away from its default, so a new
        option does not change the id of every cell already in a store. A task's data version
        appears from version 2 on, for the same reason: cells of version-1 tasks keep their ids,
        and a task whose data changed gets new ones (its old rows are not taken as done)."""
        spec = {"name": self.name, **as_dict(self.params)}
        later = getattr(type(self.params), "ADDED_LATER", ())
        if later:
            default = defaults(type(self.params))
            for key in later:
                if key in default and spec.get(key) == default[key]:
                    del spec[key]
        if self.data_version != "1":
            spec["data_version"] = self.data_version
        return spec

    def refs(self) -> Iterator[Ref]:
        """This reference and every one nested in its parameters (a compressor's distiller),
        depth first: each is a plugin version the result depends on."""
        yield self
        if dataclasses.is_dataclass(self.params):
            for field in dataclasses.fields(self.params):
                yield from _nested_refs(getattr(self.params, field.name))

    def label(self) -> str:
        """Short, readable: the plugin's own name for it (``resnet56``), or the parameters
        that differ from the defaults (``mlp(hidden=[32])``, ``gradual(distill=hinton)``)."""
        if self.short:
            return self.short
        default = defaults(type(self.params))
        changed = {k: v for k, v in as_dict(self.params).items() if k not in default or default[k] != v}
        if not changed:
            return self.name
        inner = ",".join(f"{k}={_short(getattr(self.params, k))}" for k in changed)
        return f"{self.name}({inner})"


def _nested_refs(value: Any) -> Iterator[Ref]:
    if isinstance(value, Ref):
        yield from value.refs()
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nested_refs(item)


def _short(value: Any) -> str:
    if isinstance(value, Ref):
        return value.label()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_short, value)) + "]"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Stage:
    op: str
    ref: Ref | None = None  # the distiller / compressor (finetune: optional distiller)
    training: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # overrides
    source: str | None = None  # init: where the weights come from

    def spec(self, base: Training | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        if self.ref is not None:
            out[self.ref.kind] = self.ref.spec()
        if self.op in TRAINING_OPS and base is not None:
            out["training"] = training_spec(self.resolve_training(base))
        if self.source:
            out["source"] = self.source
        return out

    def resolve_training(self, base: Training) -> Training:
        return parse_params(Training, {**dataclasses.asdict(base), **self.training}, self.op)

    def label(self) -> str:
        return f"{self.op}:{self.ref.label()}" if self.ref else self.op


@dataclasses.dataclass(frozen=True)
class Pair:
    teacher: Ref
    student: Ref
    teacher_training: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    student_training: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TeacherCache:
    """Teacher outputs computed once per (teacher, task, split) and read back by response and
    token-level distillers: the ``top_k`` largest log-probabilities per position, the rest of
    the probability mass spread evenly (see ``kdbench/logit_cache.py``)."""

    top_k: int = 256

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"teacher_cache.top_k must be at least 1, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    seeds: tuple[int, ...]
    tasks: tuple[Ref, ...]
    pairs: tuple[Pair, ...]
    recipes: dict[str, tuple[Stage, ...]]
    training: Mapping[str, Any]
    measure: Measure
    executor: Ref | None
    source: str
    teacher_cache: TeacherCache | None = None
    #: A recipe's declared main figure (``report:`` of its mapping form), where its task
    #: metric does not apply (an untrained head): what its rows show and are read by.
    reports: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Equal-budget controls that kdbench added to ``recipes`` (``controls: auto``), each with
    #: the compound recipes it serves (see ``kdbench/recipes.py``).
    derived_controls: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def cells(self) -> list["Cell"]:
        """The grid: task x pair x recipe x seed, in that nesting order."""
        return [Cell(self, task, pair, recipe, seed)
                for task in self.tasks for pair in self.pairs
                for recipe in self.recipes for seed in self.seeds]


def training_spec(training: Training, judging: bool = True) -> dict[str, Any]:
    """A training as stored and hashed: ``Training.ADDED_LATER`` fields only when set away
    from their default (as ``measure_spec``); without ``judging``, never the fields that only
    judge the run (``Training.JUDGING``)."""
    out = dataclasses.asdict(training)
    for key in Training.ADDED_LATER:
        if out[key] == Training.__dataclass_fields__[key].default or (not judging and key in Training.JUDGING):
            del out[key]
    return out


def measure_spec(measure: Measure) -> dict[str, Any]:
    """The measurement protocol as stored and hashed. Settings added after results were
    published appear only when set away from their default, so that adding one does not
    change the id of every cell already in a store."""
    out = dataclasses.asdict(measure)
    for key in Measure.ADDED_LATER:
        if out[key] == Measure.__dataclass_fields__[key].default:
            del out[key]
    return out


#: Config keys stored with a cell for reports, left out of its id (see ``Cell.config``).
UNHASHED = ("budget", "task_plugin", "provenance", "control_for")


def digest(obj: Any) -> str:
    """A stable hash of a JSON-ready object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_provenance(plugins: Plugins, model: Ref) -> str:
    """The provenance a model family states for these parameters ('' when built here)."""
    return plugins.get("model", model.name).cls.provenance_for(model.params) or ""


def base_training(task: Ref, plugins: Plugins, overrides: Mapping[str, Any]) -> Training:
    entry = plugins.get("task", task.name)
    return parse_params(Training, {**entry.cls.default_training, **overrides}, "training")


@dataclasses.dataclass(frozen=True)
class TeacherJob:
    """Training (or loading from cache) one teacher and measuring it."""

    experiment: Experiment
    task: Ref
    teacher: Ref
    training: Training
    seed: int

    def config(self) -> dict[str, Any]:
        """Everything that determines the trained teacher's weights (not how its training is
        judged: a teacher is cached once whatever ``require_converged`` says)."""
        return {"kdbench": __version__, "task": self.task.spec(), "teacher": self.teacher.spec(),
                "training": training_spec(self.training, judging=False), "seed": self.seed,
                "plugins": {r.plugin: r.version for r in (self.task, self.teacher)}}

    @property
    def teacher_key(self) -> str:
        return digest(self.config())

    @property
    def cell_id(self) -> str:
        """The teacher's own leaderboard row, measured under this experiment's protocol and
        judged by its convergence settings (those only when set away from their defaults)."""
        judging = {k: v for k, v in training_spec(self.training).items() if k in Training.JUDGING}
        return digest({"teacher": self.config(), "experiment": self.experiment.name,
                       "measure": measure_spec(self.experiment.measure),
                       **({"judging": judging} if judging else {})})

    def labels(self) -> dict[str, Any]:
        return {"task": self.task.label(), "teacher": self.teacher.label(), "student": "-",
                "recipe": "teacher", "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid: (task, pair, recipe, seed)."""

    experiment: Experiment
    task: Ref
    pair: Pair
    recipe: str
    seed: int
    # Cell ids by plugin registry: a plan, a resume and each progress line ask for them again,
    # and each costs the parsing of every stage's training. Not pickled (see __getstate__).
    _ids: weakref.WeakKeyDictionary = dataclasses.field(default_factory=weakref.WeakKeyDictionary, init=False,
                                                        repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_ids"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _ids=weakref.WeakKeyDictionary())

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.experiment.recipes[self.recipe]

    def teacher_job(self, plugins: Plugins) -> TeacherJob:
        training = base_training(self.task, plugins,
                                 {**self.experiment.training, **self.pair.teacher_training})
        return TeacherJob(self.experiment, self.task, self.pair.teacher, training, self.seed)

    def config(self, plugins: Plugins) -> dict[str, Any]:
        """The full resolved config: stored with the row and hashed into the cell id.

        ``budget`` (the base student training) and ``task_plugin`` are stored for the
        protocol fingerprint but not hashed: the stages already hold every training a cell
        does, so they add nothing to what determines the result. ``provenance`` (where the
        weights of pretrained models come from, when any) is stored for the protocol line and
        not hashed either: the model specs already determine it.
        """
        base = self.student_training(plugins)
        refs = [self.task, self.pair.teacher, self.pair.student] + [s.ref for s in self.stages if s.ref]
        refs = [nested for ref in refs for nested in ref.refs()]  # with a compressor's distiller
        return {"kdbench": __version__, "experiment": self.experiment.name,
                "task": self.task.spec(), "teacher": self.pair.teacher.spec(),
                "student": self.pair.student.spec(), "recipe": self.recipe,
                "stages": [s.spec(base) for s in self.stages], "seed": self.seed,
                "teacher_key": self.teacher_job(plugins).teacher_key,
                "measure": measure_spec(self.experiment.measure),
                "plugins": {r.plugin: r.version for r in refs},
                "budget": training_spec(base, judging=False), "task_plugin": self.task.plugin,
                # Only when set: the cache's tail approximation changes what distillers see.
                **({"teacher_cache": dataclasses.asdict(self.experiment.teacher_cache)}
                   if self.experiment.teacher_cache else {}),
                # Only when declared: recipes of the list form keep their ids.
                **({"report": self.experiment.reports[self.recipe]}
                   if self.recipe in self.experiment.reports else {}),
                # A derived equal-budget control says so, for the tables that label it.
                **({"control_for": list(self.experiment.derived_controls[self.recipe])}
                   if self.recipe in self.experiment.derived_controls else {}),
                **({"provenance": provenance} if (provenance := self.provenance(plugins)) else {})}

    def provenance(self, plugins: Plugins) -> dict[str, str]:
        """Where the teacher's and the student's weights come from, by role, for models built
        from released files (``ModelFamily.provenance``); an ``init: teacher`` student is the
        teacher's copy."""
        teacher = model_provenance(plugins, self.pair.teacher)
        student = teacher if self.stages[0].op == "init" else model_provenance(plugins, self.pair.student)
        return {role: text for role, text in (("teacher", teacher), ("student", student)) if text}

    def student_training(self, plugins: Plugins) -> Training:
        """The base of the student's training stages: task budget < file < this pair."""
        return base_training(self.task, plugins, {**self.experiment.training, **self.pair.student_training})

    def cell_id(self, plugins: Plugins) -> str:
        if plugins not in self._ids:
            config = self.config(plugins)
            for key in UNHASHED:
                config.pop(key, None)  # provenance, control_for: only where a cell has one
            self._ids[plugins] = digest(config)
        return self._ids[plugins]

    def labels(self) -> dict[str, Any]:
        return {"task": self.task.label(), "teacher": self.pair.teacher.label(),
                "student": self.pair.student.label(), "recipe": self.recipe, "seed": self.seed}


# ---------------------------------------------------------------------- parsing
def embedded_experiments() -> dict[str, str]:
    """Experiment files shipped with kdbench, by name (file name without ``.yaml``)."""
    folder = resources.files("kdbench").joinpath("experiments")
    return {f.name.removesuffix(".yaml"): f.read_text() for f in folder.iterdir()
            if f.name.endswith(".yaml")}


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """Apply ``dotted.path=YAML`` settings (``--set training.epochs=1``) to the raw file.

    Numbers in the path index lists (``pairs.0.student.hidden=[8]``). The result is validated
    like any file, so an override cannot smuggle in an unknown key.
    """
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set expects PATH=VALUE (e.g. training.epochs=1), got {item!r}")
        try:
            value = yamlfile.load(text)
        except yamlfile.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        node: Any = raw
        keys = path.split(".")
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            where = ".".join(keys[:i + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set: '{key}' is not an index of the list at {where}"
                                      f" (it has {len(node)} items)")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set: {'.'.join(keys[:i])} is not a mapping or a list")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict):
                    node = node.setdefault(key, {})
                else:
                    node = node[key]
    return raw


def load_experiment(path: str | Path | None, plugins: Plugins, overrides: list[str] = ()) -> Experiment:
    """Read and validate an experiment: a YAML path, an embedded name, or ``None`` (quickstart)."""
    embedded = embedded_experiments()
    name = DEFAULT_EXPERIMENT.removesuffix(".yaml") if path is None else str(path)
    if path is not None and Path(path).is_file():
        text, source = Path(path).read_text(), str(path)
    elif name in embedded:
        text, source = embedded[name], f"<embedded {name}.yaml>"
    else:
        raise ConfigError(f"experiment file not found: {path}; pass the path to a YAML file or "
                          f"the name of an embedded experiment{did_you_mean(name, embedded)} "
                          f"(embedded: {', '.join(sorted(embedded))})")
    try:
        raw = yamlfile.load(text)
    except yamlfile.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    try:
        return parse_experiment(apply_overrides(raw, list(overrides)), plugins, source)
    except ConfigError as exc:
        raise exc.located(source) from None


def parse_experiment(raw: Any, plugins: Plugins, source: str = "<experiment>") -> Experiment:
    if not isinstance(raw, Mapping):
        raise ConfigError("an experiment file must be a mapping with at least 'name', 'tasks', "
                          "'pairs' and 'recipes'")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(unknown("key", key, TOP_LEVEL_KEYS), str(key))
    for key in ("name", "tasks", "pairs", "recipes"):
        if key not in raw:
            raise ConfigError(f"missing required key '{key}'", key)
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("'name' must be a non-empty string; it names the outputs", "name")

    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"'seeds' must be a non-empty list of integers, got {seeds!r}", "seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"'seeds' has duplicates: {seeds}", "seeds")

    tasks = tuple(parse_ref(plugins, "task", r, f"tasks[{i}]")
                  for i, r in enumerate(_list(raw["tasks"], "tasks")))
    pairs = tuple(parse_pair(plugins, p, f"pairs[{i}]")
                  for i, p in enumerate(_list(raw["pairs"], "pairs")))
    check_compatibility(tasks, pairs, plugins)  # an mlp on token ids fails here, not in a run
    recipes_raw = raw["recipes"]
    if not isinstance(recipes_raw, Mapping) or not recipes_raw:
        raise ConfigError("'recipes' must map recipe names to lists of stages", "recipes")
    forms = {str(rname): recipe_form(value, f"recipes.{rname}") for rname, value in recipes_raw.items()}
    recipes = {rname: parse_recipe(plugins, stages, f"recipes.{rname}" + (".stages" if mapped else ""))
               for rname, (stages, _, mapped) in forms.items()}

    training = _mapping(raw.get("training") or {}, "training")
    parse_params(Training, training, "training")  # checks keys and types now, before any work
    for i, pair in enumerate(pairs):
        parse_params(Training, {**training, **pair.teacher_training}, f"pairs[{i}].teacher_training")
        parse_params(Training, {**training, **pair.student_training}, f"pairs[{i}].student_training")
    measure = parse_params(Measure, _mapping(raw.get("measure") or {}, "measure"), "measure")
    executor = parse_ref(plugins, "executor", raw["executor"], "executor") if raw.get("executor") else None
    cache = raw.get("teacher_cache")
    teacher_cache = (parse_params(TeacherCache, _mapping(cache, "teacher_cache"), "teacher_cache")
                     if cache is not None else None)
    reports = {rname: report for rname, (_, report, _) in forms.items() if report is not None}
    for rname, report in reports.items():
        check_main_figure(report, measure, f"recipes.{rname}.report")
    recipes, derived = with_controls(raw.get("controls"), recipes, plugins)
    return Experiment(name.strip(), tuple(seeds), tasks, pairs, recipes, training, measure,
                      executor, source, teacher_cache, reports=reports, derived_controls=derived)


def with_controls(raw: Any, recipes: dict[str, tuple[Stage, ...]], plugins: Plugins
                  ) -> tuple[dict[str, tuple[Stage, ...]], dict[str, tuple[str, ...]]]:
    """The ``controls`` key applied: with ``auto``, the recipes plus the derived equal-budget
    controls and the compounds each serves (see ``kdbench/recipes.py``)."""
    from . import recipes as relations  # it builds on this module's Stage

    if relations.parse_controls(raw) != "auto":
        return recipes, {}
    return relations.derive_controls(recipes, plugins)


def parse_ref(plugins: Plugins, kind: str, raw: Any, where: str,
              params: Mapping[str, Any] | None = None, params_where: str = "") -> Ref:
    """``name`` or ``{name: ..., <params>}`` -> a Ref with validated parameters. ``params``:
    parameters given beside a bare name, at ``params_where`` (``distill: hinton,
    distill_params: {...}`` in a compressor's parameters). Parameters that are references
    themselves are resolved here, recursively, with the same checks."""
    if isinstance(raw, str):
        name, own, name_where = raw, {}, where
    elif isinstance(raw, Mapping):
        if "name" not in raw:
            raise ConfigError(f"a {kind} reference needs a 'name' (one of: "
                              f"{', '.join(plugins.names(kind))})", where)
        name, name_where = raw["name"], f"{where}.name"
        own = {k: v for k, v in raw.items() if k != "name"}
    else:
        raise ConfigError(f"a {kind} reference is a name or a mapping with 'name', got {raw!r}", where)
    if params is not None:
        if isinstance(raw, Mapping):
            raise ConfigError(f"the {kind}'s parameters are given twice, in {{name: ..., <params>}} "
                              "and beside it; keep one", params_where or where)
        if not isinstance(params, Mapping):
            raise ConfigError(f"expected a mapping of the {kind}'s parameters, got {params!r}",
                              params_where or where)
        own, where = dict(params), params_where or where
    entry = plugins.get(kind, str(name), name_where)
    parsed = parse_params(entry.cls.Params, own, where, resolve=functools.partial(parse_ref, plugins))
    return Ref(kind, entry.name, parsed, entry.plugin, entry.version, entry.cls.label_for(parsed),
               str(getattr(entry.cls, "version", "1")) if kind == "task" else "1")


def parse_pair(plugins: Plugins, raw: Any, where: str) -> Pair:
    raw = _mapping(raw, where)
    for key in raw:
        if key not in PAIR_KEYS:
            raise ConfigError(unknown("key", key, PAIR_KEYS), f"{where}.{key}")
    for key in ("teacher", "student"):
        if key not in raw:
            raise ConfigError(f"a pair needs a '{key}'", where)
    return Pair(parse_ref(plugins, "model", raw["teacher"], f"{where}.teacher"),
                parse_ref(plugins, "model", raw["student"], f"{where}.student"),
                _mapping(raw.get("teacher_training") or {}, f"{where}.teacher_training"),
                _mapping(raw.get("student_training") or {}, f"{where}.student_training"))


#: Keys of a recipe written as a mapping: ``{stages: [...], report: probe_accuracy}``.
RECIPE_KEYS = ("stages", "report")
#: Figures a recipe may declare as its main one, and the measure setting each needs.
MAIN_FIGURES = {"probe_accuracy": "probe", "teacher_cka": "probe", "teacher_cosine": "probe",
                "teacher_agreement": None, "teacher_kl": None}


def recipe_form(raw: Any, where: str) -> tuple[Any, str | None, bool]:
    """A recipe's stages, its declared main figure and whether it was written as a mapping:
    a list of stages, or ``{stages: [...], report: FIGURE}`` for a recipe whose task metric
    does not apply (an untrained head) and is read by another figure."""
    if not isinstance(raw, Mapping):
        return raw, None, False
    for key in raw:
        if key not in RECIPE_KEYS:
            raise ConfigError(unknown("recipe key", key, RECIPE_KEYS), f"{where}.{key}")
    if "stages" not in raw:
        raise ConfigError("a recipe written as a mapping needs 'stages' (its list of stages), "
                          "e.g. {stages: [train], report: probe_accuracy}", where)
    report = raw.get("report")
    if report is not None and not isinstance(report, str):
        raise ConfigError(f"'report' names one figure ({', '.join(MAIN_FIGURES)}), got {report!r}",
                          f"{where}.report")
    return raw["stages"], report, True


def check_main_figure(figure: str, measure: Measure, where: str) -> None:
    """A declared main figure must be one the cells measure."""
    if figure not in MAIN_FIGURES:
        raise ConfigError(unknown("main figure", figure, MAIN_FIGURES), where)
    needs = MAIN_FIGURES[figure]
    if needs and not getattr(measure, needs):
        raise ConfigError(f"'{figure}' is measured only with measure: {{{needs}: true}}; set it, "
                          "or declare another figure", where)


def parse_recipe(plugins: Plugins, raw: Any, where: str) -> tuple[Stage, ...]:
    stages = tuple(parse_stage(plugins, s, f"{where}[{i}]") for i, s in enumerate(_list(raw, where)))
    first = stages[0]
    if first.op not in ("init", "train", "distill"):
        raise ConfigError(f"a recipe must start with 'train', 'distill' or 'init: teacher', "
                          f"not '{first.op}' (the student would be untrained)", f"{where}[0]")
    frozen_by = None
    for i, stage in enumerate(stages):
        if stage.op == "init" and i > 0:
            raise ConfigError("'init' can only be the first stage", f"{where}[{i}]")
        if stage.op in TRAINING_OPS and frozen_by is not None:
            raise ConfigError(f"'{stage.op}' cannot follow '{frozen_by}': the {frozen_by} result "
                              "cannot be trained; move it to the end of the recipe", f"{where}[{i}]")
        if stage.ref is not None and stage.op in COMPRESSOR_KIND:
            if not plugins.get(stage.ref.kind, stage.ref.name).cls.trainable_after:
                frozen_by = f"{stage.op}: {stage.ref.name}"
    return stages


def parse_stage(plugins: Plugins, raw: Any, where: str) -> Stage:
    if isinstance(raw, str):
        op, value = raw, None
    elif isinstance(raw, Mapping) and len(raw) == 1:
        op, value = next(iter(raw.items()))
    else:
        raise ConfigError(f"a stage is a name ('train') or a mapping with one key, e.g. "
                          f"{{distill: hinton}}; got {raw!r}", where)
    if op not in STAGE_OPS:
        raise ConfigError(unknown("stage", op, STAGE_OPS), where)
    at = f"{where}.{op}" if isinstance(raw, Mapping) else where
    if op == "init":
        if value != "teacher":
            raise ConfigError(f"'init' takes only 'teacher', got {value!r}", at)
        return Stage("init", source="teacher")
    if op == "train":
        overrides = _mapping(value or {}, at)
        parse_params(Training, overrides, at)
        return Stage("train", training=overrides)
    if op == "distill":
        if value is None:
            raise ConfigError(f"'distill' needs a distiller (one of: {', '.join(plugins.names('distiller'))})", at)
        return Stage("distill", parse_ref(plugins, "distiller", value, at))
    if op == "finetune":
        overrides = dict(_mapping(value or {}, at))
        distiller = overrides.pop("distill", None)
        parse_params(Training, overrides, at)
        ref = parse_ref(plugins, "distiller", distiller, f"{at}.distill") if distiller else None
        return Stage("finetune", ref, overrides)
    if value is None:
        kind = COMPRESSOR_KIND[op]
        raise ConfigError(f"'{op}' needs a {kind} (one of: {', '.join(plugins.names(kind))})", at)
    return Stage(op, parse_ref(plugins, COMPRESSOR_KIND[op], value, at))


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"expected a non-empty list, got {value!r}", where)
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {value!r}", where)
    return dict(value)
