"""The options of the commands on an exported model (export, eval, bench), each default stated once.

cli.py takes every typer default from these fields (fastapi-cli style), and Python callers build the
same dataclasses. They live apart from their commands' modules, which import numpy and more, so that
`tlserve --help` imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.base import formats
from training.exported.int8 import Budget


@dataclass
class ExportOptions:
    name: str | None = None
    formats: tuple[str, ...] = formats.EXPORT_DEFAULT  # savedmodel, onnx
    opset: int = 17
    fp16: bool = False
    int8: bool = False
    overwrite: bool = False
    # The parity check batch: this many test images, at least one of every class, stratified.
    check_images: int = 32
    # int8 calibration: calibration_per_class training images of every class (a class with fewer gives
    # all it has), at least calibration_images in all, stratified and seeded by the run's seed.
    calibration_images: int = 256
    calibration_per_class: int = 32
    register: bool = True
    # The gate for fp16/int8: a variant losing more test accuracy than this (points), or more recall on
    # any one class, is not kept.
    max_accuracy_drop: float = 1.0
    max_class_drop: float = 5.0
    # How long --int8 may search for a file the gate keeps by keeping more of the first layers float.
    int8_budget: Budget = field(default_factory=Budget)
    # The OOD score as every file's second output (training.exported.ood): its threshold accepts this
    # share of the validation split; the reference is fitted on at most ood_images training images.
    ood: bool = True
    ood_accept: float = 0.95
    ood_images: int = 5000  # training (and at most as many validation) images the reference is fitted on


@dataclass
class EvalOptions:
    data: str
    split: str = "test"
    variants: str = "all"
    runtime: str = "onnx"
    url: str | None = None
    out: Path | None = None
    ignore_unknown: bool = False
    seed: int = 0
    batch_size: int = 64       # onnxruntime's batch: at 32 and above its images/s on this CPU levels off
    gradcam: bool = True       # the mistakes page shows each mistake's Grad-CAM (needs the run's Keras model)
    runs_dir: Path | None = None
    ood: Path | None = None    # a folder of out-of-distribution images: the OOD score's AUROC against `data`


@dataclass
class BenchOptions:
    runtimes: str = ",".join(formats.BENCH_DEFAULT)
    batch_sizes: str = "1,8,32"
    duration: float = 3.0
    iterations: int | None = None       # a fixed number of timed calls instead of duration
    warmup: int = 5
    threads: int | None = None
    url: str | None = None              # a running service instead of in-process runtimes
    concurrency: str = "1,8,32"
    requests: int = 200
    images: Path | None = None          # with url: upload these instead of generated images
    allow_remote: bool = False
