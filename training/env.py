"""Process environment for TensorFlow, and the facts about this machine a record keeps."""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import sys
import warnings
from typing import Any, Iterator


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


def package_versions(names: tuple[str, ...] = (
    "tensorflow", "tf-keras", "onnx", "tf2onnx", "onnxruntime-gpu", "onnxruntime", "bentoml", "numpy", "pillow",
)) -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags (Linux); None where /proc/cpuinfo is not there to say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """CPU, cores, memory and GPUs; cheap, and safe without TensorFlow loaded."""
    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        facts["memory_gb"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if _tf is not None:
        facts["gpus"] = [d.name for d in _tf.config.list_physical_devices("GPU")]
    return facts
