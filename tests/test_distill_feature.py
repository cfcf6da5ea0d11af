"""The feature-based distillers: golden values from the papers' formulas, gradients, numerical
safety, the model families each one serves, clear errors, and a short real run."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.config import load_experiment
from kdbench.contracts import DistillContext, Outputs, TaskData
from kdbench.errors import ConfigError
from kdbench.runner import run_experiment
from kdbench.store import Store
from kdbench.training import capture_features


# ---------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def one_thread():
    """With two threads, a busy neighbour on a shared 2-core machine slows convolutions a
    hundredfold; these small models gain nothing from a second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def task_data(shape, n=4, classes=10, vocab=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(1, vocab, (n, *shape), generator=g) if vocab
         else torch.randn(n, *shape, generator=g))
    ds = TensorDataset(x, torch.randint(0, classes, (n,), generator=g))
    return TaskData(ds, ds, ds, tuple(shape), classes, vocab_size=vocab)


class ToyBlock(nn.Module):
    """A minimal attention block: its softmax passes through ``probs`` (B, heads, T, T)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qk = nn.Linear(width, 2 * width)
        self.probs = nn.Identity()

    def forward(self, x):
        b, t, c = x.shape
        q, k = self.qk(x).view(b, t, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = self.probs((q @ k.transpose(-1, -2)).softmax(-1))
        v = x.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        return x + (a @ v).transpose(1, 2).reshape(b, t, c)


class ToyLM(nn.Module):
    def __init__(self, vocab, width, heads, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(ToyBlock(width, heads) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def toy_context(s_layers=2, t_layers=4, s_width=8, t_width=12, s_heads=2, t_heads=2, seed=0):
    torch.manual_seed(seed)
    data = task_data((5,), vocab=11, classes=11)
    student, teacher = ToyLM(11, s_width, s_heads, s_layers), ToyLM(11, t_width, t_heads, t_layers)
    points = lambda m: [f"blocks.{i}" for i in range(len(m.blocks))]
    attention = lambda m: [f"blocks.{i}.probs" for i in range(len(m.blocks))]
    return DistillContext(student, teacher, data, points(student), points(teacher),
                          attention(student), attention(teacher))


def family_context(plugins, teacher, student, data, seed=0):
    torch.manual_seed(seed)
    t_family = plugins.build("model", teacher[0], teacher[1])
    s_family = plugins.build("model", student[0], student[1])
    t_model, s_model = t_family.build(data), s_family.build(data)
    return DistillContext(s_model, t_model, data, s_family.feature_points(s_model),
                          t_family.feature_points(t_model), s_family.attention_points(s_model),
                          t_family.attention_points(t_model))


DIGITS = task_data((64,))  # digits-shaped: cnn views it as a 1 x 8 x 8 image
CIFAR = task_data((3, 32, 32), n=2)
TOKENS = task_data((12,), vocab=30, classes=30)


def cnn_context(plugins, seed=0):
    return family_context(plugins, ("cnn", {"channels": [6, 8, 10], "hidden": 12}),
                          ("cnn", {"channels": [3, 4, 5], "hidden": 7}), DIGITS, seed)


def mlp_context(plugins, seed=0, student=(8, 8), teacher=(12, 12, 12, 12)):
    return family_context(plugins, ("mlp", {"hidden": list(teacher)}),
                          ("mlp", {"hidden": list(student)}), DIGITS, seed)


def forward(distiller, context, teacher_grad=False):
    """Real forward passes capturing what the trainer would capture; targets as rows."""
    x, y = context.data.train.tensors
    s_points = list(context.student_points) + (context.student_attention if distiller.needs_attention else [])
    t_points = list(context.teacher_points) + (context.teacher_attention if distiller.needs_attention else [])
    context.student.train()
    with capture_features(context.student, s_points) as s_feats:
        s_logits = context.student(x)
    with torch.set_grad_enabled(teacher_grad), capture_features(context.teacher, t_points) as t_feats:
        t_logits = context.teacher(x)
    if context.data.vocab_size:  # language modelling: one target per position
        y = torch.randint(0, s_logits.shape[-1], s_logits.shape[:-1]).reshape(-1)
    rows = lambda z: z.reshape(-1, z.shape[-1])
    return Outputs(rows(s_logits), dict(s_feats)), Outputs(rows(t_logits), dict(t_feats)), y


def seeded(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def fixed_features(distiller, context, seed=1, transform=lambda f: f):
    """Seeded features of the probed shapes at the distiller's points (not the models')."""
    s_out, t_out = context.probe(batch_size=3)
    s_feats = {s: transform(seeded(s_out.features[s].shape, seed + i))
               for i, (s, _) in enumerate(distiller.pairs)}
    t_feats = {t: transform(seeded(t_out.features[t].shape, seed + 100 + i))
               for i, (_, t) in enumerate(distiller.pairs)}
    logits = seeded((3, s_out.logits.shape[-1]), seed + 200)
    return Outputs(logits, s_feats), Outputs(logits.flip(0), t_feats)


# ---------------------------------------------------------------- registration and params
FEATURE = ["fitnet", "at", "nst", "vid", "hidden-mse", "hidden-cosine", "attention-kl"]


def test_every_method_is_registered_with_its_paper_and_defaults(plugins):
    for name in FEATURE:
        entry = plugins.get("distiller", name)
        assert entry.plugin == "distill-feature"
        assert entry.cls.category == "feature" and entry.cls.needs_features
        assert entry.cls.paper and entry.cls.paper.split(",")[0] in entry.cls.__doc__
    assert plugins.get("distiller", "attention-kl").cls.needs_attention
    # RepDistiller's commands: -r 1 -a 0 -b 100 / 1000 / 50 / 1.
    for name, beta in {"fitnet": 100, "at": 1000, "nst": 50, "vid": 1}.items():
        params = plugins.build("distiller", name).params
        assert (params.beta, params.ce_weight, params.kd_weight) == (beta, 1.0, 0.0)
    cosine = plugins.build("distiller", "hidden-cosine").params  # DistilBERT's 5 / 2 / 1, T = 2
    assert (cosine.kd_weight, cosine.ce_weight, cosine.beta, cosine.temperature) == (5, 2, 1, 2)


def test_bad_params_are_clear(plugins):
    with pytest.raises(ConfigError, match="pair one to one"):
        plugins.build("distiller", "at", {"student_points": [1, 2], "teacher_points": [1]})
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        plugins.build("distiller", "nst", {"beta": -1})
    with pytest.raises(ConfigError, match="unknown value 'both'"):
        plugins.build("distiller", "fitnet", {"mode": "both"})
    with pytest.raises(RuntimeError, match="call setup"):
        plugins.build("distiller", "at").loss(Outputs(torch.zeros(1, 2), {}), Outputs(torch.zeros(1, 2), {}),
                                              torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------- golden values
def test_fitnet_matches_the_hint_loss_by_hand(plugins):
    context = cnn_context(plugins)
    distiller = plugins.build("distiller", "fitnet", {"beta": 3.0, "ce_weight": 0.5})
    (adapter,) = distiller.setup(context)
    # Default: the middle point of [block1, block2, block3, act] in both models.
    assert distiller.pairs == [("block2", "block2")]
    student, teacher = fixed_features(distiller, context)
    y = torch.tensor([1, 0, 3])
    terms = distiller.loss(student, teacher, y)
    assert set(terms) == {"ce", "fitnet"}
    fs, ft = student.features["block2"].double(), teacher.features["block2"].double()
    conv = adapter[0]
    assert conv.kernel_size == (1, 1)
    # 1x1 regressor, then a ReLU because the teacher's hint is post-ReLU (non-negative).
    r = torch.einsum("oc,bchw->bohw", conv.weight.double()[:, :, 0, 0], fs) + conv.bias.double()[None, :, None, None]
    expected = 3.0 * ((r.clamp(min=0) - ft) ** 2).sum() / ft.numel()
    assert terms["fitnet"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * F.cross_entropy(student.logits, y).item(), rel=1e-6)


def test_fitnet_hint_mode_trains_the_hint_alone(plugins):
    context = cnn_context(plugins)
    distiller = plugins.build("distiller", "fitnet", {"mode": "hint"})
    distiller.setup(context)
    assert set(distiller.loss(*forward(distiller, context))) == {"fitnet"}


def test_fitnet_regressor_follows_the_paper_for_larger_student_maps(plugins):
    context = cnn_context(plugins)
    # The student's 4x4 block1 guided by the teacher's 1x1 block3: a valid conv of kernel 4 - 1 + 1.
    distiller = plugins.build("distiller", "fitnet", {"student_point": "block1", "teacher_point": -2})
    (adapter,) = distiller.setup(context)
    assert distiller.pairs == [("block1", "block3")] and adapter[0].kernel_size == (4, 4)
    s_out, t_out = context.probe()
    assert adapter(s_out.features["block1"]).shape == t_out.features["block3"].shape


def at_map(f):
    q = f.abs().pow(2).sum(dim=1).flatten(1)  # the paper's sum over channels
    return q / q.norm(dim=1, keepdim=True)


def test_at_matches_the_paper_with_pooling_of_larger_maps(plugins):
    context = cnn_context(plugins)
    distiller = plugins.build("distiller", "at", {"beta": 2.0})
    assert distiller.setup(context) == []
    # Stages without the stem, paired from the deepest: [block2, block3] in both models.
    assert distiller.pairs == [("block2", "block2"), ("block3", "block3")]
    student, teacher = fixed_features(distiller, context)
    terms = distiller.loss(student, teacher, torch.tensor([0, 1, 2]))
    expected = sum(((at_map(student.features[p].double()) - at_map(teacher.features[p].double())) ** 2).mean()
                   for p in ("block2", "block3"))
    assert terms["at"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)

    # Explicit pairs by path and index; the student's 4x4 block1 is averaged down to 2x2.
    distiller = plugins.build("distiller", "at", {"student_points": ["block1"], "teacher_points": [1]})
    distiller.setup(context)
    student, teacher = fixed_features(distiller, context)
    fs = F.avg_pool2d(student.features["block1"].double(), 2)
    expected = ((at_map(fs) - at_map(teacher.features["block2"].double())) ** 2).mean()
    assert distiller.loss(student, teacher, torch.tensor([0, 1, 2]))["at"].item() == \
        pytest.approx(1000 * expected.item(), rel=1e-5)


def test_nst_matches_the_squared_mmd_by_hand(plugins):
    context = cnn_context(plugins)
    distiller = plugins.build("distiller", "nst", {"beta": 1.0})
    distiller.setup(context)
    student, teacher = fixed_features(distiller, context)
    terms = distiller.loss(student, teacher, torch.tensor([0, 1, 2]))
    expected = 0.0
    for s_point, t_point in distiller.pairs:
        fs, ft = student.features[s_point].double(), teacher.features[t_point].double()
        for b in range(fs.shape[0]):
            s = [c.flatten() / c.flatten().norm() for c in fs[b]]
            t = [c.flatten() / c.flatten().norm() for c in ft[b]]
            k = lambda xs, ys: sum(float(x @ y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))
            expected += (k(t, t) + k(s, s) - 2 * k(s, t)) / fs.shape[0]
    assert terms["nst"].item() == pytest.approx(expected, rel=1e-5)


def test_vid_matches_the_gaussian_nll_by_hand(plugins):
    context = cnn_context(plugins)
    distiller = plugins.build("distiller", "vid")
    (heads,) = distiller.setup(context)
    student, teacher = fixed_features(distiller, context)
    terms = distiller.loss(student, teacher, torch.tensor([0, 1, 2]))
    expected = 0.0
    for head, (s_point, t_point) in zip(heads, distiller.pairs):
        x, t = student.features[s_point].double(), teacher.features[t_point].double()
        w = [layer.weight.double()[:, :, 0, 0] for layer in head.mean if isinstance(layer, nn.Conv2d)]
        h = torch.einsum("oc,bchw->bohw", w[0], x).clamp(min=0)
        h = torch.einsum("oc,bchw->bohw", w[1], h).clamp(min=0)
        mu = torch.einsum("oc,bchw->bohw", w[2], h)
        var = (torch.log1p(torch.exp(head.alpha.double())) + 1e-5)[None, :, None, None]
        assert torch.allclose(var, torch.full_like(var, 5.0))  # the authors' initial variance
        expected += (0.5 * ((t - mu) ** 2 / var + var.log())).mean().item()
    assert terms["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_hidden_mse_uses_tinybert_uniform_mapping_and_projections(plugins):
    context = mlp_context(plugins)
    distiller = plugins.build("distiller", "hidden-mse", {"beta": 2.0})
    projections = distiller.setup(context)[0]
    assert distiller.pairs == [("act1", "act2"), ("act2", "act4")]  # g(m) = m * N / M
    student, teacher = fixed_features(distiller, context)
    terms = distiller.loss(student, teacher, torch.tensor([0, 1, 2]))
    assert set(terms) == {"kd", "hidden-mse"}  # TinyBERT: no hard labels, soft targets at T = 1
    expected = 0.0
    for proj, (s, t) in zip(projections, distiller.pairs):
        h = student.features[s].double() @ proj.weight.double().T + proj.bias.double()
        expected += ((h - teacher.features[t].double()) ** 2).mean().item()
    assert terms["hidden-mse"].item() == pytest.approx(2.0 * expected, rel=1e-5)


def test_hidden_losses_leave_padded_positions_out():
    from kdbench_plugins.distill.feature import HiddenCosine, HiddenMSE

    context = toy_context()
    targets = torch.tensor([[1, 2, -100, 3, -100]] * 2 + [[4, -100, -100, -100, -100]]).reshape(-1)
    keep = targets.reshape(3, 5) != -100
    for cls in (HiddenMSE, HiddenCosine):
        distiller = cls(cls.Params(ce_weight=0, kd_weight=0, student_points=(0, -1), teacher_points=(1, 3)))
        projections = distiller.setup(context)[0]
        student, teacher = fixed_features(distiller, context)
        expected = 0.0
        for proj, (s, t) in zip(projections, distiller.pairs):
            h = student.features[s].double() @ proj.weight.double().T + proj.bias.double()
            ht = teacher.features[t].double()
            if cls is HiddenMSE:
                per = ((h - ht) ** 2).mean(-1)
            else:
                per = 1 - (h * ht).sum(-1) / (h.norm(dim=-1) * ht.norm(dim=-1))
            expected += per[keep].mean().item()
        student = Outputs(torch.zeros(15, 11), student.features)
        assert distiller.loss(student, teacher, targets)[cls.name].item() == pytest.approx(expected, rel=1e-5)


def test_hidden_cosine_is_distilbert_last_layer_cosine(plugins):
    context = mlp_context(plugins, student=(12, 12), teacher=(12, 12, 12))
    distiller = plugins.build("distiller", "hidden-cosine")
    projections = distiller.setup(context)[0]
    # Same width: no projection, as in DistilBERT; last hidden state to last hidden state.
    assert distiller.pairs == [("act2", "act3")] and not list(projections.parameters())
    student, teacher = fixed_features(distiller, context)
    terms = distiller.loss(student, teacher, torch.tensor([0, 1, 2]))
    hs, ht = student.features["act2"].double(), teacher.features["act3"].double()
    expected = (1 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))).mean()
    assert terms["hidden-cosine"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(terms) == {"ce", "kd", "hidden-cosine"}


def test_attention_kl_matches_minilm_per_head_kl_by_hand():
    from kdbench_plugins.distill.feature import AttentionKL

    context = toy_context()
    distiller = AttentionKL(AttentionKL.Params(beta=1.5, ce_weight=0))
    assert distiller.setup(context) == []
    assert distiller.pairs == [("blocks.1.probs", "blocks.3.probs")]  # last to last
    softmax = lambda f: f.softmax(-1)
    student, teacher = fixed_features(distiller, context, transform=softmax)
    a_s, a_t = student.features["blocks.1.probs"].double(), teacher.features["blocks.3.probs"].double()
    b, h, t, _ = a_s.shape
    total = sum(float(a_t[i, j, q, k] * (a_t[i, j, q, k].log() - a_s[i, j, q, k].log()))
                for i in range(b) for j in range(h) for q in range(t) for k in range(t))
    terms = distiller.loss(student, teacher, torch.zeros(b * t, dtype=torch.long))
    assert set(terms) == {"attention-kl"}
    assert terms["attention-kl"].item() == pytest.approx(1.5 * total / (b * h * t), rel=1e-5)
    # A causal mask: keys a query may not see carry probability 0 in both models.
    causal = torch.ones(t, t).tril().bool()
    masked = lambda f: f.masked_fill(~causal, float("-inf")).softmax(-1)
    student, teacher = fixed_features(distiller, context, transform=masked)
    assert torch.isfinite(distiller.loss(student, teacher, torch.zeros(b * t, dtype=torch.long))["attention-kl"])
    copy = Outputs(teacher.logits, {"blocks.1.probs": teacher.features["blocks.3.probs"]})
    same = distiller.loss(copy, teacher, torch.zeros(b * t, dtype=torch.long))["attention-kl"]
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_with_head_mean_serves_different_head_counts():
    from kdbench_plugins.distill.feature import AttentionKL

    context = toy_context(s_heads=2, t_heads=4, t_width=16)
    distiller = AttentionKL(AttentionKL.Params(ce_weight=0, heads="mean"))
    distiller.setup(context)
    student, teacher = fixed_features(distiller, context, transform=lambda f: f.softmax(-1))
    a_s = student.features["blocks.1.probs"].double().mean(1)  # (B, T, T): head-averaged
    a_t = teacher.features["blocks.3.probs"].double().mean(1)
    b, t, _ = a_s.shape
    total = sum(float(a_t[i, q, k] * (a_t[i, q, k].log() - a_s[i, q, k].log()))
                for i in range(b) for q in range(t) for k in range(t))
    terms = distiller.loss(student, teacher, torch.zeros(b * t, dtype=torch.long))
    assert terms["attention-kl"].item() == pytest.approx(total / (b * t), rel=1e-5)


# ---------------------------------------------------------------- gradients and numerical safety
def gradient_context(plugins, name):
    if name in ("hidden-mse", "hidden-cosine"):
        return mlp_context(plugins)
    if name == "attention-kl":
        return toy_context()
    return cnn_context(plugins)


@pytest.mark.parametrize("name", FEATURE)
def test_student_and_adapters_get_gradients_and_the_teacher_none(plugins, name):
    context = gradient_context(plugins, name)
    distiller = plugins.build("distiller", name)
    adapters = distiller.setup(context)
    # The teacher runs with gradients enabled here: the method itself must not reach it.
    student, teacher, y = forward(distiller, context, teacher_grad=True)
    distiller.loss(student, teacher, y)[name].backward()
    first = next(p for p in context.student.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is None for p in context.teacher.parameters())
    for p in (p for m in adapters for p in m.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


EXTREMES = {"huge": lambda f: f * 1e6, "dead": lambda f: f * 0, "mixed": lambda f: f.clamp(min=0) * 1e6}


@pytest.mark.parametrize("extreme", list(EXTREMES))
@pytest.mark.parametrize("name", FEATURE)
def test_loss_and_gradients_stay_finite_on_extreme_activations(plugins, name, extreme):
    context = gradient_context(plugins, name)
    distiller = plugins.build("distiller", name)
    adapters = distiller.setup(context)
    if name == "attention-kl":
        # Probabilities with exact zeros: a one-hot student against a peaked, uniform or
        # one-hot teacher whose mass sits where the student has none.
        def one_hot(f):
            return F.one_hot(f.argmax(-1), f.shape[-1]).float()
        teacher_maps = {"huge": lambda f: (f * 1e6).softmax(-1), "dead": lambda f: (f * 0).softmax(-1),
                        "mixed": one_hot}
        student, _ = fixed_features(distiller, context, transform=one_hot)
        _, teacher = fixed_features(distiller, context, transform=teacher_maps[extreme])
    else:
        student, teacher = fixed_features(distiller, context, transform=EXTREMES[extreme])
    student = Outputs(student.logits, {k: v.requires_grad_() for k, v in student.features.items()})
    loss = distiller.loss(student, teacher, torch.tensor([0, 1, 2]))[name]
    assert torch.isfinite(loss)
    loss.backward()
    for v in student.features.values():
        assert torch.isfinite(v.grad).all()
    for p in (p for m in adapters for p in m.parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_scale_free_methods_stay_finite_far_beyond_float32_squares(plugins):
    # |A|^2 of 1e30 overflows float32; AT, NST and the cosine (without a projection, whose
    # bias is not scale-free) are scale-free and must stay so.
    for name, context in (("at", cnn_context(plugins)), ("nst", cnn_context(plugins)),
                          ("hidden-cosine", mlp_context(plugins, student=(12, 12), teacher=(12, 12, 12)))):
        distiller = plugins.build("distiller", name)
        distiller.setup(context)
        small = distiller.loss(*fixed_features(distiller, context), torch.tensor([0, 1, 2]))[name]
        huge = distiller.loss(*fixed_features(distiller, context, transform=lambda f: f * 1e30),
                              torch.tensor([0, 1, 2]))[name]
        assert huge.item() == pytest.approx(small.item(), rel=1e-4)


# ---------------------------------------------------------------- families served
IMAGES = {"cnn": (("cnn", {"channels": [8, 16]}), ("cnn", {"channels": [4, 8]}), DIGITS),
          "resnet": (("resnet", {"arch": "resnet14"}), ("resnet", {"arch": "resnet8"}), CIFAR),
          "wrn": (("wrn", {"depth": 16, "widen": 2}), ("wrn", {"depth": 10, "widen": 1}), CIFAR),
          "vgg": (("vgg", {"arch": "vgg11"}), ("vgg", {"arch": "vgg8"}), CIFAR),
          "resnet->shufflenetv1": (("resnet", {"arch": "resnet14"}), ("shufflenetv1", {}), CIFAR)}
VECTORS = {"mlp": (("mlp", {"hidden": [32, 32]}), ("mlp", {"hidden": [8]}), DIGITS)}
SEQUENCES = {"gpt": (("gpt", {"layers": 4, "width": 32, "heads": 4, "context": 12}),
                     ("gpt", {"layers": 2, "width": 16, "heads": 4, "context": 12}), TOKENS),
             "text-transformer": (("text-transformer", {"layers": 3, "width": 32, "heads": 2, "max_len": 12}),
                                  ("text-transformer", {"layers": 2, "width": 16, "heads": 2, "max_len": 12}),
                                  task_data((12,), vocab=30, classes=4))}
CLAIMS = {"fitnet": {**IMAGES, **VECTORS, **SEQUENCES}, "at": IMAGES, "nst": IMAGES,
          "vid": {**IMAGES, **VECTORS, **SEQUENCES}, "hidden-mse": {**VECTORS, **SEQUENCES},
          "hidden-cosine": {**VECTORS, **SEQUENCES}, "attention-kl": SEQUENCES}


@pytest.mark.parametrize("name,family", [(n, f) for n, fams in CLAIMS.items() for f in fams])
def test_each_method_serves_the_families_it_claims(plugins, name, family):
    teacher, student, data = CLAIMS[name][family]
    for fam in {teacher[0], student[0]}:
        if fam not in plugins.names("model"):
            pytest.skip(f"model family {fam} is not installed")
    context = family_context(plugins, teacher, student, data)
    distiller = plugins.build("distiller", name)
    adapters = distiller.setup(context)
    s_out, t_out, y = forward(distiller, context)
    terms = distiller.loss(s_out, t_out, y)
    assert torch.isfinite(terms[name]) and terms[name].item() >= 0
    sum(terms.values()).backward()
    assert distiller.pairs
    if name == "fitnet":
        (s, t), = distiller.pairs
        assert adapters[0](s_out.features[s]).shape == t_out.features[t].shape


def test_stage_pairs_follow_repdistiller_on_the_cifar_families(plugins):
    for teacher, student, expected in [
            (("resnet", {"arch": "resnet14"}), ("resnet", {"arch": "resnet8"}), ["layer1", "layer2", "layer3"]),
            (("wrn", {"depth": 16, "widen": 2}), ("wrn", {"depth": 10, "widen": 1}), ["block1", "block2", "block3"]),
            (("vgg", {"arch": "vgg11"}), ("vgg", {"arch": "vgg8"}), ["block1", "block2", "block3", "block4"])]:
        context = family_context(plugins, teacher, student, CIFAR)
        distiller = plugins.build("distiller", "at")
        distiller.setup(context)
        assert distiller.pairs == [(p, p) for p in expected]  # feat[1:-1]
        fitnet = plugins.build("distiller", "fitnet")
        fitnet.setup(context)
        assert fitnet.pairs == [(context.student_points[2], context.teacher_points[2])]  # hint_layer 2


# ---------------------------------------------------------------- pairs a method cannot serve
def test_clear_errors_for_pairs_a_method_cannot_serve(plugins):
    mlp = mlp_context(plugins)
    for name in ("at", "nst"):
        with pytest.raises(ValueError, match=f"{name} needs convolutional feature maps"):
            plugins.build("distiller", name).setup(mlp)
    with pytest.raises(ValueError, match="names no attention points"):
        plugins.build("distiller", "attention-kl").setup(mlp)
    with pytest.raises(ValueError, match="needs convolutional feature maps"):
        plugins.build("distiller", "at").setup(toy_context())  # token sequences are not maps
    with pytest.raises(ValueError, match="head counts must match.*heads: mean"):
        plugins.build("distiller", "attention-kl").setup(toy_context(s_heads=2, t_heads=4, t_width=16))
    cnn = cnn_context(plugins)
    with pytest.raises(ValueError, match="include a conv map"):
        plugins.build("distiller", "hidden-mse").setup(cnn)
    with pytest.raises(ValueError, match="smaller than the teacher's"):  # 1x1 student, 4x4 teacher
        plugins.build("distiller", "fitnet", {"student_point": "block3", "teacher_point": "block1"}).setup(cnn)
    with pytest.raises(ValueError, match="cannot be regressed onto"):  # a vector onto a map
        plugins.build("distiller", "fitnet", {"student_point": -1, "teacher_point": 0}).setup(cnn)
    with pytest.raises(ValueError, match="not a feature point of the student"):
        plugins.build("distiller", "vid", {"student_points": ["layer9"], "teacher_points": [0]}).setup(cnn)
    bare = DistillContext(nn.Linear(64, 10), mlp.teacher, DIGITS, [], mlp.teacher_points)
    with pytest.raises(ValueError, match="student model .Linear. names none"):
        plugins.build("distiller", "fitnet").setup(bare)


# ---------------------------------------------------------------- a real run
RUN = textwrap.dedent("""
    name: feature-tiny
    seeds: [0]
    tasks: [digits]
    pairs:
      - teacher: {name: cnn, channels: [8, 16], hidden: 32}
        student: {name: cnn, channels: [4, 8], hidden: 16}
    recipes:
      fitnet: [{distill: fitnet}]
      at: [{distill: at}]
      fitnet-2stage: [{distill: {name: fitnet, mode: hint}}, {distill: hinton}]
    training: {epochs: 3, batch_size: 64, lr: 0.005, checkpoint: last}
    measure: {latency_repeats: 1, latency_warmup: 0, latency_batch_sizes: [1]}
