"""The relation-based distillers (rkd, sp, pkt, cc, crd) against values computed by hand.

Each golden value is computed twice outside the method: pinned as a literal, and recomputed
here with plain Python loops over the paper's formula (the ``ref_*`` helpers), so neither the
literal nor the helper can drift silently.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.config import load_experiment
from kdbench.contracts import DistillContext, Outputs, TaskData
from kdbench.runner import run_experiment
from kdbench.store import Store
from kdbench.training import capture_features
from kdbench_plugins.distill import relation

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0], [2.0, 0.5, -1.0], [-1.0, 0.0, 0.5]]  # student, 4 x 3
T = [[0.5, 1.0], [1.5, -0.5], [0.0, 2.0], [-1.0, -1.0]]  # teacher, 4 x 2
LOGITS_S = [[1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [2.0, -1.0]]
LOGITS_T = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, -1.0]]
TARGETS = [0, 1, 0, 0]

GOLDEN_SP = 0.0989193992686994
GOLDEN_RKD_DISTANCE = 0.03839471467853073
GOLDEN_RKD_ANGLE = 0.05650417109283876
GOLDEN_PKT = 0.09916316123263788
GOLDEN_CC = 0.03331688857625807


# ---------------------------------------------------------------- plain-Python references
def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def sub(a, b):
    return [x - y for x, y in zip(a, b)]


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a] if n > 0 else [0.0 for _ in a]


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_sp(s, t):
    b = len(s)

    def gram(f):
        return [unit([dot(f[i], f[j]) for j in range(b)]) for i in range(b)]

    gs, gt = gram(s), gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def ref_rkd(s, t):
    """Distance: Huber over ordered distinct pairs of distances over their mean, / b^2.
    Angle: Huber over triplets of cos(angle at vertex j), degenerate ones counted as 0, / b^3."""
    b = len(s)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]

    def psi_d(f):
        d = {(i, j): math.dist(f[i], f[j]) for i, j in pairs}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    ds, dt = psi_d(s), psi_d(t)
    distance = sum(huber(ds[k] - dt[k]) for k in pairs) / b ** 2

    def psi_a(f, i, j, k):
        return dot(unit(sub(f[i], f[j])), unit(sub(f[k], f[j])))

    angle = sum(huber(psi_a(s, i, j, k) - psi_a(t, i, j, k))
                for i in range(b) for j in range(b) for k in range(b)) / b ** 3
    return distance, angle


def ref_pkt(s, t):
    b = len(s)

    def cond(f):
        k = [[(dot(unit(f[i]), unit(f[j])) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[i][m] for m in range(b) if m != i) for j in range(b)] for i in range(b)]

    p, q = cond(t), cond(s)
    return sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(b) for j in range(b) if i != j) / b ** 2


def ref_cc(e_s, e_t, gamma, order):
    """Taylor-expanded Gaussian RBF between unit embeddings, squared Frobenius / b^2."""
    b = len(e_s)

    def kernel(e):
        e = [unit(x) for x in e]
        return [[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * dot(e[i], e[j]) ** p
                                            for p in range(order + 1)) for j in range(b)] for i in range(b)]

    ks, kt = kernel(e_s), kernel(e_t)
    return sum((kt[i][j] - ks[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def linear(w, bias, x):
    return [dot(row, x) + c for row, c in zip(w, bias)]


# ---------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: one thread avoids the parallel overhead that dominates them
    (and that multiplies on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensor(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def outs(logits, feats):
    return Outputs(tensor(logits) if not isinstance(logits, torch.Tensor) else logits, {"f": feats})


def point_context(n_points=1):
    """Enough context for distillers that only choose points (no probing)."""
    return DistillContext(None, None, None, ["f"] * n_points, ["f"] * n_points)


def tiny_models(s_dim=3, t_dim=2, n=6, classes=2, labels=None, dtype=torch.float64):
    """Student = identity tap of its input; teacher = a linear tap: real modules for probe()."""
    torch.manual_seed(0)
    student = nn.Sequential(OrderedDict(f=nn.Identity(), head=nn.Linear(s_dim, classes))).to(dtype)
    teacher = nn.Sequential(OrderedDict(f=nn.Linear(s_dim, t_dim), head=nn.Linear(t_dim, classes))).to(dtype)
    x = torch.randn(n, s_dim, dtype=dtype)
    y = torch.tensor(labels) if labels is not None else torch.arange(n) % classes
    split = TensorDataset(x, y)
    data = TaskData(split, split, split, (s_dim,), classes)
    return DistillContext(student, teacher, data, ["f"], ["f"])


def build(plugins, name, **params):
    return plugins.build("distiller", name, params)


# ---------------------------------------------------------------- golden values
def test_reference_helpers_reproduce_the_pinned_values():
    assert ref_sp(S, T) == pytest.approx(GOLDEN_SP, rel=1e-12)
    assert ref_rkd(S, T) == pytest.approx((GOLDEN_RKD_DISTANCE, GOLDEN_RKD_ANGLE), rel=1e-12)
    assert ref_pkt(S, T) == pytest.approx(GOLDEN_PKT, rel=1e-12)


def test_sp_matches_hand_computed_value(plugins):
    sp = build(plugins, "sp", beta=2.0, student_point="f", teacher_point="f", kd_weight=0.5)
    sp.setup(point_context())
    # The student's map is (4, 3, 1): SP flattens each example.
    terms = sp.loss(outs(LOGITS_S, tensor(S).reshape(4, 3, 1)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    assert set(terms) == {"ce", "kd", "sp"}
    assert terms["sp"].item() == pytest.approx(2.0 * GOLDEN_SP, rel=1e-12)


def test_rkd_matches_hand_computed_values(plugins):
    rkd = build(plugins, "rkd", student_point="f", teacher_point="f")
    rkd.setup(point_context())
    terms = rkd.loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    assert set(terms) == {"ce", "rkd.distance", "rkd.angle"}  # kd weight 0 by default
    assert terms["rkd.distance"].item() == pytest.approx(25 * GOLDEN_RKD_DISTANCE, rel=1e-12)
    assert terms["rkd.angle"].item() == pytest.approx(50 * GOLDEN_RKD_ANGLE, rel=1e-12)
    no_angle = build(plugins, "rkd", angle_weight=0.0, beta=2.0)
    no_angle.setup(point_context())
    terms = no_angle.loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    assert "rkd.angle" not in terms
    assert terms["rkd.distance"].item() == pytest.approx(50 * GOLDEN_RKD_DISTANCE, rel=1e-12)


def test_rkd_is_zero_for_a_scaled_copy_of_the_teacher(plugins):
    rkd = build(plugins, "rkd")
    rkd.setup(point_context())
    t = tensor(S)
    terms = rkd.loss(outs(LOGITS_S, 7.5 * t), outs(LOGITS_T, t), torch.tensor(TARGETS))
    assert terms["rkd.distance"].item() == pytest.approx(0, abs=1e-12)
    assert terms["rkd.angle"].item() == pytest.approx(0, abs=1e-12)


def test_pkt_matches_hand_computed_value(plugins):
    pkt = build(plugins, "pkt", beta=1.0)
    pkt.setup(point_context())
    terms = pkt.loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    assert set(terms) == {"ce", "pkt"}
    assert terms["pkt"].item() == pytest.approx(GOLDEN_PKT, rel=1e-12)
    same = pkt.loss(outs(LOGITS_S, tensor(T)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    assert same["pkt"].item() == pytest.approx(0, abs=1e-15)


def test_cc_matches_hand_computed_value_with_its_embeddings(plugins):
    context = tiny_models()
    cc = build(plugins, "cc", beta=1.0, feat_dim=2)
    modules = cc.setup(context)
    assert [tuple(m.weight.shape) for m in modules] == [(2, 3), (2, 2)]
    w_s, b_s = [[0.5, -1.0, 0.25], [1.0, 0.5, -0.5]], [0.1, -0.2]
    w_t, b_t = [[1.0, -0.5], [0.25, 0.75]], [0.0, 0.3]
    with torch.no_grad():
        cc.embed_s.weight.copy_(tensor(w_s)), cc.embed_s.bias.copy_(tensor(b_s))
        cc.embed_t.weight.copy_(tensor(w_t)), cc.embed_t.bias.copy_(tensor(b_t))
    terms = cc.loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    expected = ref_cc([linear(w_s, b_s, x) for x in S], [linear(w_t, b_t, x) for x in T], 0.4, 2)
    assert expected == pytest.approx(GOLDEN_CC, rel=1e-12)
    assert terms["cc"].item() == pytest.approx(GOLDEN_CC, rel=1e-12)


def test_cc_taylor_kernel_converges_to_the_gaussian_rbf():
    e = torch.nn.functional.normalize(tensor(S), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(e, e).pow(2))
    assert torch.allclose(relation.taylor_rbf(e, 0.4, 15), exact, atol=1e-12)
    assert not torch.allclose(relation.taylor_rbf(e, 0.4, 1), exact, atol=1e-3)


def crd_by_hand(v_s, v_t, mem_s, mem_t, idx, neg, n, temperature, z=None):
    """CRD's loss from its formula, with exp and plain division; returns (loss, (z_s, z_t))."""
    contrast = [[i] + list(row) for i, row in zip(idx, neg)]
    k = len(neg[0])
    c = k / n
    total, zs = 0.0, []
    for d, (anchors, bank) in enumerate(((v_s, mem_t), (v_t, mem_s))):
        raw = [[math.exp(dot(bank[j], a) / temperature) for j in row] for a, row in zip(anchors, contrast)]
        z_d = z[d] if z is not None else n * sum(map(sum, raw)) / sum(map(len, raw))
        zs.append(z_d)
        loss = 0.0
        for row in raw:
            p = [r / z_d for r in row]
            loss -= math.log(p[0] / (p[0] + c)) + sum(math.log(c / (q + c)) for q in p[1:])
        total += loss / len(raw)
    return total, zs


