"""Task ``mnist1d``: MNIST-1D, generated locally from its templates (no download).

Source: Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D" (ICML 2024,
arXiv:2011.14439), via the ``mnist1d`` package (Greydanus and Steinbach; Apache-2.0). The data
is generated here by its ``make_dataset`` with its default arguments (``get_dataset_args``:
5,000 signals of length 40, generator seed 42, the package's own 80/20 train/test cut) and
never fetched by its downloading loader. ``num_samples`` and ``data_seed`` change the
generated set.
Splits: the package's 1,000 test signals are the test split. Validation (``val_size``
signals, stratified, seeded by ``split_seed``) is held out of its 4,000 training signals
(``val_source: train``, the default), or drawn from a second set the generator makes with
seed ``data_seed + 1`` (``val_source: generated``), which leaves all 4,000 for training.
Inputs ``(40,)`` as generated (the package centers and scales them to unit variance).

The paper's protocol (its code, github.com/greydanus/mnist1d, notebooks/train.py and
notebooks/mnist1d-classification.ipynb): all 4,000 training signals, no validation split,
Adam at lr 0.01 without weight decay, batch 100, 6,000 steps (150 epochs), the model after
the last step tested on the 1,000 test signals; logistic regression 32 %, a 100-100 MLP with
a residual second layer 68 %, a 3-layer strided CNN of 25 channels 94 %, a bidirectional GRU
of 6 units 91 % (README table). ``kdbench/experiments/mnist1d-paper.yaml`` reproduces that
protocol and shows its numbers next to the paper's; its header lists every difference.

The pair of ``kdbench/experiments/mnist1d.yaml`` is a distillation benchmark, not the paper's
setup: teacher ``cnn(channels=[32, 64, 128], kernel_size=5, hidden=128)`` (135k parameters)
and student ``mlp(hidden=[100, 100])`` (15k, no residual layer), trained on 3,500 signals
(500 held out for validation) with a cosine schedule; its numbers are not comparable with
the paper's. Measured with ``--threads 1`` at 40 epochs of Adam at 3e-3 (the file now trains
120), batch 64, seeds 0-2, test accuracy: teacher 97.60 +- 0.79 %, student from scratch
60.60 +- 0.82 %, student with Hinton KD (T=4, alpha=0.9) 60.53 +- 0.59 %. Wall time
2 min 16 s for the 3 seeds (about 45 s a seed: teacher training 30 s, scratch 3 s, KD 9 s,
plus measurement) on a shared 2-core AMD EPYC, torch 2.13 CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import random
from typing import ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdbench import hookimpl
from kdbench.contracts import Task, TaskData


def require(module: str, package: str, task: str):
    """Import an optional dependency or say exactly what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"task '{task}' needs the package '{package}', which is not installed: "
                          f"pip install {package}  (or pip install \"kdbench[tasks]\")") from exc


@functools.lru_cache(maxsize=4)
def generate(num_samples: int, data_seed: int) -> dict[str, np.ndarray]:
    """The package's generator with its defaults; cached because it takes seconds."""
    package = importlib.import_module("mnist1d.data")
    args = package.get_dataset_args()
    args.num_samples, args.seed = num_samples, data_seed
    # make_dataset reseeds the global numpy and random generators; give them back untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = package.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    out = {key: np.asarray(raw[key], dtype=np.float32 if key.startswith("x") else np.int64)
           for key in ("x", "y", "x_test", "y_test")}
    for array in out.values():
        array.flags.writeable = False
    return out


class MNIST1D(Task):
    name = "mnist1d"
    description = "MNIST-1D (Greydanus 2020): 1-D signals of length 40, 10 classes; generated offline"
    version = "1"
    metric = "accuracy"
    inputs = "signals"  # 40 samples of a 1-D signal
    targets = "labels"
    default_training = {"epochs": 40, "batch_size": 64, "optimizer": "adam", "lr": 3e-3,
                        "schedule": "cosine"}

    @dataclasses.dataclass(frozen=True)
    class Params:
        num_samples: int = 5000  # generated in total; 80% train(+val), 20% test
        data_seed: int = 42  # the generator's seed; 42 is the package's default
        split_seed: int = 0  # train/val split, fixed across run seeds
        val_size: int = 500
        # Where the validation signals come from: held out of the 4,000 training signals
        # ("train"), or drawn from a second set the generator makes with seed data_seed + 1
        # ("generated"), so that training keeps all 4,000 signals as in the paper.
        val_source: Literal["train", "generated"] = "train"

        ADDED_LATER: ClassVar[tuple[str, ...]] = ("val_source",)  # see Ref.spec

        def __post_init__(self):
            if self.num_samples < 100:
                raise ValueError(f"num_samples must be at least 100, got {self.num_samples}")
            train = int(10 * (self.num_samples // 10) * 0.8)
            if not 10 <= self.val_size <= train - 10:
                raise ValueError(f"val_size must be between 10 (one per class) and {train - 10} "
                                 f"(the {train} training signals minus 10), got {self.val_size}")

    def load(self) -> TaskData:
        require("mnist1d.data", "mnist1d", self.name)
        from sklearn.model_selection import train_test_split  # here: it costs a second to import

        p = self.params
        raw = generate(p.num_samples, p.data_seed)
        x, y = raw["x"], raw["y"]

        def split(a, b):
            return TensorDataset(torch.tensor(a), torch.tensor(b))

        test = split(raw["x_test"], raw["y_test"])
        if p.val_source == "generated":
            # An independent draw of the same generator: its training part, never its test.
            extra = generate(p.num_samples, p.data_seed + 1)
            _, val = train_test_split(np.arange(len(extra["y"])), test_size=p.val_size,
                                      stratify=extra["y"], random_state=p.split_seed)
            return TaskData(train=split(x, y), val=split(extra["x"][val], extra["y"][val]),
                            test=test, input_shape=(40,), num_classes=10)
        train, val = train_test_split(np.arange(len(y)), test_size=p.val_size, stratify=y,
                                      random_state=p.split_seed)
        return TaskData(train=split(x[train], y[train]), val=split(x[val], y[val]),
                        test=test, input_shape=(40,), num_classes=10)


@hookimpl
def kdbench_register_tasks(register):
    register(MNIST1D)
