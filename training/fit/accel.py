"""Where and how training runs: precision, XLA, and the tf.distribute strategy.

The choices are small pure functions of what the machine has, so the GPU
branches are tested on a CPU-only machine by their decisions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from serving.base.errors import UserError, choose
from serving.base.machine import cpu_flags
from training.fit import cluster as clusters
from training import env
from training.config import DISTRIBUTIONS, PRECISIONS
from training.env import keras, tf



def choose_precision(gpus: int, requested: str = "auto") -> str:
    """mixed_float16 on a GPU (tensor cores) unless asked otherwise; float32 on CPU, where fp16 is slower.

    mixed_bfloat16 is never automatic: it pays only on CPUs with bfloat16 instructions (AVX512-BF16,
    AMX; measured 1.3-2x on a Zen 4 here), and a user should choose reduced precision knowingly."""
    if choose("--precision", requested, PRECISIONS) != "auto":
        return requested
    return "mixed_float16" if gpus > 0 else "float32"


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def precision_note(precision: str, gpus: int, flags: set[str] | None) -> str | None:
    """A warning when bfloat16 will be emulated: on a CPU without bfloat16 instructions it is far slower
    than float32 (a Zen 3 here: 16x slower per resnet9-m training step), which a user cannot guess from the flag."""
    if precision != "mixed_bfloat16" or gpus or flags is None or flags & BF16_FLAGS:
        return None
    return ("mixed_bfloat16 on a CPU without bfloat16 instructions (AVX512-BF16 or AMX) is emulated and "
            "much slower than float32; --precision float32 is faster here")


def choose_jit(gpus: int, requested: bool | None = None) -> bool:
    """XLA on a GPU by default; never on CPU, where it measured 3-24x slower here."""
    if gpus == 0:
        return False
    return True if requested is None else requested


def choose_distribution(gpus: int, requested: str = "auto", tf_config: str | None = None) -> str:
    """multiworker when TF_CONFIG names a cluster; mirrored over >1 GPU; else the default strategy."""
    if choose("--distribute", requested, DISTRIBUTIONS) == "none":
        return "default"
    if requested == "mirrored":
        return "mirrored"
    found = clusters.parse(tf_config)
    if found is not None and found.workers > 1:
        return "multiworker"
    return "mirrored" if gpus > 1 else "default"


@dataclass
class Accel:
    precision: str
    jit: bool
    distribution: str
    strategy: Any
    devices: list[str]
    note: str | None = None        # a warning for the log (emulated bfloat16)

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def facts(self) -> dict[str, Any]:
        return {"devices": self.devices, "precision": self.precision, "jit": self.jit,
                "distribution": self.distribution, "replicas": self.replicas}


def setup(precision: str = "auto", jit: bool | None = None, distribute: str = "auto") -> Accel:
    """Apply the choices: global Keras dtype policy, and the strategy whose scope builds the model."""
    T, K = tf(), keras()
    gpus = len(env.gpus())
    chosen_precision = choose_precision(gpus, precision)
    chosen = choose_distribution(gpus, distribute, os.environ.get("TF_CONFIG"))
    K.mixed_precision.set_global_policy(chosen_precision)
    if chosen == "multiworker":
        strategy = T.distribute.MultiWorkerMirroredStrategy()
    elif chosen == "mirrored":
        kind = "GPU" if gpus else "CPU"
        devices = [d.name for d in T.config.list_logical_devices(kind)]
        if len(devices) < 2 and not gpus:
            raise UserError("--distribute mirrored needs two or more devices (on a CPU: TLSERVE_LOGICAL_CPUS=2)")
        strategy = T.distribute.MirroredStrategy(devices)
    else:
        strategy = T.distribute.get_strategy()
    return Accel(chosen_precision, choose_jit(gpus, jit), chosen, strategy,
                 [d.name for d in T.config.list_logical_devices()], precision_note(chosen_precision, gpus, cpu_flags()))