def test_crd_matches_hand_computed_nce_and_updates_its_memory(plugins):
    n = 6
    context = tiny_models(n=n)
    crd = build(plugins, "crd", beta=1.0, feat_dim=2, nce_k=3, nce_t=0.5, nce_m=0.5)
    (head,) = crd.setup(context)
    with torch.no_grad():
        head.embed_s.weight.copy_(tensor([[0.5, -1.0, 0.25], [1.0, 0.5, -0.5]]))
        head.embed_s.bias.copy_(tensor([0.1, -0.2]))
        head.embed_t.weight.copy_(tensor([[1.0, -0.5], [0.25, 0.75]]))
        head.embed_t.bias.copy_(tensor([0.0, 0.3]))
    s, t = tensor(S[:2]), tensor(T[:2])
    idx, neg = [1, 4], [[0, 2, 5], [3, 3, 0]]

    def embed(w, bias, rows):
        return [unit(linear(w.tolist(), bias.tolist(), x)) for x in rows]

    v_s = embed(head.embed_s.weight, head.embed_s.bias, S[:2])
    v_t = embed(head.embed_t.weight, head.embed_t.bias, T[:2])
    mem_s, mem_t = head.memory_s.tolist(), head.memory_t.tolist()
    expected, z = crd_by_hand(v_s, v_t, mem_s, mem_t, idx, neg, n, 0.5)

    crd.begin_batch(torch.tensor(idx), 1, 2, negatives=torch.tensor(neg))
    terms = crd.loss(outs(LOGITS_S[:2], s), outs(LOGITS_T[:2], t), torch.tensor(TARGETS[:2]))
    assert set(terms) == {"ce", "crd"}
    assert terms["crd"].item() == pytest.approx(expected, rel=1e-10)
    assert head.z.tolist() == pytest.approx(z, rel=1e-12)

    # The banks moved halfway toward the new embeddings at the batch's indices, renormalized.
    for bank, old, v in ((head.memory_s, mem_s, v_s), (head.memory_t, mem_t, v_t)):
        for row in range(n):
            want = unit([0.5 * a + 0.5 * b for a, b in zip(old[row], v[idx.index(row)])]) if row in idx else old[row]
            assert bank[row].tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert torch.allclose(bank.norm(dim=1), torch.ones(n, dtype=bank.dtype))

    # Z is estimated once: the next batch reuses it with the updated banks.
    mem_s, mem_t = head.memory_s.tolist(), head.memory_t.tolist()
    expected, _ = crd_by_hand(v_s, v_t, mem_s, mem_t, idx, neg, n, 0.5, z=z)
    crd.begin_batch(torch.tensor(idx), 1, 2, negatives=torch.tensor(neg))
    terms = crd.loss(outs(LOGITS_S[:2], s), outs(LOGITS_T[:2], t), torch.tensor(TARGETS[:2]))
    assert terms["crd"].item() == pytest.approx(expected, rel=1e-10)
    assert head.z.tolist() == pytest.approx(z, rel=1e-12)


