"""Model families for token-sequence classification (e.g. ``bbc-news``): ``bow`` and
``text-transformer``.

Both take ``(B, L)`` token ids where id 0 is padding, read ``data.vocab_size`` and
``data.num_classes``, and return logits ``(B, classes)``. Padding never changes the output.

``bow``: a bag of embeddings (the averaged word embeddings of fastText, Joulin, Grave,
Bojanowski and Mikolov, "Bag of Tricks for Efficient Text Classification", EACL 2017): the
mean of the non-pad token embeddings (``nn.EmbeddingBag``, padding excluded), then an MLP.
With ``buckets > 0`` the word ids share that many embedding rows (the hashing trick of
Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009, with the
frequency rank as the hash: id ``i >= 2`` uses row ``2 + (i - 2) % (buckets - 2)``, so the
``buckets - 2`` most frequent words of a frequency-ordered vocabulary keep rows of their
own), which makes the embedding table, nearly all of the model, as small as wanted.

``text-transformer``: a small pre-LayerNorm transformer encoder (Vaswani et al., "Attention
Is All You Need", NeurIPS 2017; blocks as in ``gpt``) whose attention ignores padded keys,
followed by a final LayerNorm, the mean over non-pad positions and a linear head.
Its attention maps are tapped at ``blocks.<i>.attn.probs`` ``(B, heads, L, L)``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData
from kdbench_plugins.models.gpt import (Block, Blocks, check_token_task, check_transformer_params,
                                         init_transformer)

PAD = 0


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: tuple[int, ...], classes: int,
                 dropout: float, buckets: int = 0):
        super().__init__()
        self.buckets = buckets if 0 < buckets < vocab else 0
        self.embed = nn.EmbeddingBag(self.buckets or vocab, dim, mode="mean", padding_idx=PAD)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = dim
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"act{i}"] = nn.ReLU()
            if dropout:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = h
        self.mlp = nn.Sequential(layers)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.buckets:
            # Ids 0 (pad) and 1 (unk) keep their rows; word ids share the other rows by
            # their rank modulo the row count, so the most frequent words stay distinct.
            ids = torch.where(ids < 2, ids, 2 + (ids - 2) % (self.buckets - 2))
        # EmbeddingBag's mean leaves padding_idx out of both sum and count; an all-pad
        # document gives a zero vector.
        return self.head(self.mlp(self.embed(ids)))


class BOW(ModelFamily):
    name = "bow"
    description = "bag of embeddings: mean of non-pad token embeddings, then an MLP (fastText-like)"
    inputs = ("tokens",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        dim: int = 64  # embedding dimension
        hidden: tuple[int, ...] = (64,)  # MLP hidden sizes; [] = linear on the mean embedding
        dropout: float = 0.0
        # > 0: word ids (>= 2; 0 is pad, 1 unk) share this many embedding rows, the hashing
        # trick; 0, or a count >= the vocabulary, keeps one row per id.
        buckets: int = 0

        def __post_init__(self):
            if self.dim < 1 or any(h < 1 for h in self.hidden):
                raise ValueError(f"dim and hidden sizes must be positive, got dim={self.dim}, "
                                 f"hidden={list(self.hidden)}")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
            if self.buckets and self.buckets < 3:
                raise ValueError(f"buckets must be 0 (off) or at least 3 (pad, unk and one "
                                 f"shared row), got {self.buckets}")

    def build(self, data: TaskData) -> nn.Module:
        vocab = check_token_task(data, "bow")
        p = self.params
        return BagOfEmbeddings(vocab, p.dim, p.hidden, data.num_classes, p.dropout, p.buckets)

    def feature_points(self, model: nn.Module) -> list[str]:
        return ["embed"] + [f"mlp.{name}" for name, _ in model.mlp.named_children()
                            if name.startswith("act")]


class EncoderClassifier(nn.Module):
    def __init__(self, vocab: int, layers: int, width: int, heads: int, max_len: int,
                 classes: int, dropout: float):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab, width, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = Blocks(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        init_transformer(self, layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"text-transformer: input of {t} tokens is longer than the model's "
                             f"max_len {self.max_len}; build it with max_len >= {t}")
        keep = ids != PAD
        x = self.drop(self.tokens(ids) + self.positions(torch.arange(t, device=ids.device)))
        allowed = keep[:, None, None, :]  # (B, 1, 1, L): every query may see the non-pad keys
        for block in self.blocks:
            x = block(x, allowed)
        x = self.ln(x)
        weights = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


class TextTransformer(ModelFamily):
    name = "text-transformer"
    description = ("transformer encoder with a padding mask, mean pooling over non-pad tokens "
                   "and a linear head; features are block outputs, attention maps are tapped")
    inputs = ("tokens",)
    targets = ("labels",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        layers: int = 2
        width: int = 64
        heads: int = 4
        max_len: int = 512  # longest input; must be >= the task's sequence length
        dropout: float = 0.1

        def __post_init__(self):
            check_transformer_params(self.layers, self.width, self.heads, self.dropout,
                                     length=("max_len", self.max_len))

    def build(self, data: TaskData) -> nn.Module:
        vocab = check_token_task(data, "text-transformer")
        p = self.params
        if p.max_len < data.input_shape[0]:
            raise ValueError(f"text-transformer max_len={p.max_len} is shorter than the task's "
                             f"sequences ({data.input_shape[0]} tokens); set max_len to at least "
                             f"{data.input_shape[0]}")
        return EncoderClassifier(vocab, p.layers, p.width, p.heads, p.max_len,
                                 data.num_classes, p.dropout)

    def feature_points(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def attention_points(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}.attn.probs" for i in range(len(model.blocks))]


@hookimpl
def kdbench_register_models(register):
    register(BOW)
    register(TextTransformer)
