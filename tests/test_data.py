"""Data sources: generated, CIFAR-10 pickles and tarball, image folders, the real sets in shared/."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED
from training.config import DataConfig
from training.data.sources import CIFAR10_CLASSES, load_dataset, make_synthetic, parse_classes
from serving.base.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier: pytest -m 'not slow'


def test_synthetic_is_deterministic_balanced_uint8():
    a = load_dataset(DataConfig(spec="synthetic", seed=3))
    b = load_dataset(DataConfig(spec="synthetic", seed=3))
    c = load_dataset(DataConfig(spec="synthetic", seed=4))
    assert np.array_equal(a.train.x, b.train.x) and not np.array_equal(a.train.x, c.train.x)
    assert a.train.x.dtype == np.uint8 and a.train.x.shape == (2000, 32, 32, 3)
    assert np.bincount(a.train.y).tolist() == [200] * 10
    assert not np.array_equal(a.train.x, a.test.x[: len(a.train.x)])
    x, _, _ = make_synthetic(10, seed=0, image_size=64)
    assert x.shape == (10, 64, 64, 3)


def test_classes_select_and_reindex():
    ds = load_dataset(DataConfig(spec="synthetic", classes="5-9", limit=100))
    assert ds.class_names == ["hbar", "vbar", "diagonal", "checker", "dots"]
    assert set(np.unique(ds.train.y)) == set(range(5)) and len(ds.train) == 100
    assert parse_classes("cat,dog", CIFAR10_CLASSES) == [3, 5]
    assert parse_classes("9,0", CIFAR10_CLASSES) == [9, 0]
    for bad in ("0-10", "11", "ca", "cat,cat", "3"):
        with pytest.raises(UserError):
            parse_classes(bad, CIFAR10_CLASSES)


def _cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))})


def _write_batches(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(_cifar_batch(20, i))
    (folder / "test_batch").write_bytes(_cifar_batch(30, 9))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_CLASSES]}))


def test_cifar10_batches_folder_and_tarball(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    _write_batches(batches)
    ds = load_dataset(DataConfig(spec=f"cifar10:{batches}", val_split=0.1))
    assert ds.class_names == CIFAR10_CLASSES and ds.image_size == (32, 32)
    assert len(ds.train) + len(ds.val) == 100 and len(ds.test) == 30 and len(ds.val) > 0
    # CHW rows become HWC images
    raw = pickle.loads((batches / "test_batch").read_bytes())[b"data"][0]
    assert np.array_equal(ds.test.x[0], raw.reshape(3, 32, 32).transpose(1, 2, 0))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    from_tar = load_dataset(DataConfig(spec=f"cifar10:{archive}", val_split=0.1))
    assert np.array_equal(from_tar.test.x, ds.test.x) and np.array_equal(from_tar.train.y, ds.train.y)


def test_cifar10_download_failure_is_one_line(monkeypatch):
    from training.env import keras

    def offline():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/...: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras().datasets.cifar10, "load_data", offline)
    with pytest.raises(UserError, match="cifar10:PATH"):
        load_dataset(DataConfig(spec="cifar10"))


def _png(path: Path, size: tuple[int, int], colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 255 - colour, 0)).save(path)


def test_folder_skips_non_images_and_corrupt_files(tmp_path):
    root = tmp_path / "leaves"
    for cls, colour in (("healthy", 10), ("sick", 200)):
        for i in range(10):
            _png(root / cls / f"{i}.png", (40 + i, 30), colour)  # mixed sizes
    (root / "SOURCES.md").write_text("licences")
    (root / "healthy" / ".DS_Store").write_bytes(b"\0\1")
    (root / "empty").mkdir()
    (root / "sick" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = load_dataset(DataConfig(spec=f"folder:{root}", val_split=0.2))
    assert ds.class_names == ["healthy", "sick"]
    assert ds.image_size == (224, 224)  # sizes disagree
    assert list(ds.skipped) == ["sick/broken.jpg"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20
    assert ds.train.x.shape[1:] == (224, 224, 3)
    sized = load_dataset(DataConfig(spec=f"folder:{root}", image_size=48))
    assert sized.image_size == (48, 48)


def test_corrupt_file_is_reported_by_name(tmp_path):
    root = tmp_path / "set"
    for cls in ("a", "b"):
        for i in range(4):
            _png(root / cls / f"{i}.png", (16, 16), 50 if cls == "a" else 150)
    (root / "b" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = load_dataset(DataConfig(spec=f"folder:{root}", val_split=0.0))
    assert list(ds.skipped) == ["b/zz-broken.png"]
    assert ds.image_size == (16, 16)
    assert len(ds.train) + len(ds.test) == 8


def test_folder_with_split_subfolders(tmp_path):
    root = tmp_path / "split"
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("x", "y", "z"):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", (20, 20), 30)
    ds = load_dataset(DataConfig(spec=f"folder:{root}", val_split=0.34))
    assert ds.class_names == ["x", "y", "z"] and len(ds.test) == 9
    assert len(ds.train) + len(ds.val) == 18 and len(ds.val) == 6
    assert "train/test" in ds.source


@pytest.mark.parametrize("spec, message", [
    ("folder:/nonexistent/tlserve", "no such folder"),
    ("cifar10:/nonexistent/tlserve", "no such file"),
    ("mnist", "unknown --data"),
    ("folder:", "unknown --data"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_dataset(DataConfig(spec=spec))


def test_bad_numbers_and_not_cifar(tmp_path):
    with pytest.raises(UserError, match="--limit"):
        load_dataset(DataConfig(spec="synthetic", limit=0))
    with pytest.raises(UserError, match="--val-split"):
        load_dataset(DataConfig(spec="synthetic", val_split=1.0))
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="data_batch"):
        load_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'junk'}"))


BANANA = SHARED / "datasets" / "banana-leaf"
CIFAR_JPG = SHARED / "datasets" / "cifar10-jpg"


@pytest.mark.skipif(not BANANA.is_dir(), reason="shared/datasets/banana-leaf is not beside this checkout")
def test_real_banana_leaf_loads():
    ds = load_dataset(DataConfig(spec=f"folder:{BANANA}", limit=25))
    assert ds.class_names == ["cordana-leaf-spot", "dead", "healthy", "panama-disease", "sigatoka"]
    assert ds.image_size == (224, 224)  # mixed sizes → 224
    assert (len(ds.train), len(ds.val), len(ds.test)) == (25, 25, 25) and not ds.skipped
    assert set(np.unique(ds.train.y)) == set(range(5))


@pytest.mark.skipif(not CIFAR_JPG.is_dir(), reason="shared/datasets/cifar10-jpg is not beside this checkout")
def test_real_cifar10_jpg_loads():
    ds = load_dataset(DataConfig(spec=f"folder:{CIFAR_JPG}", limit=40))
    assert ds.class_names == CIFAR10_CLASSES and ds.image_size == (32, 32)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 40, 40)
    assert np.bincount(ds.test.y).tolist() == [4] * 10
    cats = load_dataset(DataConfig(spec=f"folder:{CIFAR_JPG}", classes="cat,dog", limit=10))
    assert cats.class_names == ["cat", "dog"] and len(cats.test) == 10


def test_data_sample_writes_every_class_and_refuses_to_overwrite(tmp_path, run_cli):
    out = tmp_path / "examples"
    result = run_cli("data", "sample", "--data", "synthetic", "--per-class", "2", "--out", out)
    assert result.code == 0, result.err
    from training.data.sources import SYNTHETIC_CLASSES

    assert sorted(p.name for p in out.iterdir()) == sorted(SYNTHETIC_CLASSES)
    assert all(len(list((out / c).glob("*.png"))) == 2 for c in SYNTHETIC_CLASSES)
    before = sorted(out.rglob("*.png"))
    again = run_cli("data", "sample", "--data", "synthetic", "--out", out)
    assert again.code == 2 and "exists" in again.err and "Traceback" not in again.err
    assert sorted(out.rglob("*.png")) == before
    bad = run_cli("data", "sample", "--data", "synthetic", "--split", "tst", "--out", tmp_path / "x")
    assert bad.code == 2 and "nearest: test" in bad.err and not (tmp_path / "x").exists()