def test_crd_bank_scores_by_matmul_equal_the_gathered_rows():
    from kdbench_plugins.distill.relation import bank_scores

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    for n, k in ((40, 30), (400, 3)):  # a bank near the sample's size (matmul), a much larger one (gather)
        memory = torch.randn(n, 8, dtype=torch.float64, generator=gen)
        contrast = torch.randint(0, n, (5, 1 + k), generator=gen)
        want = torch.einsum("bkd,bd->bk", memory[contrast], v)
        got = bank_scores(memory, v, contrast)
        assert torch.allclose(got, want, rtol=1e-12)
        (grad,) = torch.autograd.grad((got * torch.arange(1 + k)).sum(), v)
        (grad_want,) = torch.autograd.grad((want * torch.arange(1 + k)).sum(), v)
        assert torch.allclose(grad, grad_want, rtol=1e-12)


def test_crd_negatives_exclude_the_positive_are_seeded_and_capped(plugins):
    context = tiny_models(n=50, classes=5)
    torch.manual_seed(3)
    crd = build(plugins, "crd", nce_k=200)
    with pytest.warns(UserWarning, match=r"nce_k=200 exceeds the 49 other examples"):
        crd.setup(context)
    assert crd.k == 49
    anchors = torch.arange(50)
    neg = crd.sample_negatives(anchors)
    assert neg.shape == (50, 49) and neg.min() >= 0 and neg.max() < 50
    assert not (neg == anchors.unsqueeze(1)).any()
    assert len(torch.unique(neg)) == 50  # every example serves as a negative somewhere
    torch.manual_seed(3)
    again = build(plugins, "crd", nce_k=10)
    again.setup(context)
    first = again.sample_negatives(anchors)
    torch.manual_seed(3)
    third = build(plugins, "crd", nce_k=10)
    third.setup(context)
    assert torch.equal(first, third.sample_negatives(anchors))  # reproducible from the seed

    labels = context.data.train.tensors[1]
    other = build(plugins, "crd", nce_k=30, negatives="other-class")
    other.setup(context)
    neg = other.sample_negatives(anchors)
    assert neg.shape == (50, 30) and not (labels[neg] == labels.unsqueeze(1)).any()
    assert set(torch.unique(neg).tolist()) == set(range(50))


