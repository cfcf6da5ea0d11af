"""Tasks ``cifar10`` and ``cifar100``: CIFAR from a directory the user provides (never downloaded).

Source: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009),
https://www.cs.toronto.edu/~kriz/cifar.html. The datasets carry no explicit licence; their
page asks users to cite the report. kdbench ships no CIFAR data: download the "CIFAR python
version" archives (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``) from that page,
extract them into one directory and name it with the task parameter ``root`` or the
environment variable ``KDBENCH_DATA_DIR``. The files are Python pickles: point kdbench only at
files you trust.

Layout read: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``; ``data`` is uint8 ``N x 3072`` (1024 red, 1024
green, 1024 blue values, rows of 32 pixels), labels are ``labels`` / ``fine_labels``.
Splits: ``val_size`` images held out of the official training set (stratified, seeded by
``split_seed``) for validation; the official test set is the test split. Inputs
``(3, 32, 32)`` normalized with the standard per-channel mean and std of the training set.
Training batches are augmented the standard way: a random 32x32 crop of the image padded by 4
black pixels, then a horizontal flip with probability 0.5.
The default budget is the CIFAR-100 protocol of Tian, Krishnan and Isola, "Contrastive
Representation Distillation" (ICLR 2020): SGD 0.05, momentum 0.9, weight decay 5e-4, batch 64,
240 epochs, lr x0.1 at 150, 180 and 210.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdbench import hookimpl
from kdbench.contracts import Task, TaskData

DATA_ENV = "KDBENCH_DATA_DIR"
HOME_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant's official files live and what their keys are."""

    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


