"""Model family ``gpt``: a small decoder-only transformer for language modelling.

The architecture of GPT (Radford, Narasimhan, Salimans and Sutskever, "Improving Language
Understanding by Generative Pre-Training", 2018) with the pre-LayerNorm blocks of GPT-2
(Radford, Wu, Child, Luan, Amodei and Sutskever, "Language Models are Unsupervised Multitask
Learners", 2019): token and learned position embeddings, ``layers`` blocks of causal
multi-head self-attention and a 4x-wide GELU MLP, each behind a LayerNorm and added back
to the residual stream, a final LayerNorm and a linear head over the vocabulary.

Input ``(B, T)`` token ids, output logits ``(B, T, vocab)``; position ``t`` sees tokens
``0..t`` only. Attention is computed explicitly (no fused kernel) so that the attention
probabilities pass through ``blocks.<i>.attn.probs``, an identity module a forward hook can
read as ``(B, heads, T, T)``. Every weight matrix is an ``nn.Linear``, so the int8
quantizer, the magnitude pruner and the SVD decomposer act on all of them (the embeddings
stay dense float).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with an explicit softmax.

    ``forward(x, allowed)`` takes a boolean mask broadcastable to ``(B, heads, T, T)``:
    True where a query may attend to a key (causal for gpt, non-pad keys for encoders).
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.probs = nn.Identity()  # the tap for attention maps (B, heads, T, T)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        # A large finite negative instead of -inf: a row with no allowed key (an all-pad
        # document) gets uniform weights rather than NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = self.probs(scores.softmax(dim=-1))
        y = self.drop(weights) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.mlp(self.ln2(x))


class Blocks(nn.ModuleList):
    """The block stack; each block's output is a feature point ``blocks.<i>``."""


def init_transformer(model: nn.Module, layers: int) -> None:
    """GPT-2 initialization: N(0, 0.02) weights, zero biases, and the projections that write
    into the residual stream scaled by 1/sqrt(2 * layers) so its variance does not grow with
    depth."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.out", "mlp.2")) else 0.02
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if getattr(module, "padding_idx", None) is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()


class GPTModel(nn.Module):
    def __init__(self, vocab: int, layers: int, width: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = Blocks(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        init_transformer(self, layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"gpt: input of {t} tokens is longer than the model's context "
                             f"{self.context}; build the model with context >= {t}")
        x = self.drop(self.tokens(ids) + self.positions(torch.arange(t, device=ids.device)))
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.ln(x))


def check_transformer_params(layers: int, width: int, heads: int, dropout: float,
                             length: tuple[str, int]) -> None:
    """Shared range checks of the transformer families; ``length`` is (its name, value)."""
    if min(layers, width, heads, length[1]) < 1:
        raise ValueError(f"layers, width, heads and {length[0]} must be positive")
    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def check_token_task(data: TaskData, family: str) -> int:
    if data.vocab_size is None or len(data.input_shape) != 1:
        raise ValueError(f"{family} needs a task with token inputs (TaskData.vocab_size set and "
                         f"input_shape (T,)); got input_shape {data.input_shape} and "
                         f"vocab_size {data.vocab_size}")
    return data.vocab_size


class GPT(ModelFamily):
    name = "gpt"
    description = ("decoder-only transformer (GPT-2 style, pre-LayerNorm, causal attention) for "
                   "language modelling; features are block outputs, attention maps are tapped")
    inputs = ("tokens",)
    targets = ("positions",)

    @dataclasses.dataclass(frozen=True)
    class Params:
        layers: int = 4
        width: int = 128
        heads: int = 4
        context: int = 128  # longest input; must be >= the task's context
        dropout: float = 0.0

        def __post_init__(self):
            check_transformer_params(self.layers, self.width, self.heads, self.dropout,
                                     length=("context", self.context))

    def build(self, data: TaskData) -> nn.Module:
        vocab = check_token_task(data, "gpt")
        p = self.params
        if p.context < data.input_shape[0]:
            raise ValueError(f"gpt context={p.context} is shorter than the task's context "
                             f"{data.input_shape[0]}; set the model's context to at least "
                             f"{data.input_shape[0]} (or lower the task's context)")
        return GPTModel(vocab, p.layers, p.width, p.heads, p.context, p.dropout)

    def feature_points(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def attention_points(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}.attn.probs" for i in range(len(model.blocks))]


@hookimpl
def kdbench_register_models(register):
    register(GPT)
