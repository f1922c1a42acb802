"""Knowledge distillation: `tlserve train --teacher RUN` trains the student on a mix of the hard labels
and the teacher's softened probabilities (Hinton et al., 2015):

    loss = (1 - w) * CE(label, p_student) + w * T^2 * KL(softmax(log p_teacher / T) || softmax(log p_student / T))

with T = --distill-temperature and w = --distill-weight. Both models end in a softmax, so log p is the
logits up to a constant, and dividing it by T softens it exactly as dividing the logits would.

The teacher's probabilities on the training images are computed once per run (and kept on disk under
runs/.teacher-cache/, keyed by the teacher's model file and the images, for the next student): the
teacher is one of our runs, so it takes raw pixels at its own data's image size, and when the student
loads the data at another size the teacher's images are loaded again at the teacher's.

With --augment-views K the student trains on K fixed augmented views of each image (training.data.views)
and the teacher's probabilities are taken on each of those views, rendered at the teacher's size with
the same geometry: the student matches the teacher's function on the very inputs it sees ("consistent
teaching", Beyer et al., CVPR 2022), not the teacher's opinion of an unaugmented image. They are
cached like the plain ones, keyed by the views' recipe as well.

With a mixing --augment-policy (mixup, crop-mixup) a view is two images mixed, lam * i + (1 - lam) * j,
the teacher's probabilities are taken on that mixed image, and the hard term's label is the mixed one,
lam * onehot(y_i) + (1 - lam) * onehot(y_j); the CNN alone trains on the same views with those mixed
labels (`label_targets`), the fair baseline.

They travel with the labels: a training batch's targets are [label, class weight, teacher's
probabilities...] (with mixing: [label, class weight, mixed label..., teacher's probabilities...],
the label being the larger part's, for the training accuracy) and the loss unpacks them; validation and test batches carry the plain label, for
which the loss is the ordinary cross-entropy (so val_loss, early stopping and the test loss compare
with runs trained without a teacher).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import storage
from serving.base.errors import UserError
from serving.base.manifest import sha256_file
from training.config import TrainConfig
from training.data import sources as datasets, views
from training.env import keras, tf
from training.fit import optim
from training.record import records

Log = Callable[[str], None]
CACHE = ".teacher-cache"
_SPLIT_KEYS = ("spec", "classes", "val_split", "limit", "seed")  # what decides which image is in which split


@dataclass
class Distilled:
    targets: np.ndarray          # (n, 2 + classes) float32: label, class weight, teacher probabilities
    facts: dict[str, Any]        # the record's distillation section


def check_teacher(cfg: TrainConfig, runs_dir: Path | None) -> records.Run:
    """The teacher run, if it saw the very splits this run will (same data source, classes, split
    seed and sizes): else its probabilities would come from images it was tested on, or on other
    classes. One line before any data loads."""
    teacher = records.load_run(cfg.teacher, runs_dir)
    theirs = dict(teacher.record.config.get("data") or {})
    ours = dataclasses.asdict(cfg.data)
    differ = [key for key in _SPLIT_KEYS if _same(key, theirs.get(key)) != _same(key, ours.get(key))]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} (here {ours.get(k)!r})" for k in differ)
        raise UserError(f"--teacher {cfg.teacher} was trained on other data: {shown}; a teacher must have seen the "
                        "same data source, classes and split")
    return teacher


def _same(key: str, value: Any) -> Any:
    """A data option as compared: folder paths resolved, so ./data and data/ are one source."""
    if key == "spec" and isinstance(value, str) and value.startswith("folder:"):
        return "folder:" + str(Path(value.partition(":")[2]).resolve())
    return value


def targets(cfg: TrainConfig, dataset, teacher: records.Run, weights: dict[int, float] | None, runs_dir: Path | None,
            log: Log, augmented=None) -> Distilled:
    """The packed training targets, the teacher's probabilities from the cache or computed now. With
    --augment-views (`augmented`: training.fit.train.Augmented), one row per view: the teacher's
    probabilities on that very view, rendered at the teacher's size."""
    if list(teacher.record.data.class_names) != list(dataset.class_names):
        raise UserError(f"--teacher {teacher.name} knows classes {teacher.record.data.class_names}, this data "
                        f"{dataset.class_names}; a teacher must have the student's classes in the same order")
    t0 = time.perf_counter()
    x = _teacher_images(cfg, dataset, teacher, log)
    model_file = teacher.model_path
    recipe = "" if augmented is None else augmented.facts["recipe"]  # hashed once, in train.augmented_views
    key = hashlib.sha256(f"{sha256_file(model_file)} {x.shape} {recipe}".encode() +
                         hashlib.sha256(np.ascontiguousarray(x)).digest()).hexdigest()[:20]
    cached = storage.runs_dir(runs_dir) / CACHE / f"{teacher.name}-{key}.npy"
    if cached.is_file():
        probs, reused = np.load(cached), True
    else:
        probs, reused = _predict(model_file, x, None if augmented is None else augmented.params), False
        storage.write_bytes(cached, _npy_bytes(probs))
    seconds = time.perf_counter() - t0
    k = 1 if augmented is None else augmented.params.shape[1]
    soft = None if augmented is None else augmented.soft   # a mixing policy's mixed labels
    labels = np.repeat(dataset.train.y, k) if soft is None else soft.argmax(axis=1)
    agree = float(np.mean(probs.argmax(axis=1) == labels))
    what = f"{len(probs)} training images" if k == 1 else f"{k} views of each of {len(dataset.train)} training images"
    log(f"teacher {teacher.name}: probabilities on {what} "
        f"{'read from its cache' if reused else 'computed once'} in {seconds:.1f}s; it agrees with "
        f"{agree:.1%} of the labels")
    if soft is None:
        w = np.array([(weights or {}).get(int(c), 1.0) for c in labels], np.float32)
        packed = np.concatenate([labels[:, None].astype(np.float32), w[:, None], probs.astype(np.float32)], axis=1)
    else:
        packed = np.concatenate([label_targets(soft, weights), probs.astype(np.float32)], axis=1)
    rec = teacher.record
    facts = {"teacher": teacher.name, "teacher_backbone": rec.model.backbone, "teacher_strategy": rec.model.strategy,
             "teacher_test_accuracy": rec.test.accuracy, "teacher_params": rec.model.total_params,
             "teacher_input_shape": list(rec.model.input_shape), "temperature": cfg.distill_temperature,
             "weight": cfg.distill_weight, "views": k if augmented is not None else 0,
             "views_policy": cfg.augment_policy if augmented is not None else None, "views_recipe": recipe or None,
             "train_label_agreement": round(agree, 6), "cache": str(cached), "cache_reused": reused,
             "seconds": round(seconds, 4)}
    return Distilled(packed, facts)


