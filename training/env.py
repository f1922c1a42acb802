"""Process environment for TensorFlow, and the GPUs it sees; the TensorFlow-free machine facts are serving.base.machine."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Any, Iterator

from serving.base import machine


def configure_environment() -> None:
    """Set what TensorFlow reads at import; a no-op for values the user set."""
    # tf2onnx converts tf-keras models, so tf-keras is the Keras we train with.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(tensorflow|tf_keras|keras|tf2onnx|onnx).*")


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 while C++ libraries print their start-up banners.

    TensorFlow's oneDNN and CUDA-not-found notices are written by C++ code before
    any Python logging setting applies, so only the descriptor itself can hold them.
    """
    if os.environ.get("TLSERVE_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor (e.g. captured by pytest)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def quiet_library_logging() -> Iterator[None]:
    """Hold back WARNING lines that libraries send to Python's root logger (onnxruntime's quantizer
    prints one `Axis 1 is out-of-range` per weight of a resnet50v2); TLSERVE_DEBUG=1 shows them."""
    if os.environ.get("TLSERVE_DEBUG"):
        yield
        return
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


_tf = None


def tf():
    """Import TensorFlow once, quietly, with tf-keras configured."""
    global _tf
    if _tf is None:
        configure_environment()
        with _quiet_stderr_fd():
            import tensorflow  # noqa: PLC0415
            import tf_keras  # noqa: F401,PLC0415

            tensorflow.get_logger().setLevel(logging.ERROR)
            try:
                import absl.logging  # noqa: PLC0415

                absl.logging.set_verbosity(absl.logging.ERROR)
            except ImportError:
                pass
            _split_cpu(tensorflow)
            tensorflow.config.list_physical_devices()  # device probing prints too
        _tf = tensorflow
    return _tf


def _split_cpu(tensorflow) -> None:
    """TLSERVE_LOGICAL_CPUS=N makes N logical CPU devices, so multi-device code runs on one CPU."""
    n = int(os.environ.get("TLSERVE_LOGICAL_CPUS", "0") or 0)
    if n > 1:
        cpu = tensorflow.config.list_physical_devices("CPU")[0]
        tensorflow.config.set_logical_device_configuration(cpu, [tensorflow.config.LogicalDeviceConfiguration()] * n)


def keras():
    """The tf-keras module (Keras 2 API), imported after TensorFlow is configured."""
    tf()
    import tf_keras  # noqa: PLC0415

    return tf_keras


def gpus() -> list[str]:
    """The GPUs TensorFlow sees: the one place training asks (precision, XLA, distribution, runtimes)."""
    return [d.name for d in tf().config.list_physical_devices("GPU")]


def machine_facts() -> dict[str, Any]:
    """serving.base.machine's CPU, cores and memory, plus the GPUs TensorFlow sees when it is loaded already."""
    facts = machine.machine_facts()
    if _tf is not None:
        facts["gpus"] = gpus()
    return facts