# ---------------------------------------------------------------- gradients
def test_gradients_of_the_batch_relations_pass_gradcheck():
    s0, t = tensor(S, requires_grad=True), tensor(T)
    assert torch.autograd.gradcheck(lambda s: relation.sp_loss(s, t), (s0,))
    assert torch.autograd.gradcheck(lambda s: relation.pkt_loss(s, t), (s0,))
    assert torch.autograd.gradcheck(lambda s: torch.stack(relation.rkd_losses(s, t)), (s0,))


def model_pair(family, data, student_params, teacher_params, plugins):
    fam_s = plugins.build("model", family, student_params)
    fam_t = plugins.build("model", family, teacher_params)
    torch.manual_seed(0)
    # The teacher keeps requires_grad: the test checks that no method term reaches it.
    student, teacher = fam_s.build(data), fam_t.build(data).eval()
    return student, teacher, fam_s.feature_points(student), fam_t.feature_points(teacher)


def image_data(shape, n=12, classes=5):
    torch.manual_seed(1)
    split = TensorDataset(torch.randn(n, *shape), torch.arange(n) % classes)
    return TaskData(split, split, split, shape, classes)


FAMILIES = {
    # family: (input shape, student params, teacher params, sp's default taps, the others' taps)
    "mlp": ((64,), {"hidden": [16, 8]}, {"hidden": [32]}, ("act2", "act1"), ("act2", "act1")),
    "cnn": ((64,), {"channels": [4, 8], "hidden": 16}, {"channels": [8], "hidden": 0},
            ("block2", "block1"), ("act", "flatten")),
    "resnet": ((3, 8, 8), {"arch": "resnet8"}, {"arch": "resnet14"}, ("layer3", "layer3"), ("pool", "pool")),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_taps_shapes_and_gradients_on_real_families(plugins, family):
    shape, s_params, t_params, sp_taps, deep_taps = FAMILIES[family]
    data = image_data(shape)
    student, teacher, s_points, t_points = model_pair(family, data, s_params, t_params, plugins)
    x, y = data.train.tensors
    for name, params in (("sp", {}), ("rkd", {}), ("pkt", {}), ("cc", {}),
                         ("crd", {"nce_k": 8, "kd_weight": 1.0})):
        distiller = build(plugins, name, **params)
        extra = distiller.setup(DistillContext(student, teacher, data, s_points, t_points))
        taps = (distiller.student_point, distiller.teacher_point)
        assert taps == (sp_taps if name == "sp" else deep_taps), name
        student.zero_grad()
        with capture_features(student, s_points) as s_feats:
            s_logits = student(x)
        with capture_features(teacher, t_points) as t_feats:  # no no_grad: the loss must not need it
            t_logits = teacher(x)
        if name in ("cc", "crd"):
            widths = [m.weight.shape[1] for m in (extra if name == "cc" else [extra[0].embed_s, extra[0].embed_t])]
            assert widths == [s_feats[taps[0]][0].numel(), t_feats[taps[1]][0].numel()]
            distiller.begin_batch(torch.arange(len(x)), 1, 1)
        terms = distiller.loss(Outputs(s_logits, dict(s_feats)), Outputs(t_logits, dict(t_feats)), y)
        assert all(torch.isfinite(v) for v in terms.values())
        for key in [k for k in terms if k not in ("ce", "kd")]:
            student.zero_grad()
            terms[key].backward(retain_graph=True)
            # The method's own term reaches the student's weights below the tap, not the teacher.
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), (name, key)
            assert all(p.grad is None for p in teacher.parameters()), (name, key)
        for module in extra:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