def _teacher_images(cfg: TrainConfig, dataset, teacher: records.Run, log: Log) -> np.ndarray:
    """The student's training images as the teacher takes them: at the teacher's data size."""
    size = tuple(int(v) for v in teacher.record.model.input_shape[:2])
    if size == tuple(dataset.image_size):
        return dataset.train.x
    log(f"teacher {teacher.name} takes {size[0]}x{size[1]} images: loading the training images again at that size")
    again = datasets.load_dataset(dataclasses.replace(cfg.data, image_size=size[0]))
    if tuple(again.image_size) != size:
        raise UserError(f"--teacher {teacher.name} takes {size[0]}x{size[1]} images and this data loads at "
                        f"{again.image_size[0]}x{again.image_size[1]}")
    where = {name: i for i, name in enumerate(again.train.ids())}
    return again.train.x[[where[name] for name in dataset.train.ids()]]


def _predict(model_file: Path, x: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """The teacher's probabilities on x, or, given the views' params (n, K, 5), on each view of each
    image ((n * K, classes), image i's view k at row i * K + k), rendered one view index at a time."""
    from training.model.build import load_model  # noqa: PLC0415

    teacher = load_model(model_file)

    def predict(images: np.ndarray) -> np.ndarray:
        return teacher.predict(datasets.pipeline(datasets.Split(images, np.zeros(len(images), np.int64)), 64), verbose=0)

    if params is None:
        return predict(x)
    per_view = [predict(views.render(x, params[:, k])) for k in range(params.shape[1])]
    return np.stack(per_view, axis=1).reshape(len(x) * params.shape[1], -1)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def mixing(cfg: TrainConfig) -> bool:
    """Whether the run trains on mixed views, whose labels are mixed too (packed targets, even alone)."""
    return bool(cfg.augment_views) and cfg.augment_policy in views.MIXING


def label_targets(soft: np.ndarray, weights: dict[int, float] | None) -> np.ndarray:
    """(rows, 2 + classes) float32: [the larger part's label, class weight, mixed label...]; the weight
    mixed as the label is (sum over classes of the label's share times the class's weight)."""
    w = np.array([(weights or {}).get(c, 1.0) for c in range(soft.shape[1])], np.float64)
    return np.concatenate([soft.argmax(axis=1)[:, None].astype(np.float32), (soft @ w)[:, None].astype(np.float32),
                           soft.astype(np.float32)], axis=1)


def compile_args(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The loss and metrics a phase compiles with: the distillation loss with --teacher, the mixed-label
    loss with a mixing views policy, else the usual."""
    soft = mixing(cfg)
    if not cfg.teacher and not soft:
        return {"loss": optim.loss(cfg.label_smoothing), "metrics": ["accuracy"]}
    return {"loss": distillation_loss(num_classes, cfg.distill_temperature, cfg.distill_weight, cfg.label_smoothing,
                                      soft_labels=soft, teacher=bool(cfg.teacher)),
            "metrics": [keras().metrics.MeanMetricWrapper(_accuracy, name="accuracy")]}


def distillation_loss(num_classes: int, temperature: float, weight: float, label_smoothing: float, *,
                      soft_labels: bool = False, teacher: bool = True):
    """The packed targets' loss. soft_labels: the hard term is the cross-entropy with the mixed label
    (label smoothing applied to it); without a teacher that is the whole loss."""
    T, K = tf(), keras()
    hard = K.losses.get(optim.loss(label_smoothing))
    width = 2 + num_classes * (int(soft_labels) + int(teacher))

    def soft_hard(mixed, y_pred):
        return K.losses.categorical_crossentropy(mixed, y_pred, label_smoothing=label_smoothing)

    def distillation(y_true, y_pred):
        if y_true.shape[-1] != width:  # static: a validation or test batch carries the label alone
            return hard(y_true, y_pred)
        labels, sample_weight = y_true[:, :1], y_true[:, 1]
        if soft_labels:
            hard_term = soft_hard(y_true[:, 2:2 + num_classes], y_pred)
            if not teacher:
                return sample_weight * hard_term
            teacher_p = y_true[:, 2 + num_classes:]
        else:
            hard_term, teacher_p = hard(labels, y_pred), y_true[:, 2:]
        student_log = T.math.log(T.clip_by_value(y_pred, 1e-7, 1.0)) / temperature
        teacher_soft = T.nn.softmax(T.math.log(T.clip_by_value(teacher_p, 1e-7, 1.0)) / temperature)
        kl = T.reduce_sum(teacher_soft * (T.math.log(T.clip_by_value(teacher_soft, 1e-7, 1.0))
                                          - T.nn.log_softmax(student_log)), axis=-1)
        mixed = (1 - weight) * hard_term + weight * temperature ** 2 * kl
        return sample_weight * mixed

    return distillation


def _accuracy(y_true, y_pred):
    T = tf()
    labels = y_true[:, 0] if y_true.shape.rank == 2 and y_true.shape[-1] > 1 else T.reshape(y_true, [-1])
    return T.cast(T.equal(T.cast(labels, T.int64), T.argmax(y_pred, axis=-1)), T.float32)
