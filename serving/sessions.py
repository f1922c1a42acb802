"""onnxruntime sessions for exported models: CUDA only when it really loads, else CPU, quietly.

`load` is serving's half of the one loader: any onnxruntime row of serving.base.formats, its sha256
checked first. training.exported.loader.load adds the TensorFlow rows and delegates the others here.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from serving.base import formats, machine
from serving.base.errors import UserError
from serving.base.manifest import Manifest, verify_artifacts

DEVICES = ("auto", "cpu", "cuda")


def _ort():
    import onnxruntime as ort  # noqa: PLC0415

    return ort


def physical_cores() -> int:
    """intra-op threads: physical cores (hyper-threads only contend for the same FPU)."""
    try:
        import psutil  # noqa: PLC0415 (installed with bentoml)

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


# How onnxruntime's idle intra-op threads wait for work. "always" is onnxruntime's default: they
# busy-wait between a call's parallel sections and for a while after it returns. "in-run" keeps the
# busy-wait inside a call and parks them when it returns. "never" parks them whenever idle: right
# for a loaded server, whose event loop needs the cores between and during calls.
SPIN = ("always", "in-run", "never")


# int8 matrix products on x86. CPUs with VNNI/AMX multiply uint8 by int8 exactly; without them onnxruntime's
# default U8S8 kernels sum pairs of products in int16 with saturation, which 8-bit weights overflow
# (tlserve's int8 files have 8-bit weights: training.exported.int8). "exact" turns on onnxruntime's U8U8
# kernels there (session.x64quantprecision): the answers of a VNNI CPU, measured in docs/decisions.md.
INT8_KERNELS = ("auto", "exact", "fast")


def session_options(threads: int | None = None, *, spin: str = "always", int8_kernels: str = "auto"):
    if spin not in SPIN:
        raise UserError(f"spin must be one of {', '.join(SPIN)}")
    if int8_kernels not in INT8_KERNELS:
        raise UserError(f"int8 kernels must be one of {', '.join(INT8_KERNELS)}")
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if int8_kernels == "exact" or int8_kernels == "auto" and machine.has_vnni() is False:
        opts.add_session_config_entry("session.x64quantprecision", "1")  # no effect on float graphs
    if spin == "in-run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    elif spin == "never":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(path: Path, *, device: str = "auto", threads: int | None = None,
                 spin: str = "always", int8_kernels: str = "auto") -> tuple[Any, str]:
    """(session, provider in use). CUDA is tried only if this build has it, with ORT's logger
    silenced for the attempt: a missing libcublas is a normal fallback here, not an error to print."""
    ort = _ort()
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}")
    opts = session_options(threads, spin=spin, int8_kernels=int8_kernels)
    want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    if want_cuda:
        ort.set_default_logger_severity(4)
        try:
            _preload_cuda_wheels(ort)
            session = ort.InferenceSession(str(path), sess_options=opts,
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        finally:
            ort.set_default_logger_severity(3)
        provider = session.get_providers()[0]
        if provider == "CUDAExecutionProvider":
            return session, provider
    if device == "cuda":
        raise UserError("--device cuda: the CUDA execution provider did not load on this machine (no GPU or no CUDA libraries)")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return session, session.get_providers()[0]


def _preload_cuda_wheels(ort) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) when they are installed.

    Without them preload_dlls prints a line per missing library, so it is only called when the
    wheels' `nvidia` package exists, and its printing is kept off the user's terminal.
    """
    import contextlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import io  # noqa: PLC0415

    if not hasattr(ort, "preload_dlls") or importlib.util.find_spec("nvidia") is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ort.preload_dlls()


# float32 pixels -> (probabilities, OOD scores or None for a model exported without them)
Scored = Callable[[np.ndarray], tuple[np.ndarray, Optional[np.ndarray]]]


@dataclass
class Loaded:
    """One row of serving.base.formats loaded for a model: float32 (N, H, W, 3) pixels -> probabilities,
    and `scored`, the same call with the OOD score (serving.base.manifest.OodReference) beside them."""
    runtime: str
    predict: Callable[[np.ndarray], np.ndarray]
    provider: str
    threads: Optional[int] = None
    scored: Optional[Scored] = None


# (model folder, runtime name, manifest=, device=, threads=, spin=) -> Loaded; serving.sessions.load or
# training.exported.loader.load (which adds the TensorFlow rows)
Loader = Callable[..., Loaded]


def load(model_dir: Path, runtime: str, *, manifest: Manifest | None = None, device: str = "auto",
         threads: int | None = None, spin: str = "always") -> Loaded:
    """An onnxruntime row of the formats table for this model, after checking its sha256."""
    fmt = formats.by_runtime(runtime)
    if not fmt.serving_can_load:
        raise UserError(f"--runtime {runtime} needs TensorFlow or LiteRT, which serving does not load; "
                        f"use one of {', '.join(f.runtime for f in formats.ONNX)}")
    model = OnnxClassifier.load(model_dir, variant=fmt.variant, device=device, threads=threads, spin=spin,
                                manifest=manifest)
    return Loaded(runtime, model.predict, model.provider, threads or physical_cores(), model.predict_scored)


@dataclass
class OnnxClassifier:
    manifest: Manifest
    session: Any
    provider: str
    variant: str = "fp32"

    @classmethod
    def load(cls, model_dir: Path, *, variant: str = "fp32", device: str = "auto", verify: bool = True,
             threads: int | None = None, spin: str = "always", manifest: Manifest | None = None) -> "OnnxClassifier":
        model_dir = Path(model_dir)
        manifest = manifest or Manifest.load(model_dir)
        fmt = formats.by_variant(variant)
        formats.require(manifest, fmt)
        if verify:
            verify_artifacts(model_dir, manifest, [fmt.file])
        session, provider = make_session(model_dir / fmt.file, device=device, threads=threads, spin=spin)
        return cls(manifest, session, provider, variant)

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.manifest.input.hw

    @property
    def interpolation(self) -> str:
        return self.manifest.input.interpolation

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @functools.cached_property
    def has_score(self) -> bool:
        """Whether the file gives the OOD score (models exported before it do not)."""
        return self.manifest.ood is not None and len(self.session.get_outputs()) > 1

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, H, W, 3) pixels 0..255 → (N, classes) probabilities."""
        return self.predict_scored(batch)[0]

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, OOD scores (N,) or None) from one call: the score is the graph's second output."""
        batch = np.asarray(batch)
        h, w = self.input_hw
        if batch.ndim != 4 or batch.shape[1:] != (h, w, 3):
            raise UserError(f"expected images of shape (N, {h}, {w}, 3), got {tuple(batch.shape)}")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        outputs = self.session.run(None, {self.manifest.input.name: batch})
        return outputs[0], (outputs[1] if self.has_score else None)