# ---------------------------------------------------------------- robustness and errors
@pytest.mark.parametrize("scale", [1e15, 1e-15, 0.0])
@pytest.mark.parametrize("name", ["sp", "rkd", "pkt", "cc", "crd"])
def test_losses_and_gradients_stay_finite_on_extreme_activations(plugins, name, scale):
    distiller = build(plugins, name, **({"nce_k": 4} if name == "crd" else {}))
    distiller.setup(tiny_models(n=8, dtype=torch.float32))
    torch.manual_seed(2)
    s = (torch.randn(4, 3) * scale).requires_grad_(True)
    t = torch.randn(4, 2) * scale
    distiller.begin_batch(torch.arange(4), 1, 1)
    terms = distiller.loss(Outputs(torch.randn(4, 2), {"f": s}), Outputs(torch.randn(4, 2), {"f": t}),
                           torch.tensor(TARGETS))
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt", "cc"])
def test_a_batch_of_one_is_a_clear_error(plugins, name):
    distiller = build(plugins, name, **({"student_point": "f", "teacher_point": "f"} if name == "sp" else {}))
    distiller.setup(tiny_models() if name == "cc" else point_context())
    with pytest.raises(ValueError, match=rf"{name} compares the examples of a batch .* got a batch of 1"):
        distiller.loss(outs(LOGITS_S[:1], tensor(S[:1])), outs(LOGITS_T[:1], tensor(T[:1])), torch.tensor([0]))


