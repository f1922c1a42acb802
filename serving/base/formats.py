"""Every form an exported model can be run in, as one table (Ultralytics' export-formats table).

A row says which file in the model folder it uses, which engine runs it, whether serving/ can load it
(onnxruntime only: a bento ships no TensorFlow) and how `tlserve export` makes it. Adding a runtime
variant is one row here plus its loader branch (serving.sessions for onnxruntime rows,
training.exported.loader.load for TensorFlow rows). The table lives beside the manifest rather than in it
because it is about running files, not about what a folder holds; it imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass

from serving.base.errors import UserError, nearest
from serving.base.manifest import Manifest

TENSORFLOW = "tensorflow"
ONNXRUNTIME = "onnxruntime"
LITERT = "litert"  # TFLite files: LiteRT's interpreter (ai-edge-litert), else TensorFlow's tf.lite


@dataclass(frozen=True)
class Format:
    runtime: str          # the name --runtime / --runtimes take
    file: str             # its file (or folder) in the model folder; keras: in the run folder
    engine: str           # tensorflow | onnxruntime | litert
    export_format: str | None = None  # the `tlserve export --formats` entry that writes it (keras: none)
    variant: str | None = None  # ONNX precision (fp32 | fp16 | int8): --variant / --variants names
    export_flag: str | None = None    # the `tlserve export` flag that adds it beside its format

    @property
    def serving_can_load(self) -> bool:
        """Loadable without TensorFlow, i.e. by the service and serving/."""
        return self.engine == ONNXRUNTIME

    @property
    def in_export(self) -> bool:
        """An artifact of the export (hashed in the manifest); keras is the run's model.keras."""
        return self.export_format is not None

    def present(self, manifest: Manifest) -> bool:
        """Whether this model has it: an artifact the manifest lists (and the gate kept), or for keras
        a run path to find model.keras under (whether the file is still there is the loader's check)."""
        if not self.in_export:
            return manifest.run_path is not None
        artifact = manifest.artifacts.get(self.file)
        return artifact is not None and artifact.sha256 is not None


FORMATS: tuple[Format, ...] = (
    Format("keras", "model.keras", TENSORFLOW),
    Format("savedmodel", "saved_model", TENSORFLOW, "savedmodel"),
    Format("onnx", "model.onnx", ONNXRUNTIME, "onnx", "fp32"),
    Format("onnx-fp16", "model.fp16.onnx", ONNXRUNTIME, "onnx", "fp16", "--fp16"),
    Format("onnx-int8", "model.int8.onnx", ONNXRUNTIME, "onnx", "int8", "--int8"),
    # fp32, fp16 and int8 all come with --formats ...,tflite. Not a serving row: the bento ships
    # onnxruntime only (training.exported.tflite loads them).
    Format("tflite", "model.tflite", LITERT, "tflite"),
    Format("tflite-fp16", "model.fp16.tflite", LITERT, "tflite"),
    Format("tflite-int8", "model.int8.tflite", LITERT, "tflite"),
)
BY_RUNTIME = {f.runtime: f for f in FORMATS}
ONNX = tuple(f for f in FORMATS if f.engine == ONNXRUNTIME)
BY_VARIANT = {f.variant: f for f in ONNX}
VARIANTS = {f.variant: f.file for f in ONNX}  # fp32 -> model.onnx, ...
RUNTIMES = tuple(BY_RUNTIME)
# A runtime and, for onnx, a --variant: how predict and eval name them (keras, savedmodel, onnx).
BASE_RUNTIMES = tuple(f.runtime for f in FORMATS if f.variant in (None, "fp32"))
EXPORT_FORMATS = tuple(dict.fromkeys(f.export_format for f in FORMATS if f.export_format))  # savedmodel, onnx, tflite
# What `tlserve export` writes when --formats is not given: TFLite (for phones and boards) only when asked.
EXPORT_DEFAULT = ("savedmodel", "onnx")
# Modes of a row rather than rows: same file, same engine, another way to call it (bench only).
BENCH_MODES = {"tf-function": "keras"}
BENCH_RUNTIMES = tuple(name for f in FORMATS for name in (f.runtime, *[m for m, row in BENCH_MODES.items()
                                                                      if row == f.runtime]))
