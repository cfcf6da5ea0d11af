"""``kdbench new-plugin NAME --kind KIND``: a plugin package that works as generated.

The package has a ``pyproject.toml`` that registers the module under the entry-point group
``kdbench``, the module (a small but real method of its kind, to be replaced by the author's),
a test that runs kdbench's conformance check for the kind (``kdbench.testing``) and a README
with the next steps. Generated files pass their own tests before anything is edited.
"""

from __future__ import annotations

import keyword
import re
import textwrap
from pathlib import Path

from .errors import KdbenchError

KIND_NAMES = ("task", "model", "distiller", "pruner", "quantizer", "decomposer", "executor")
HOOK = {"task": "tasks", "model": "models", "distiller": "distillers", "pruner": "pruners",
        "quantizer": "quantizers", "decomposer": "decomposers", "executor": "executors"}

MODULES = {
    "distiller": '''
        """Distiller ``{name}``: soft targets at temperature T plus cross-entropy.

        Replace the loss with your method and cite its paper here and in ``paper``. As
        generated it is the loss of Hinton, Vinyals and Dean, "Distilling the Knowledge in a
        Neural Network", arXiv:1503.02531, 2015: ``alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE``.
        """

        from __future__ import annotations

        import dataclasses

        import torch.nn.functional as F

        from kdbench import hookimpl
        from kdbench.contracts import Distiller


        class {cls}(Distiller):
            name = "{name}"
            description = "soft targets at temperature T plus cross-entropy (edit: your method)"
            category = "response"  # response | feature | relation
            paper = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015"

            @dataclasses.dataclass(frozen=True)
            class Params:
                temperature: float = 4.0
                alpha: float = 0.9  # weight of the soft term; 1 - alpha goes to cross-entropy

                def __post_init__(self):
                    if self.temperature <= 0:
                        raise ValueError(f"temperature must be positive, got {{self.temperature}}")
                    if not 0 <= self.alpha <= 1:
                        raise ValueError(f"alpha must be in [0, 1], got {{self.alpha}}")

            def loss(self, student, teacher, targets):
                t, alpha = self.params.temperature, self.params.alpha
                soft = F.kl_div(F.log_softmax(student.logits / t, -1), F.log_softmax(teacher.logits / t, -1),
                                log_target=True, reduction="batchmean") * t * t
                hard = F.cross_entropy(student.logits, targets, ignore_index=-100)
                return {{"kd": alpha * soft, "ce": (1 - alpha) * hard}}


        @hookimpl
        def kdbench_register_distillers(register):
            register({cls})
        ''',
    "pruner": '''
        """Pruner ``{name}``: unstructured magnitude pruning of Linear layers, layer by layer.

        Replace it with your method and cite its paper. As generated: Han, Pool, Tran, Dally,
        "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS 2015.
        Masks go through ``torch.nn.utils.prune`` so that zeros stay zero in fine-tuning.
        """

        from __future__ import annotations

        import dataclasses

        from torch import nn
        from torch.nn.utils import prune

        from kdbench import hookimpl
        from kdbench.contracts import Pruner


        class {cls}(Pruner):
            name = "{name}"
            description = "per-layer magnitude pruning of Linear weights (edit: your method)"
            materialized = False  # zeros in dense tensors: the file and the speed do not change

            @dataclasses.dataclass(frozen=True)
            class Params:
                sparsity: float = 0.5

                def __post_init__(self):
                    if not 0 <= self.sparsity < 1:
                        raise ValueError(f"sparsity must be in [0, 1), got {{self.sparsity}}")

            def apply(self, model, context):
                layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
                if not layers:
                    raise ValueError("{name} prunes Linear layers; the model has none")
                for layer in layers:
                    prune.l1_unstructured(layer, "weight", amount=self.params.sparsity)
                return model


        @hookimpl
        def kdbench_register_pruners(register):
            register({cls})
        ''',
    "quantizer": '''
        """Quantizer ``{name}``: Linear weights stored in float16, computed in float32.

        Replace it with your method and cite its paper. As generated it halves the bytes of
        every Linear weight (``materialized``: the saved state dict really is smaller).
        """

        from __future__ import annotations

        import torch
        import torch.nn.functional as F
        from torch import nn

        from kdbench import hookimpl
        from kdbench.contracts import Quantizer


        class HalfLinear(nn.Module):
            def __init__(self, linear: nn.Linear):
                super().__init__()
                self.register_buffer("weight", linear.weight.detach().half())
                self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().half())

            def forward(self, x):
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x, self.weight.float(), bias)


        def swap(module: nn.Module) -> None:
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, HalfLinear(child))
                else:
                    swap(child)


        class {cls}(Quantizer):
            name = "{name}"
            description = "Linear weights stored in float16 (edit: your method)"
            materialized = True
            trainable_after = False

            def apply(self, model, context):
                with torch.no_grad():
                    swap(model)
                return model


        @hookimpl
        def kdbench_register_quantizers(register):
            register({cls})
        ''',
    "decomposer": '''
        """Decomposer ``{name}``: truncated SVD of every Linear layer.

        Replace it with your method and cite its paper. As generated: ``W ~ U_r S_r V_r^T``, a
        Linear of rank r followed by another (Denton et al., "Exploiting Linear Structure Within
        Convolutional Networks for Efficient Evaluation", NeurIPS 2014), where it saves
        parameters.
        """

        from __future__ import annotations

        import dataclasses

        import torch
        from torch import nn

        from kdbench import hookimpl
        from kdbench.contracts import Decomposer


        def factorize(linear: nn.Linear, ratio: float) -> nn.Module:
            out_f, in_f = linear.weight.shape
            rank = max(1, int(ratio * min(out_f, in_f)))
            if rank * (out_f + in_f) >= out_f * in_f:
                return linear  # no saving at this rank: keep the layer
            u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
            first, second = nn.Linear(in_f, rank, bias=False), nn.Linear(rank, out_f, bias=linear.bias is not None)
            first.weight.copy_(s[:rank, None].sqrt() * vh[:rank])
            second.weight.copy_(u[:, :rank] * s[:rank].sqrt())
            if linear.bias is not None:
                second.bias.copy_(linear.bias.detach())
            return nn.Sequential(first, second)


        class {cls}(Decomposer):
            name = "{name}"
            description = "truncated SVD of Linear layers (edit: your method)"
            materialized = True

            @dataclasses.dataclass(frozen=True)
            class Params:
                rank_ratio: float = 0.5  # kept rank over the layer's full rank

                def __post_init__(self):
                    if not 0 < self.rank_ratio <= 1:
                        raise ValueError(f"rank_ratio must be in (0, 1], got {{self.rank_ratio}}")

            def apply(self, model, context):
                with torch.no_grad():
                    self._swap(model)
                return model

            def _swap(self, module):
                for name, child in module.named_children():
                    if isinstance(child, nn.Linear):
                        setattr(module, name, factorize(child, self.params.rank_ratio))
                    else:
                        self._swap(child)


        @hookimpl
        def kdbench_register_decomposers(register):
            register({cls})
        ''',
    "task": '''
        """Task ``{name}``: a seeded synthetic classification problem (scikit-learn).

        Replace it with your dataset: load from files a package ships, data you generate, or a
        path the user gives; never download. Splits must be fixed and disjoint.
        """

        from __future__ import annotations

        import dataclasses

        import torch
        from sklearn.datasets import make_classification
        from torch.utils.data import TensorDataset

        from kdbench import hookimpl
        from kdbench.contracts import Task, TaskData


        class {cls}(Task):
            name = "{name}"
            description = "a seeded synthetic 10-class problem with 32 features (edit: your data)"
            metric = "accuracy"
            version = "1"  # bump whenever the data or the splits change
            # What load() gives, so that experiments pairing it with a model family that cannot
            # take it are refused when parsed: inputs "features" | "signals" | "images" | "tokens",
            # targets "labels" (one per example) | "positions" (one per position).
            inputs = "features"
            targets = "labels"
            default_training = {{"epochs": 10, "batch_size": 64, "lr": 0.01}}

            @dataclasses.dataclass(frozen=True)
            class Params:
                examples: int = 2000
                seed: int = 0  # the data's seed, fixed across run seeds

                def __post_init__(self):
                    if self.examples < 100:
                        raise ValueError(f"examples must be at least 100, got {{self.examples}}")

            def load(self):
                p = self.params
                x, y = make_classification(n_samples=p.examples, n_features=32, n_informative=16,
                                           n_classes=10, random_state=p.seed)
                x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
                x = (x - x.mean(0)) / x.std(0)
                a, b = int(0.7 * len(x)), int(0.85 * len(x))  # make_classification shuffles already
                parts = [TensorDataset(x[i:j], y[i:j]) for i, j in ((0, a), (a, b), (b, len(x)))]
                return TaskData(*parts, input_shape=(32,), num_classes=10)


        @hookimpl
        def kdbench_register_tasks(register):
            register({cls})
        ''',
    "model": '''
        """Model family ``{name}``: a multilayer perceptron sized from the task.

        Replace it with your architecture. ``feature_points`` names the modules whose outputs
        feature-based distillers may read, shallow to deep.
        """

        from __future__ import annotations

        import dataclasses
        import math

        from torch import nn

        from kdbench import hookimpl
        from kdbench.contracts import ModelFamily


        class {cls}(ModelFamily):
            name = "{name}"
            description = "an MLP with ReLU hidden layers (edit: your architecture)"
            # The task inputs build() serves and the targets its logits predict; experiments
            # pairing it with other tasks are refused when parsed (see kdbench list task).
            inputs = ("features", "signals", "images")  # flattened
            targets = ("labels",)

            @dataclasses.dataclass(frozen=True)
            class Params:
                hidden: tuple[int, ...] = (64,)

                def __post_init__(self):
                    if any(h < 1 for h in self.hidden):
                        raise ValueError(f"hidden widths must be positive, got {{self.hidden}}")

            def build(self, data):
                layers, width = [nn.Flatten()], math.prod(data.input_shape)
                for h in self.params.hidden:
                    layers += [nn.Linear(width, h), nn.ReLU()]
                    width = h
                layers.append(nn.Linear(width, data.num_classes))
                return nn.Sequential(*layers)

            def feature_points(self, model):
                return [str(i) for i, m in enumerate(model) if isinstance(m, nn.ReLU)]


        @hookimpl
        def kdbench_register_models(register):
            register({cls})
        ''',
    "executor": '''
        """Executor ``{name}``: runs jobs in a pool of threads of this process.

        Replace it with your scheduler. The contract: take a job from ``jobs`` only when a
        worker is free (the runner claims each cell as it is taken), yield ``(job, fn(job))``
        as each finishes, and report a job whose worker died through ``lost``.
        """

        from __future__ import annotations

        import concurrent.futures as cf
        import dataclasses

        from kdbench import hookimpl
        from kdbench.contracts import Executor


        class {cls}(Executor):
            name = "{name}"
            description = "a pool of threads in this process (edit: your scheduler)"

            @dataclasses.dataclass(frozen=True)
            class Params:
                workers: int = 2

                def __post_init__(self):
                    if self.workers < 1:
                        raise ValueError(f"workers must be at least 1, got {{self.workers}}")

            def start(self):
                self._pool = cf.ThreadPoolExecutor(self.params.workers)

            def close(self):
                pool, self._pool = getattr(self, "_pool", None), None
                if pool is not None:
                    pool.shutdown(wait=True)

            def map(self, fn, jobs, lost):
                jobs, running = iter(jobs), {{}}
                while True:
                    while len(running) < self.params.workers:
                        job = next(jobs, None)
                        if job is None:
                            break
                        running[self._pool.submit(fn, job)] = job
                    if not running:
                        return
                    done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        yield running.pop(future), future.result()


        @hookimpl
        def kdbench_register_executors(register):
            register({cls})
        ''',
}

