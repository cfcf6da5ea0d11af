"""Task ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download).

Source: the UCI ML hand-written digits test set (Alpaydin and Kaynak 1998) as shipped inside
scikit-learn (BSD-3-Clause); 1,797 images, 10 classes; stratified 60/20/20 split.

Measured with the embedded ``quickstart`` experiment (20 epochs of Adam, 3 seeds, 2 threads,
torch 2.13 CPU): teacher mlp(hidden=[512,512]) 96.94 +- 0.56 % test accuracy, student
mlp(hidden=[32]) from scratch 91.39 +- 0.56 % (a gap of about ten seed standard deviations);
the whole 21-job grid takes about 20 s. Students land within a point of each other, which is
why this is the smoke task, not a benchmark.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import TensorDataset

from kdbench import hookimpl
from kdbench.contracts import Task, TaskData


class Digits(Task):
    name = "digits"
    description = "scikit-learn's 8x8 handwritten digits, 10 classes; the fast smoke task"
    version = "1"
    metric = "accuracy"
    inputs = "features"  # 64 pixel intensities, a flat vector
    targets = "labels"
    default_training = {"epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 1e-3}

    @dataclasses.dataclass(frozen=True)
    class Params:
        split_seed: int = 0  # fixed across run seeds, so every seed sees the same test set
        val_fraction: float = 0.2
        test_fraction: float = 0.2

        def __post_init__(self):
            if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                    and self.val_fraction + self.test_fraction < 1):
                raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")

    def load(self) -> TaskData:
        # Imported here: scikit-learn (with scipy and pandas) costs a second to import, and
        # most commands never load a task.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        p = self.params
        bunch = load_digits()
        x = (bunch.data / 16.0).astype("float32")  # pixel intensities 0..16 -> 0..1
        y = bunch.target
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=p.test_fraction, stratify=y, random_state=p.split_seed)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=p.val_fraction / (1 - p.test_fraction), stratify=y_rest,
            random_state=p.split_seed)

        def split(a, b):
            return TensorDataset(torch.from_numpy(a), torch.from_numpy(b).long())

        return TaskData(train=split(x_train, y_train), val=split(x_val, y_val),
                        test=split(x_test, y_test), input_shape=(64,), num_classes=10)


@hookimpl
def kdbench_register_tasks(register):
    register(Digits)
