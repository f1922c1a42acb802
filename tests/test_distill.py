"""`tlserve train --teacher RUN`: the distillation loss, a student taught by a teacher run and recorded,
a teacher that saw other data refused before training, and `tlserve compare` showing both."""
from __future__ import annotations

import json

import numpy as np
import pytest

STUDENT = ["--data", "synthetic", "--limit", "150", "--cnn-layers", "c8,p,f,d16", "--epochs", "2", "--data-check", "off",
           "--no-calibrate"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import train_run

    runs = tmp_path_factory.mktemp("distill-runs")
    train_run(runs, "teacher", limit=150, backbone="cnn", cnn_layers="c16,p,c32,p,f,d32", epochs=3, data_check="off",
              calibrate=False)
    return runs


def test_loss_mixes_labels_and_softened_teacher():
    from training.fit.distill import distillation_loss
    from training.env import tf

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32)
    labels = np.array([0, 1], np.float32)
    teacher = np.array([[0.5, 0.4, 0.1], [0.2, 0.6, 0.2]], np.float32)
    packed = lambda w: np.concatenate([labels[:, None], np.full((2, 1), w, np.float32), teacher], axis=1)  # noqa: E731
    hard = -np.log(probs[[0, 1], [0, 1]])
    # weight 0: the labels alone; a plain label batch (validation, test): the labels alone too.
    np.testing.assert_allclose(distillation_loss(3, 4.0, 0.0, 0.0)(tf().constant(packed(1)), probs), hard, rtol=1e-5)
    np.testing.assert_allclose(distillation_loss(3, 4.0, 0.7, 0.0)(tf().constant(labels), probs), hard, rtol=1e-5)
    # weight 1: T^2 KL between the softened distributions (softmax(log p / T)), zero when they agree.
    t = 2.0
    soft = lambda p: np.exp(np.log(p) / t) / np.exp(np.log(p) / t).sum(1, keepdims=True)  # noqa: E731
    kl = (soft(teacher) * np.log(soft(teacher) / soft(probs))).sum(1) * t * t
    np.testing.assert_allclose(distillation_loss(3, t, 1.0, 0.0)(tf().constant(packed(1)), probs), kl, rtol=1e-4)
    same = np.concatenate([labels[:, None], np.ones((2, 1), np.float32), probs], axis=1)
    np.testing.assert_allclose(distillation_loss(3, t, 1.0, 0.0)(tf().constant(same), probs), 0, atol=1e-6)
    # The class weight in the targets scales each image's loss.
    np.testing.assert_allclose(distillation_loss(3, t, 0.5, 0.0)(tf().constant(packed(2)), probs),
                               2 * distillation_loss(3, t, 0.5, 0.0)(tf().constant(packed(1)), probs), rtol=1e-5)