TEST = '''
    """{name}: the conformance checks kdbench's own {kind}s pass, and its registration."""

    from kdbench.testing import check_{kind}

    import {module} as plugin
    from {module} import {cls}


    def test_{func}_passes_the_{kind}_checks():
        check_{kind}({cls})


    def test_{func}_registers_under_its_name(kdbench_registry, kdbench_register):
        if "{dist}" not in kdbench_registry.versions:  # not installed (pip install -e .) yet
            kdbench_register(plugin, "{dist}")
        assert kdbench_registry.get("{kind}", "{name}").cls.__name__ == "{cls}"
    '''

PYPROJECT = '''
    [build-system]
    requires = ["setuptools>=68"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{dist}"
    version = "0.1.0"
    description = "A kdbench {kind}: {name}"
    requires-python = ">=3.10"
    dependencies = ["kdbench"]

    [project.optional-dependencies]
    test = ["pytest>=7.4"]

    # kdbench finds the plugin through this entry-point group: the key is the plugin's name
    # in `kdbench plugins`, the value the module with the hook implementations.
    [project.entry-points.kdbench]
    {dist} = "{module}"

    [tool.setuptools]
    packages = ["{module}"]
    '''

README = '''
    # {dist}

    A kdbench {kind}, `{name}`, generated by `kdbench new-plugin {name} --kind {kind}`.

    ```bash
    pip install -e .            # registers the plugin (entry-point group "kdbench")
    python -m pytest tests      # kdbench's conformance checks for a {kind}
    kdbench plugins             # lists {dist} and what it registers
    kdbench list {kind}          # shows {name} with its parameters
    ```

    Then replace the method in `{module}/__init__.py` with yours (cite its paper in the
    docstring{paper_hint}), keep the tests passing, and use it in an experiment file like any
    built-in. CONTRIBUTING.md of kdbench explains the contracts and how to submit a
    leaderboard result.
    '''