def test_clear_errors_for_taps_parameters_and_call_order(plugins):
    no_points = DistillContext(None, None, None, [], [])
    for name in ("rkd", "pkt", "sp"):
        with pytest.raises(ValueError, match="student model names no feature points"):
            build(plugins, name).setup(no_points)
    with pytest.raises(ValueError, match=r"'act9' is not a feature point of the teacher model"):
        build(plugins, "rkd", teacher_point="act9").setup(point_context())
    with pytest.raises(RuntimeError, match="call setup"):
        build(plugins, "pkt").loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    crd = build(plugins, "crd", nce_k=2)
    crd.setup(tiny_models())
    with pytest.raises(RuntimeError, match="begin_batch"):
        crd.loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    crd.begin_batch(torch.arange(3), 1, 1)
    with pytest.raises(ValueError, match="3 indices for a batch of 4"):
        crd.loss(outs(LOGITS_S, tensor(S)), outs(LOGITS_T, tensor(T)), torch.tensor(TARGETS))
    with pytest.raises(ValueError, match="two classes"):
        build(plugins, "crd", nce_k=2, negatives="other-class").setup(tiny_models(classes=1, labels=[0] * 6))
    bad = [(relation.CRD, {"nce_k": 0}, "nce_k"), (relation.CRD, {"nce_m": 1.0}, "nce_m"),
           (relation.CRD, {"nce_t": 0.0}, "nce_t"), (relation.CC, {"order": 0}, "order"),
           (relation.CC, {"gamma": -1.0}, "gamma"), (relation.SP, {"beta": -1.0}, "beta"),
           (relation.RKD, {"angle_weight": -1.0}, "angle_weight"), (relation.PKT, {"kd_weight": -1.0}, "kd_weight")]
    for cls, kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            cls.Params(**kwargs)


def test_registered_with_category_paper_and_defaults(plugins):
    expected = {"sp": 3000.0, "cc": 0.02, "rkd": 1.0, "pkt": 30000.0, "crd": 0.8}
    for name, beta in expected.items():
        entry = plugins.get("distiller", name)
        assert entry.plugin == "distill-relation"
        cls = entry.cls
        first_author = cls.paper.split(",")[0]
        assert cls.category == "relation" and cls.needs_features and first_author in cls.__doc__
        params = cls.Params()
        assert (params.beta, params.ce_weight, params.kd_weight, params.temperature) == (beta, 1.0, 0.0, 4.0)
    crd = relation.CRD.Params()
    assert (crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_m) == (128, 16384, 0.07, 0.5)
    assert (relation.RKD.Params().distance_weight, relation.RKD.Params().angle_weight) == (25.0, 50.0)


# ---------------------------------------------------------------- a real run
RELATION_RUN = textwrap.dedent("""
    name: tiny-relation
    seeds: [0]
    tasks: [digits]
    pairs:
      - teacher: {name: mlp, hidden: [64]}
        student: {name: mlp, hidden: [16]}
    recipes:
      rkd: [{distill: rkd}]
      sp: [{distill: {name: sp, kd_weight: 0.5}}]
      crd: [{distill: {name: crd, nce_k: 256}}]
    training: {epochs: 2, batch_size: 64}
    measure: {latency_repeats: 2, latency_warmup: 1, latency_batch_sizes: [1]}
""")


def test_relation_distillers_train_students_through_the_runner(plugins, tmp_path, isolated_cache):
    path = tmp_path / "relation.yaml"
    path.write_text(RELATION_RUN)
    experiment = load_experiment(path, plugins)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nce_k fits the data: no capping warning
        with Store(tmp_path / "r.db") as store:
            summary = run_experiment(experiment, store, plugins, isolated_cache, progress=None)
            records = {r.recipe: r for r in store.records(experiment.name) if r.role == "student"}
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    expected_terms = {"rkd": {"ce", "rkd.distance", "rkd.angle"}, "sp": {"ce", "kd", "sp"}, "crd": {"ce", "crd"}}
    for recipe, terms in expected_terms.items():
        history = records[recipe].stages[0]["history"]
        assert len(history) == 2
        for row in history:
            assert {f"loss_{t}" for t in terms} <= set(row) and all(math.isfinite(row[f"loss_{t}"]) for t in terms)
        assert 0 <= records[recipe].metrics["test_accuracy"] <= 1
    # crd trains two 128-wide embeddings of the 16- and 64-wide penultimate features; rkd and sp none.
    assert records["crd"].metrics["extra_train_params"] == (16 + 1) * 128 + (64 + 1) * 128
    assert records["rkd"].metrics["extra_train_params"] == records["sp"].metrics["extra_train_params"] == 0