CIFAR10_FILES = Layout("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                 "labels", "label_names", 10,
                 (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_FILES = Layout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                  ("train",), "test", "meta", "fine_labels", "fine_label_names", 100,
                  (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def locate(layout: Layout, root: str, task: str) -> Path:
    """The folder holding the variant's files, or an error that says how to provide them."""
    how = (f"Download {layout.archive} (\"CIFAR python version\") from {HOME_PAGE}, extract it "
           f"so that {layout.folder}/ sits inside a data directory, and point kdbench at that "
           f"directory with the task parameter root (tasks: [{{name: {task}, root: /path/to/data}}]) "
           f"or the environment variable {DATA_ENV}=/path/to/data. kdbench never downloads datasets.")
    base = root or os.environ.get(DATA_ENV, "")
    if not base:
        raise FileNotFoundError(f"task '{task}' reads {layout.title} from "
                                f"<data dir>/{layout.folder}/{layout.train_files[0]} and so on, "
                                f"but no data directory is set (root is empty and {DATA_ENV} is "
                                f"not set). {how}")
    base_path = Path(base).expanduser()
    # Also accept the extracted folder itself.
    folder = base_path if base_path.name == layout.folder else base_path / layout.folder
    missing = [name for name in layout.files if not (folder / name).is_file()]
    if missing:
        source = "the root parameter" if root else DATA_ENV
        detail = (f"the folder {folder} does not exist" if not folder.is_dir()
                  else f"missing in {folder}: {', '.join(missing)}")
        raise FileNotFoundError(f"task '{task}' expected the {layout.title} file {folder / missing[0]} "
                                f"(data directory {base_path}, from {source}), but {detail}. {how}")
    return folder


def read_pickle(path: Path) -> dict[str, Any]:
    """An official CIFAR pickle as a dict with str keys (they were written by Python 2)."""
    with open(path, "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a CIFAR python-version file (expected a pickled dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_batch(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    for key in ("data", layout.label_key):
        if key not in batch:
            raise ValueError(f"{path} has no '{key}' entry (keys: {sorted(batch)}); is it a "
                             f"{layout.title} python-version file?")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, got "
                         f"{data.dtype} {data.shape} and {len(labels)} labels")
    if labels.size and not (0 <= labels.min() and labels.max() < layout.num_classes):
        raise ValueError(f"{path}: labels must be in [0, {layout.num_classes}), got "
                         f"{labels.min()}..{labels.max()}")
    return data, labels


class PadCropFlip:
    """Random crop after padding with ``fill`` (black, normalized) and horizontal flip.

    Works on a normalized batch ``(B, C, H, W)``; all randomness comes from ``generator``:
    per image a vertical and a horizontal offset in ``[0, 2 * padding]`` and a flip bit.
    A class rather than a closure so that TaskData stays picklable.
    """

    def __init__(self, fill: tuple[float, ...], padding: int = 4, flip_p: float = 0.5):
        self.fill = tuple(fill)
        self.padding = padding
        self.flip_p = flip_p

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.padding
        draw = {"generator": generator, "device": generator.device}
        top = torch.randint(0, 2 * p + 1, (b,), **draw).to(x.device)
        left = torch.randint(0, 2 * p + 1, (b,), **draw).to(x.device)
        flip = (torch.rand(b, **draw) < self.flip_p).to(x.device)
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p:p + h, p:p + w] = x
        rows = top[:, None] + torch.arange(h, device=x.device)
        cols = left[:, None] + torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # reading the crop right to left
        batch = torch.arange(b, device=x.device)[:, None, None]
        # Gather every crop at once: (B, H, W, C), then back to channels first.
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


class CIFAR(Task):
    layout: ClassVar[Layout]
    version = "1"
    metric = "accuracy"
    inputs = "images"  # (3, 32, 32), normalized
    targets = "labels"
    default_training = {"epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                        "momentum": 0.9, "weight_decay": 5e-4, "schedule": "multistep",
                        "milestones": (150, 180, 210), "gamma": 0.1}

    @dataclasses.dataclass(frozen=True)
    class Params:
        root: str = ""  # the directory holding the extracted folder; empty: $KDBENCH_DATA_DIR
        split_seed: int = 0  # fixed across run seeds, so every seed sees the same splits
        val_size: int = 5000  # held out of the official training set

        def __post_init__(self):
            if self.val_size < 1:
                raise ValueError(f"val_size must be positive, got {self.val_size}")

    def check(self) -> None:
        locate(self.layout, self.params.root, self.name)

    def load(self) -> TaskData:
        layout, p = self.layout, self.params
        folder = locate(layout, p.root, self.name)
        names = read_pickle(folder / layout.meta_file).get(layout.names_key)
        if names is not None and len(names) != layout.num_classes:
            raise ValueError(f"{folder / layout.meta_file} lists {len(names)} classes, "
                             f"expected {layout.num_classes}")
        parts = [read_batch(folder / name, layout) for name in layout.train_files]
        x_all = np.concatenate([d for d, _ in parts])
        y_all = np.concatenate([labels for _, labels in parts])
        x_test, y_test = read_batch(folder / layout.test_file, layout)
        if not layout.num_classes <= p.val_size <= len(y_all) - layout.num_classes:
            raise ValueError(f"{self.name}: val_size must be between {layout.num_classes} (one "
                             f"per class) and {len(y_all) - layout.num_classes}, got {p.val_size}")
        from sklearn.model_selection import train_test_split  # here: it costs a second to import

        train, val = train_test_split(np.arange(len(y_all)), test_size=p.val_size, stratify=y_all,
                                      random_state=p.split_seed)
        mean = torch.tensor(layout.mean).view(1, 3, 1, 1)
        std = torch.tensor(layout.std).view(1, 3, 1, 1)

        def split(data: np.ndarray, labels: np.ndarray) -> TensorDataset:
            images = torch.from_numpy(data).reshape(-1, 3, 32, 32).float().div_(255)
            return TensorDataset(images.sub_(mean).div_(std), torch.from_numpy(labels))

        black = tuple((-m / s) for m, s in zip(layout.mean, layout.std))
        return TaskData(train=split(x_all[train], y_all[train]), val=split(x_all[val], y_all[val]),
                        test=split(x_test, y_test), input_shape=(3, 32, 32),
                        num_classes=layout.num_classes, train_transform=PadCropFlip(black))


class CIFAR10(CIFAR):
    name = "cifar10"
    description = "CIFAR-10 from a local copy (root or KDBENCH_DATA_DIR), 32x32 colour, 10 classes"
    layout = CIFAR10_FILES


class CIFAR100(CIFAR):
    name = "cifar100"
    description = "CIFAR-100 from a local copy (root or KDBENCH_DATA_DIR), 32x32 colour, 100 classes"
    layout = CIFAR100_FILES


@hookimpl
def kdbench_register_tasks(register):
    register(CIFAR10)
    register(CIFAR100)