def snake(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def camel(name: str) -> str:
    return "".join(part.capitalize() for part in snake(name).split("_"))


def new_plugin(name: str, kind: str, output: Path) -> Path:
    """Write the package for plugin ``name`` of ``kind`` into ``output/kdbench-<name>``."""
    if kind not in KIND_NAMES:
        raise KdbenchError(f"--kind {kind}: not a kind of plugin; use one of {', '.join(KIND_NAMES)}")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name) or keyword.iskeyword(snake(name)):
        raise KdbenchError(f"plugin name {name!r}: use lower-case letters, digits and '-', starting "
                           "with a letter (it is how experiment files will name it), e.g. my-kd")
    from .plugins import get_plugins

    existing = get_plugins().entries.get(kind, {})
    if name in existing:
        raise KdbenchError(f"a {kind} named '{name}' is already registered by plugin "
                           f"'{existing[name].plugin}'; choose another name")
    dist, module = f"kdbench-{name}", f"kdbench_{snake(name)}"
    root = output / dist
    if root.exists():
        raise KdbenchError(f"{root} already exists; remove it or choose another --output")
    fields = {"name": name, "kind": kind, "cls": camel(name) + ("" if kind == "task" else camel(kind)),
              "module": module, "dist": dist, "func": snake(name),
              "paper_hint": " and in `paper`" if kind == "distiller" else ""}
    files = {root / "pyproject.toml": PYPROJECT, root / "README.md": README,
             root / module / "__init__.py": MODULES[kind],
             root / "tests" / f"test_{snake(name)}.py": TEST}
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(template).lstrip().format(**fields))
    return root