def test_student_learns_from_teacher_and_records_it(run_cli, teacher, tmp_path):
    result = run_cli("train", *STUDENT, "--teacher", "teacher", "--distill-temperature", "3", "--distill-weight", "0.6",
                     "--name", "student", "--runs-dir", teacher, "--class-weight", "balanced", "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    d = record["distillation"]
    teacher_record = json.loads((teacher / "teacher" / "record.json").read_text())
    assert d["teacher"] == "teacher" and d["temperature"] == 3 and d["weight"] == 0.6
    assert d["teacher_test_accuracy"] == teacher_record["test"]["accuracy"] and not d["cache_reused"]
    assert record["config"]["teacher"] == "teacher" and record["config"]["distill_weight"] == 0.6
    assert "probabilities on 150 training images computed once" in result.err
    # The teacher's probabilities are on disk for the next student: the same images read them back.
    cached = np.load(d["cache"])
    assert cached.shape == (150, 10) and np.allclose(cached.sum(axis=1), 1, atol=1e-4)
    assert d["train_label_agreement"] == pytest.approx(float(np.mean(cached.argmax(1) == _train_labels())), abs=1e-6)
    # val_loss is the plain cross-entropy on labels, comparable with a run trained without a teacher.
    assert all(np.isfinite(row["val_loss"]) for row in record["history"])
    again = run_cli("train", *STUDENT, "--teacher", "teacher", "--name", "student2", "--runs-dir", teacher, "--json")
    assert again.code == 0 and json.loads(again.out)["distillation"]["cache_reused"]

    report = run_cli("compare", "teacher", "student", "--runs-dir", teacher, "--out", tmp_path / "report")
    assert report.code == 0, report.err
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Distillation: student beside teacher" in text
    row = next(line for line in text.splitlines() if line.startswith("| student | teacher |") and "acc" not in line)
    assert f"{record['test']['accuracy']:.4f}" in row and f"{teacher_record['test']['accuracy']:.4f}" in row
    assert "Distilled: student" in report.out


def _train_labels():
    from training.config import DataConfig
    from training.data.sources import load_dataset

    return load_dataset(DataConfig(limit=150)).train.y


@pytest.mark.parametrize("options, message", [
    (["--seed", "3"], "was trained on other data: seed 0 (here 3)"),
    (["--classes", "0-4"], "was trained on other data: classes None (here '0-4')"),
    (["--data", "folder:/nonexistent"], "was trained on other data: spec"),
    (["--teacher", "nobody"], "no run named 'nobody'"),
    (["--distill-weight", "1.5"], "--distill-weight between 0 and 1"),
])
def test_teacher_on_other_data_is_refused_before_training(run_cli, teacher, options, message):
    result = run_cli("train", *STUDENT, "--teacher", "teacher", *options, "--name", "refused", "--runs-dir", teacher)
    assert result.code == 2 and message in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (teacher / "refused").exists() and not (teacher / ".refused.partial").exists()


# --augment-views: consistent teaching (the teacher's probabilities on the views the student trains on)

def _picture(size: int) -> np.ndarray:
    """One smooth, asymmetric picture drawn at `size`: the same scene at any resolution."""
    t = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(t, t, indexing="ij")
    disc = ((xx - 0.3) ** 2 + (yy - 0.4) ** 2 < 0.04) * 200.0
    img = np.stack([disc + 40 * xx, 255 * yy * (1 - xx), 120 + 100 * np.sin(6 * xx + 2 * yy)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)[None]


@pytest.mark.parametrize("policy", ["seed", "flip-crop"])
def test_a_view_is_the_same_view_at_any_size(policy):
    from training.data import views

    params = views.draw(policy, 1, 6, seed=3)
    assert params.shape == (1, 6, 5) and np.array_equal(params, views.draw(policy, 1, 6, seed=3))
    assert not np.array_equal(params, views.draw(policy, 1, 6, seed=4)) and params[0, :, 0].any()
    big, small = _picture(64), _picture(32)
    for k in range(6):
        v_big = views.render(big, params[:, k])[0].astype(float)
        v_small = views.render(small, params[:, k])[0].astype(float)
        shrunk = v_big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        # the 64-px view shrunk to 32 px is the 32-px view (up to resampling), a mirrored one far from the picture
        assert np.abs(shrunk - v_small).mean() < 4, k
        if params[0, k, 0]:
            assert np.abs(v_small - small[0]).mean() > 20, k
    same = np.array([[0, 0, 1, 0, 0]], np.float32)
    mirror = np.array([[1, 0, 1, 0, 0]], np.float32)
    assert np.array_equal(views.render(small, same), small)
    assert np.array_equal(views.render(small, mirror), small[:, :, ::-1])


def test_an_epoch_takes_one_view_of_each_image():
    from training.data.sources import epoch_batches

    n, k = 10, 4
    x = np.arange(n * k, dtype=np.float32).reshape(n * k, 1)  # row i * k + j: image i's view j
    y = np.repeat(np.arange(n), k)
    seen = []
    for epoch in (0, 1):
        rows = np.concatenate([xb.numpy()[:, 0] for xb, _ in epoch_batches(x, y, 3, seed=7, epochs=range(epoch, epoch + 1),
                                                                          views=k)]).astype(int)
        assert sorted(rows // k) == list(range(n))  # every image once
        assert all(y[r] == r // k for r in rows)
        seen.append(rows)
    again = np.concatenate([xb.numpy()[:, 0] for xb, _ in epoch_batches(x, y, 3, seed=7, epochs=range(1, 2), views=k)])
    assert np.array_equal(again.astype(int), seen[1])  # an epoch's views depend on (seed, epoch) alone
    assert not np.array_equal(seen[0] % k, seen[1] % k) or not np.array_equal(seen[0], seen[1])


def test_student_learns_from_the_teacher_on_its_own_views(run_cli, teacher):
    views_k = 3
    options = [*STUDENT, "--teacher", "teacher", "--augment-views", str(views_k), "--runs-dir", teacher, "--json"]
    result = run_cli("train", *options, "--name", "viewed")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    d, facts = record["distillation"], record["training"]["augment_views"]
    assert record["config"]["augment_views"] == views_k and d["views"] == views_k and d["views_policy"] == "seed"
    assert facts["views"] == views_k and facts["images"] == 150 * views_k and d["views_recipe"] == facts["recipe"]
    said = " ".join(result.err.split())  # the log wraps long lines
    assert f"probabilities on {views_k} views of each of 150 training images computed once" in said
    # The cache holds the teacher's probabilities on each view, row i * K + k, and they are what the
    # teacher says about that very view (not about the plain image).
    from training.config import DataConfig
    from training.data import views
    from training.data.sources import load_dataset
    from training.model.build import load_model

    cached = np.load(d["cache"])
    assert cached.shape == (150 * views_k, 10)
    train = load_dataset(DataConfig(limit=150)).train
    params = views.draw("seed", 150, views_k, seed=0)
    model = load_model(teacher / "teacher" / "model.keras")
    rows = [0, 1, 2, 3 * views_k + 1]
    rendered = np.stack([views.render(train.x[[r // views_k]], params[r // views_k, [r % views_k]])[0] for r in rows])
    np.testing.assert_allclose(cached[rows], model.predict(rendered.astype(np.float32), verbose=0), atol=1e-4)
    plain = model.predict(train.x[[0]].astype(np.float32), verbose=0)
    assert not np.allclose(cached[:views_k], plain, atol=1e-4)
    # Another training seed on the same split (--split-seed): the teacher is accepted, the views are new.
    other = run_cli("train", *options, "--name", "viewed-s1", "--seed", "1", "--split-seed", "0")
    assert other.code == 0, other.err
    o = json.loads(other.out)
    assert o["config"]["seed"] == 1 and o["config"]["split_seed"] == 0 and o["config"]["data"]["seed"] == 0
    assert o["distillation"]["views_recipe"] != d["views_recipe"] and not o["distillation"]["cache_reused"]
    again = run_cli("train", *options, "--name", "viewed-again")
    assert again.code == 0 and json.loads(again.out)["distillation"]["cache_reused"]


def test_the_cnn_alone_trains_on_the_same_views(run_cli, teacher):
    result = run_cli("train", *STUDENT, "--augment-views", "2", "--augment-policy", "flip-crop", "--name", "alone-views",
                     "--runs-dir", teacher, "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert record.get("distillation") is None
    assert record["training"]["augment_views"]["views"] == 2 and record["training"]["augment_views"]["policy"] == "flip-crop"
    assert record["training"]["augment_views"]["images"] == 300
    assert "augmented views: 2 per training image (flip-crop)" in " ".join(result.err.split())


@pytest.mark.parametrize("options, message", [
    (["--augment-views", "-1"], "--augment-views must be between 0 (off) and 256"),
    (["--augment-views", "257"], "--augment-views must be between 0 (off) and 256"),
    (["--augment-views", "4", "--augment"], "--augment-views and --augment: pick one"),
    (["--augment-views", "4", "--split-seed", "2"], "was trained on other data: seed 0 (here 2)"),
])
def test_bad_views_or_split_are_refused_before_training(run_cli, teacher, options, message):
    result = run_cli("train", *STUDENT, "--teacher", "teacher", *options, "--name", "refused", "--runs-dir", teacher)
    assert result.code == 2 and message in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (teacher / "refused").exists() and not (teacher / ".refused.partial").exists()


def test_views_that_would_not_fit_in_memory_are_refused_before_rendering(run_cli, teacher, monkeypatch):
    import collections

    import psutil

    free = collections.namedtuple("mem", "available")(2 * 2**20)  # 2 MB free: 150 images x 8 views do not fit
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    result = run_cli("train", *STUDENT, "--augment-views", "8", "--name", "too-many", "--runs-dir", teacher)
    assert result.code == 2 and "--augment-views 8: 8 views of 150 training images" in result.err and "MB free" in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (teacher / "too-many").exists() and not (teacher / ".too-many.partial").exists()


def test_render_all_lays_out_image_i_view_k_at_row_i_k():
    from training.data import views

    x = np.random.default_rng(0).integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    params = views.draw("seed", 5, 3, seed=1)
    out = views.render_all(x, params)
    assert out.shape == (15, 12, 10, 3) and out.dtype == x.dtype and out.nbytes == 3 * x.nbytes
    for i, k in ((0, 0), (2, 1), (4, 2)):
        np.testing.assert_array_equal(out[i * 3 + k], views.render(x, params[:, k])[i])


def test_tune_refuses_views(run_cli, tmp_path):
    result = run_cli("tune", "--data", "synthetic", "--limit", "50", "--augment-views", "2", "--space", "lr=1e-4..1e-2:log",
                     "--trials", "1", "--out", tmp_path / "study", "--runs-dir", tmp_path)
    assert result.code == 2 and "tune does not search with --augment-views" in result.err, result.err


# Stronger views: inception crops and mixup ("function matching"), the teacher asked about the mixed image

@pytest.mark.parametrize("policy", ["crop", "mixup", "crop-mixup"])
def test_crop_and_mixup_views_are_drawn_once_from_the_seed(policy):
    from training.config import VIEW_POLICIES
    from training.data import views

    n, k = 20, 8
    params = views.draw(policy, n, k, seed=3)
    assert params.shape == (n, k, 8) and np.array_equal(params, views.draw(policy, n, k, seed=3))
    assert not np.array_equal(params, views.draw(policy, n, k, seed=4))
    flip, zoom, dx, dy, zoom_y, partner, lam = (params[..., i] for i in (0, 2, 3, 4, 5, 6, 7))
    assert flip.any() and not flip.all()
    if "crop" in policy:  # a window of 35-100% of the area, aspect 3/4-4/3, inside the image
        area, aspect = zoom * zoom_y, zoom / zoom_y
        assert (area >= 0.35 - 1e-5).all() and (area <= 1 + 1e-5).all() and area.min() < 0.5
        assert (zoom <= 1).all() and (zoom_y <= 1).all() and (aspect <= 4 / 3 + 1e-4).all() and (aspect >= 0.75 - 1e-4).all()
        assert (np.abs(dx) <= (1 - zoom) / 2 + 1e-6).all() and (np.abs(dy) <= (1 - zoom_y) / 2 + 1e-6).all()
    else:  # seed's geometry, drawn as seed draws it
        np.testing.assert_array_equal(params[..., :5], views.draw("seed", n, k, seed=3))
    if "mixup" in policy:  # a partner that is another image, lam in [0, 1]
        assert (partner >= 0).all() and (partner < n).all() and (partner != np.arange(n)[:, None]).all()
        assert (lam >= 0).all() and (lam <= 1).all() and lam.std() > 0.1
    else:
        assert (partner == -1).all() and (lam == 1).all()
    # Every policy keys the teacher's cache apart, and so does the seed.
    keys = {views.recipe_key(p, views.draw(p, n, k, seed=3)) for p in VIEW_POLICIES}
    assert len(keys) == len(VIEW_POLICIES)
    assert views.recipe_key(policy, params) != views.recipe_key(policy, views.draw(policy, n, k, seed=4))


def test_a_crop_is_the_same_crop_at_any_size_and_a_mixed_view_mixes_two():
    from training.data import views

    big, small = _picture(64), _picture(32)
    params = views.draw("crop", 1, 6, seed=1)
    for k in range(6):
        shrunk = views.render(big, params[:, k])[0].astype(float).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(shrunk - views.render(small, params[:, k])[0].astype(float)).mean() < 4, k
    # A window of the top-left quarter, stretched: the picture's top-left quarter at twice the size.
    quarter = np.array([[0, 0, 0.5, -0.25, -0.25, 0.5, -1, 1]], np.float32)
    zoomed = views.render(big, quarter)[0].astype(float)
    assert np.abs(zoomed[::2, ::2] - big[0, :32, :32]).mean() < 6
    # Mixed views: lam * view of i + (1 - lam) * the same view of the partner, at any size.
    x = np.concatenate([_picture(32), 255 - _picture(32), _picture(32)[:, ::-1]])
    p = np.array([[1, 0.1, 0.9, 0.05, 0, 0.9, 1, 0.3], [0, 0, 1, 0, 0, 1, 2, 0.8], [0, 0, 1, 0, 0, 1, -1, 1]], np.float32)
    mixed = views.render(x, p).astype(float)
    alone = views.render(x, p[:, :6]).astype(float)
    partner = views.render(x[[1, 2, 2]], p[:, :6]).astype(float)
    for i in (0, 1):
        np.testing.assert_allclose(mixed[i], p[i, 7] * alone[i] + (1 - p[i, 7]) * partner[i], atol=1.01)
    np.testing.assert_array_equal(mixed[2], alone[2])
    all_views = views.render_all(x, np.stack([p, p[[1, 2, 0]]], axis=1))
    np.testing.assert_array_equal(all_views[0], mixed[0])  # image i's view k at row i * K + k
    # Their labels are mixed alike: lam of the image's own class, 1 - lam of the partner's.
    soft = views.mixed_labels(np.array([0, 2, 1]), p[:, None], 3)
    np.testing.assert_allclose(soft, [[0.3, 0, 0.7], [0, 0.2, 0.8], [0, 1, 0]], atol=1e-6)


def test_mixed_labels_loss_alone_and_with_a_teacher():
    from training.fit.distill import distillation_loss, label_targets
    from training.env import tf

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32)
    soft = np.array([[0.6, 0.4, 0], [0, 0.25, 0.75]], np.float32)
    teacher = np.array([[0.5, 0.4, 0.1], [0.2, 0.6, 0.2]], np.float32)
    packed = label_targets(soft, {0: 2.0, 1: 1.0, 2: 1.0})
    np.testing.assert_allclose(packed[:, :2], [[0, 0.6 * 2 + 0.4], [2, 1]], rtol=1e-6)  # larger part's label, mixed weight
    cross = -(soft * np.log(probs)).sum(1) * packed[:, 1]
    alone = distillation_loss(3, 1.0, 1.0, 0.0, soft_labels=True, teacher=False)
    np.testing.assert_allclose(alone(tf().constant(packed), probs), cross, rtol=1e-5)
    np.testing.assert_allclose(alone(tf().constant(np.array([0, 1], np.float32)), probs), -np.log([0.7, 0.8]), rtol=1e-5)
    both = np.concatenate([packed, teacher], axis=1)
    student = lambda w: distillation_loss(3, 1.0, w, 0.0, soft_labels=True, teacher=True)(tf().constant(both), probs)  # noqa: E731
    np.testing.assert_allclose(student(0.0), cross, rtol=1e-5)
    kl = (teacher * np.log(teacher / probs)).sum(1) * packed[:, 1]
    np.testing.assert_allclose(student(1.0), kl, rtol=1e-4)


def test_student_and_alone_on_mixed_views(run_cli, teacher):
    options = [*STUDENT, "--augment-views", "2", "--augment-policy", "crop-mixup", "--runs-dir", teacher, "--json"]
    alone = run_cli("train", *options, "--name", "alone-mixup", "--class-weight", "balanced")
    assert alone.code == 0, alone.err
    a = json.loads(alone.out)
    assert a["training"]["augment_views"]["policy"] == "crop-mixup" and a["training"]["augment_views"]["images"] == 300
    student = run_cli("train", *options, "--teacher", "teacher", "--distill-weight", "0.5", "--name", "student-mixup")
    assert student.code == 0, student.err
    d = json.loads(student.out)["distillation"]
    assert d["views_policy"] == "crop-mixup" and d["views_recipe"] == a["training"]["augment_views"]["recipe"]
    # The teacher's probabilities are on the mixed views themselves, cached apart from the seed policy's.
    from training.config import DataConfig
    from training.data import views
    from training.data.sources import load_dataset
    from training.model.build import load_model

    cached = np.load(d["cache"])
    train = load_dataset(DataConfig(limit=150)).train
    params = views.draw("crop-mixup", 150, 2, seed=0)
    rows = [0, 3, 7]
    rendered = np.stack([views.render(train.x, params[:, r % 2])[r // 2] for r in rows])
    model = load_model(teacher / "teacher" / "model.keras")
    np.testing.assert_allclose(cached[rows], model.predict(rendered.astype(np.float32), verbose=0), atol=1e-4)
    seed_views = run_cli("train", *STUDENT, "--augment-views", "2", "--teacher", "teacher", "--runs-dir", teacher, "--json",
                         "--name", "student-seed-views")
    assert seed_views.code == 0, seed_views.err
    s = json.loads(seed_views.out)["distillation"]
    assert s["views_recipe"] != d["views_recipe"] and s["cache"] != d["cache"] and not s["cache_reused"]


@pytest.mark.parametrize("options, message", [
    (["--augment-policy", "mixup"], "--augment-policy mixup draws fixed views: give --augment-views K"),
    (["--augment-policy", "crop", "--augment"], "--augment-policy crop draws fixed views"),
    (["--augment-views", "4", "--augment-policy", "mixupp"], "unknown --augment-policy 'mixupp'"),
])
def test_bad_views_policy_is_one_line_and_exit_2(run_cli, teacher, options, message):
    result = run_cli("train", *STUDENT, *options, "--name", "refused", "--runs-dir", teacher)
    assert result.code == 2 and message in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (teacher / "refused").exists()