# What `tlserve bench` times when --runtimes is not given: every row (its modes only when asked for).
BENCH_DEFAULT = RUNTIMES


class MissingFormat(UserError):
    """The model has no such file: bench skips it, predict and eval stop with this line."""


def require(manifest: Manifest, fmt: Format) -> None:
    if fmt.present(manifest):
        return
    what = f"{fmt.variant} model" if fmt.variant else fmt.runtime
    rejected = manifest.rejected.get(fmt.file)
    if rejected is not None and rejected.gate:
        raise MissingFormat(f"model '{manifest.name}' has no {what} ({fmt.file}): export made it but the accuracy "
                            f"gate did not keep it: {not_kept_because(manifest, fmt, rejected)}")
    raise MissingFormat(f"model '{manifest.name}' has no {what} ({fmt.file}); make it with: "
                        f"{export_command(manifest, fmt)}")


def not_kept_because(manifest: Manifest, fmt: Format, rejected) -> str:
    """Why the gate dropped a variant (its figures from the manifest) and what would keep it: exporting
    the same way again would be refused again, so the advice is a looser limit or, for int8, more tries."""
    gate = rejected.gate
    loosen = tuple(part for c in gate.get("crossed", []) for part in (f"--{c['limit'].replace('_', '-')}",
                                                                      _above(c["drop_points"])))
    tries = rejected.int8_tries or []
    tried = ""
    if tries:
        most = max(t["float_convolutions"] for t in tries)
        tried = f" ({len(tries)} {'try' if len(tries) == 1 else 'tries'}, " + (
            f"up to the first {most} convolutions kept float32)" if most else "every convolution int8)")
    more = ("; or let the fallback keep more of the network float32 with a larger --int8-tries / --int8-seconds"
            if tries else "")
    return (f"{gate.get('reason') or 'it crossed a limit'}{tried}. Exporting the same way is refused again; to "
            f"accept that loss: {export_command(manifest, fmt, loosen)}{more}; or serve the fp32 model")


def _above(points: float) -> str:
    """A limit just above a measured drop, rounded up to a tenth of a point."""
    import math  # noqa: PLC0415

    return f"{math.floor(points * 10 + 1e-9) / 10 + 0.1:g}"


def export_command(manifest: Manifest, wanted: Format, extra: tuple[str, ...] = ()) -> str:
    """The `tlserve export` line that writes this model again with `wanted` added to what it has."""
    rows = [f for f in FORMATS if f.export_format and (f == wanted or f.present(manifest))]
    if wanted.variant not in (None, "fp32") and not any(f.runtime == "onnx" for f in rows):
        rows.append(BY_RUNTIME["onnx"])
    order = [name for name in EXPORT_FORMATS if any(f.export_format == name for f in rows)]
    flags = [f.export_flag for f in rows if f.export_flag]
    return " ".join(["tlserve export", manifest.run, "--name", manifest.name, "--formats", ",".join(order),
                     *flags, *extra, "--overwrite"])


def check_runtime(name: str, choices: tuple[str, ...] = RUNTIMES) -> str:
    if name not in choices:
        raise UserError(f"unknown runtime '{name}'; choose from {', '.join(choices)}{nearest(name, list(choices))}")
    return name


def by_runtime(name: str, choices: tuple[str, ...] = RUNTIMES) -> Format:
    return BY_RUNTIME[check_runtime(name, tuple(c for c in choices if c in BY_RUNTIME))]


def by_variant(name: str) -> Format:
    if name not in BY_VARIANT:
        raise UserError(f"unknown variant '{name}'; choose from {', '.join(BY_VARIANT)}{nearest(name, list(BY_VARIANT))}")
    return BY_VARIANT[name]


def choices(names) -> str:
    """'a | b | c' for an option's help text."""
    return " | ".join(names)