""")


def test_a_short_real_run_records_every_named_term(plugins, tmp_path, isolated_cache):
    path = tmp_path / "feature.yaml"
    path.write_text(RUN)
    experiment = load_experiment(path, plugins)
    with Store(tmp_path / "r.db") as store:
        summary = run_experiment(experiment, store, plugins, isolated_cache, progress=None)
        records = store.records(experiment.name)
    assert summary.exit_code == 0
    students = {r.recipe: r for r in records if r.role == "student"}
    fitnet, at, two = students["fitnet"], students["at"], students["fitnet-2stage"]
    for row in fitnet.stages[0]["history"]:
        assert {"loss_ce", "loss_fitnet", "loss"} <= set(row) and "loss_kd" not in row
    assert len(fitnet.stages[0]["history"]) == 3
    assert all({"loss_ce", "loss_at"} <= set(row) for row in at.stages[0]["history"])
    assert fitnet.metrics["extra_train_params"] > 0 and at.metrics["extra_train_params"] == 0
    hint = two.stages[0]["history"]
    assert [k for k in hint[0] if k.startswith("loss_")] == ["loss_fitnet"]
    assert {"loss_ce", "loss_kd"} <= set(two.stages[1]["history"][0])
    assert fitnet.metrics["test_accuracy"] > 0.2 and at.metrics["test_accuracy"] > 0.2
    # The regressor is not part of the deployed student.
    assert fitnet.metrics["params"] == at.metrics["params"]
