"""`tlserve eval`: an exported model over labelled images it has never seen, per variant.

Any ONNX variant the manifest lists (sha256-checked, loaded as `tlserve bench` loads it), the
SavedModel or the run's Keras model, or the running service over HTTP. Images are matched to the
model's classes by folder name and decoded by serving.base.images at the model's input size and
interpolation (the service's decoder); every figure comes from training.record.metrics. The results go to
`eval/<timestamp>/` under the model folder (or --out), staged and renamed, so a failed eval leaves
nothing behind: metrics.json, predictions.csv, confusion-<variant>.png, reliability.png, coverage.png
and index.html (self-contained; evaluation_page.py).
"""
from __future__ import annotations

import csv
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import formats, images, storage
from serving.base.contract import Contract, optional
from serving.base.errors import UserError
from serving.base.manifest import Manifest, ModelFolder
from serving.timing import check_url
from training.config import DataSpec
from training.data import sources as datasets
from training.exported.options import EvalOptions
from training.record import metrics
from training import progress

BATCH = EvalOptions.batch_size
# Images decoded ahead (in threads) while the model runs the previous chunk.
CHUNK = 512
DECODE_THREADS = 8
# /predict_batch takes at most serving.guard.MAX_BATCH_FILES uploads per request.
HTTP_BATCH = 64
MISTAKES = 24
RUNTIMES = formats.BASE_RUNTIMES  # onnx takes --variants, the others ignore it
SCHEMA = 1  # metrics.json

Log = Callable[[str], None]


@dataclass
class Labelled:
    """Labelled images, labels already indices into the model's class names."""
    names: list[str]            # file path relative to the data folder, or '#<index>' for array sources
    labels: np.ndarray
    source: str
    paths: list[Path] | None = None
    arrays: np.ndarray | None = None
    unknown: dict[str, int] = field(default_factory=dict)  # folder class the model lacks -> images skipped

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, i: int, hw: tuple[int, int], interpolation: str) -> np.ndarray | None:
        """The model-sized uint8 array of image i, or None if it will not decode."""
        if self.arrays is not None:
            a = self.arrays[i]
            if a.shape[:2] == tuple(hw):
                return a
            from PIL import Image  # noqa: PLC0415

            return images.to_array(Image.fromarray(a), hw, interpolation)
        try:
            return images.load_array(self.paths[i], hw, interpolation=interpolation, name=self.names[i])
        except images.ImageError:
            return None

    def upload(self, i: int) -> bytes:
        """What a client would send: the file itself, or a PNG of an array source's image."""
        if self.paths is not None:
            return self.paths[i].read_bytes()
        return _png(self.arrays[i])

    def thumbnail(self, i: int, size: int = 128) -> bytes | None:
        from PIL import Image  # noqa: PLC0415

        try:
            img = Image.fromarray(self.arrays[i]) if self.arrays is not None else images.open_image(self.paths[i])
        except images.ImageError:
            return None
        img.thumbnail((size, size))
        return _png(np.asarray(img))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def load_labelled(spec: str, split: str, class_names: list[str], hw: tuple[int, int], *,
                  ignore_unknown: bool = False, seed: int = 0) -> Labelled:
    """The images of `spec` whose class the model knows; a class it does not know is an error that
    names it, or (ignore_unknown) skipped and counted."""
    parsed = DataSpec.parse(spec)
    known = {name: i for i, name in enumerate(class_names)}
    if parsed.scheme == "folder":
        folder, layout, classes = datasets.labelled_folder(parsed.local, split)
        names, labels, paths, unknown = [], [], [], {}
        for cls, files in classes.items():
            if cls not in known:
                unknown[cls] = len(files)
                continue
            paths += files
            labels += [known[cls]] * len(files)
            names += [f.relative_to(folder).as_posix() for f in files]
        source = f"folder {folder} ({layout})"
        arrays = None
    else:
        x, y, data_classes, source = datasets.labelled_arrays(spec, split, seed=seed, image_size=hw[0])
        unknown = {c: int(np.sum(y == j)) for j, c in enumerate(data_classes) if c not in known and np.any(y == j)}
        keep = np.array([data_classes[j] in known for j in y], bool)
        arrays, paths = x[keep], None
        labels = [known[data_classes[j]] for j in y[keep]]
        names = [f"#{i}" for i in np.flatnonzero(keep)]
    if not set(labels):
        raise UserError(f"--data {spec}: none of its classes ({', '.join(sorted(unknown)) or 'no images'}) is one "
                        f"the model knows; the model's classes are {', '.join(class_names)}")
    if unknown and not ignore_unknown:
        from serving.base.errors import nearest  # noqa: PLC0415

        first, *rest = sorted(unknown)
        more = f" (and {', '.join(rest[:4])}{', ...' if len(rest) > 4 else ''})" if rest else ""
        raise UserError(f"--data {spec}: class '{first}'{more} is not one of the model's classes"
                        f"{nearest(first, class_names)}; pass --ignore-unknown to skip "
                        f"{'its' if not rest else 'their'} {sum(unknown.values())} images")
    return Labelled(names, np.asarray(labels, np.int64), source, paths, arrays, unknown)


# ---- scoring -----------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str                                   # fp32 | fp16 | int8 | savedmodel | keras | http
    predict: Callable[[np.ndarray], np.ndarray]
    provider: str
    scored: Callable | None = None              # pixels -> (probabilities, OOD scores) (serving.sessions.Loaded)


def parse_variants(spec: str, manifest: Manifest) -> list[str]:
    have = [f.variant for f in formats.ONNX if f.present(manifest)]
    if spec.strip() == "all":
        return have
    wanted = [v.strip() for v in spec.split(",") if v.strip()]
    for v in wanted:
        if v not in formats.BY_VARIANT:
            raise UserError(f"unknown variant '{v}'; choose from {', '.join(formats.BY_VARIANT)} or all")
    if not wanted:
        raise UserError("--variants names no variant")
    return list(dict.fromkeys(wanted))


def load_variants(model_dir: Path, manifest: Manifest, runtime: str, spec: str) -> list[Variant]:
    """Every requested runtime/variant loaded (and sha256-checked, by training.exported.loader.load) before any
    image is read, so a missing variant fails at once."""
    from training.exported.loader import load  # noqa: PLC0415 (TensorFlow, for the TensorFlow rows only)

    formats.check_runtime(runtime, RUNTIMES)
    if runtime != "onnx":
        loaded = load(model_dir, runtime, manifest=manifest)
        return [Variant(runtime, loaded.predict, "tensorflow", loaded.scored)]
    out = []
    for v in parse_variants(spec, manifest):
        # Idle onnxruntime threads park instead of spinning: the decode threads need those cores
        # between calls (CIFAR-10 JPEGs, tiny CNN, 2 busy cores: 890 images/s against 701 spinning).
        loaded = load(model_dir, formats.by_variant(v).runtime, manifest=manifest, spin="never")
        out.append(Variant(v, loaded.predict, loaded.provider, loaded.scored if manifest.ood else None))
    return out


@dataclass
class Scored:
    kept: np.ndarray                      # bool per image: decoded and scored
    probs: dict[str, np.ndarray]          # variant -> (N, classes); rows of skipped images are zero
    seconds: dict[str, float]             # variant -> time inside the model (or the HTTP round trips)
    wall_seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # image name -> why it was skipped
    server: dict[str, Any] | None = None  # the service's /metadata, over HTTP
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> OOD scores, where it gives them


def score_inprocess(data: Labelled, variants: list[Variant], hw: tuple[int, int], interpolation: str,
                    num_classes: int, *, batch: int = BATCH, log: Log | None = None) -> Scored:
    """Every variant over every image. Chunks are decoded in threads (Pillow releases the GIL) one
    chunk ahead of the model, so decoding and inference overlap."""
    n = len(data)
    probs = {v.name: np.zeros((n, num_classes), np.float32) for v in variants}
    scores = {v.name: np.zeros(n, np.float32) for v in variants if v.scored is not None}
    seconds = {v.name: 0.0 for v in variants}
    kept = np.zeros(n, bool)
    chunks = [np.arange(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    start = time.perf_counter()
    with ThreadPoolExecutor(DECODE_THREADS) as pool, \
            progress.step(f"eval {', '.join(v.name for v in variants)}", n, log=log) as advance:
        def submit(idx: np.ndarray):
            if data.arrays is not None and data.arrays.shape[1:3] == tuple(hw):
                return None  # already model-sized pixels: nothing to decode
            return pool.map(lambda i: data.pixels(int(i), hw, interpolation), idx)

        pending = submit(chunks[0]) if chunks else None
        for k, idx in enumerate(chunks):
            if pending is None:
                arrays = list(data.arrays[idx])
            else:
                arrays = list(pending)
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None
            ok = np.array([a is not None for a in arrays], bool)
            kept[idx[ok]] = True
            if ok.any():
                x = np.stack([a for a in arrays if a is not None]).astype(np.float32)
                for v in variants:
                    t0 = time.perf_counter()
                    parts = [v.scored(x[s:s + batch]) if v.scored else (v.predict(x[s:s + batch]), None)
                             for s in range(0, len(x), batch)]
                    seconds[v.name] += time.perf_counter() - t0
                    probs[v.name][idx[ok]] = np.concatenate([p for p, _ in parts])
                    if v.name in scores:
                        scores[v.name][idx[ok]] = np.concatenate([s for _, s in parts])
            advance(len(idx))
    skipped = {data.names[i]: "not a readable image" for i in np.flatnonzero(~kept)}
    return Scored(kept, probs, seconds, time.perf_counter() - start, skipped, scores=scores)


def server_metadata(url: str, manifest: Manifest, timeout: float = 10.0) -> dict[str, Any]:
    """The service's /metadata, refused unless it serves this very model (same name, version, classes)."""
    import httpx  # noqa: PLC0415

    try:
        r = httpx.get(f"{url}/metadata", timeout=timeout)
        meta = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        raise UserError(f"--url {url}: no tlserve service answering ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or "class_names" not in meta:
        raise UserError(f"--url {url}: not a tlserve service (no model metadata at /metadata)")
    if (meta.get("name"), meta.get("version"), meta.get("class_names")) != \
            (manifest.name, manifest.version, manifest.class_names):
        raise UserError(f"--url {url} serves {meta.get('name')}:{meta.get('version')}, not "
                        f"{manifest.name}:{manifest.version}; evaluate the model it serves")
    return meta


def score_http(data: Labelled, url: str, meta: dict[str, Any], *, timeout: float = 60.0,
               log: Log | None = None) -> Scored:
    """POST the images to the service's /predict_batch (the service decodes them) with top_k = every
    class, so the whole probability vector comes back. An upload the service refuses as a bad image
    (400/413) is retried alone to name it, then skipped."""
    import httpx  # noqa: PLC0415

    names = meta["class_names"]
    column = {c: j for j, c in enumerate(names)}
    n = len(data)
    variant = f"http-{meta.get('variant', 'fp32')}"
    probs = np.zeros((n, len(names)), np.float32)
    scores = np.zeros(n, np.float32)
    kept = np.zeros(n, bool)
    skipped: dict[str, str] = {}
    spent = 0.0
    start = time.perf_counter()

    def post(client: httpx.Client, idx: list[int]) -> httpx.Response:
        nonlocal spent
        files = [("images", (Path(data.names[i]).name or f"{i}.png", data.upload(i))) for i in idx]
        t0 = time.perf_counter()
        try:
            r = client.post(f"{url}/predict_batch", files=files, data={"top_k": str(len(names))})
        except httpx.HTTPError as exc:
            raise UserError(f"--url {url}: the service stopped answering ({exc.__class__.__name__})") from None
        spent += time.perf_counter() - t0
        if r.status_code >= 500 or r.status_code not in (200, 400, 413):
            raise UserError(f"--url {url}: /predict_batch answered {r.status_code}: {r.text[:200]}")
        return r

    def take(idx: list[int], answer: dict[str, Any]) -> None:
        for i, p in zip(idx, answer["predictions"]):
            for t in p["top"]:
                probs[i, column[t["label"]]] = t["probability"]
            scores[i] = p.get("ood_score", np.nan)
            kept[i] = True

    with httpx.Client(timeout=timeout) as client, progress.step(f"eval {variant} at {url}", n, log=log) as advance:
        for s in range(0, n, HTTP_BATCH):
            idx = list(range(s, min(s + HTTP_BATCH, n)))
            r = post(client, idx)
            if r.status_code == 200:
                take(idx, r.json())
            else:
                for i in idx:
                    one = post(client, [i])
                    if one.status_code == 200:
                        take([i], one.json())
                    else:
                        skipped[data.names[i]] = _reason(one)
            advance(len(idx))
    has_score = (meta.get("ood") or {}).get("available", False)
    return Scored(kept, {variant: probs}, {variant: spent}, time.perf_counter() - start, skipped, meta,
                  {variant: scores} if has_score else {})


def _reason(response) -> str:
    try:
        return str(response.json().get("error") or response.json())[:200]
    except ValueError:
        return response.text[:200]


# ---- metrics -----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class VariantMetrics(Contract):
    """One variant's figures in metrics.json (variant_metrics, then how fast it answered)."""
    images: int
    accuracy: float
    top5_accuracy: float | None          # None with fewer than 5 classes
    macro_f1: float
    weighted_f1: float
    per_class: dict[str, dict[str, Any]]  # {class: {precision, recall, f1, support}}
    confusion_matrix: list[list[int]]    # [true][predicted]
    ece: float | None
    reliability_bins: list[dict[str, Any]]
    coverage: list[dict[str, Any]]       # [{threshold, coverage, accuracy}]
    seconds: float                       # inside the model (or the HTTP round trips)
    model_images_per_sec: float | None
    provider: str
    batch_size: int


@dataclass(kw_only=True)
class EvalData(Contract):
    """What metrics.json was measured on."""
    spec: str
    split: str
    seed: int | None = None              # the synthetic split's seed (metrics.json before 2026-12-02 lacks it)
    source: str
    images: int
    scored: int
    classes: list[str]
    skipped_unreadable: dict[str, str]   # image name -> why
    skipped_unknown_class: dict[str, int]  # class folder the model lacks -> images skipped


@dataclass(kw_only=True)
class EvalMetrics(Contract):
    """eval/<timestamp>/metrics.json: one `tlserve eval` (serving.base.contract)."""
    schema: int = SCHEMA
    kind: str = "eval"
    model: str
    version: str
    created_at: str
    data: EvalData
    runtime: str                         # keras | savedmodel | onnx | http
    url: str | None
    server: dict[str, Any] | None        # over HTTP: the service's name, version, variant, provider
    class_names: list[str]
    wall_seconds: float
    images_per_sec: float | None
    variants: dict[str, VariantMetrics]
    machine: dict[str, Any]
    versions: dict[str, Any]
    ood: dict[str, Any] | None = optional()  # eval --ood: the OOD score's AUROC per variant

    SCHEMA = SCHEMA
    FILE = "metrics.json"
    KIND = "eval metrics"


def variant_metrics(y: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """training.record.metrics over one variant's answers. Precision/recall/F1 and their means are over the
    classes that occur in the data or the predictions (scikit-learn's default labels): a model class
    the data lacks and the model never predicted says nothing about this data."""
    pred = probs.argmax(axis=1)
    matrix = metrics.confusion(y, pred, len(class_names))
    present = np.flatnonzero(matrix.sum(axis=0) + matrix.sum(axis=1))
    summary = metrics.summary(matrix[np.ix_(present, present)], [class_names[i] for i in present])
    rel = metrics.reliability(y, probs)
    return {
        "images": int(len(y)),
        "accuracy": summary["accuracy"],
        "top5_accuracy": metrics.top_k_accuracy(y, probs, 5),
        "macro_f1": summary["macro_f1"],
        "weighted_f1": summary["weighted_f1"],
        "per_class": summary["per_class"],
        "confusion_matrix": matrix.tolist(),
        "ece": rel["ece"],
        "reliability_bins": rel["bins"],
        "coverage": metrics.coverage(y, probs),
    }


def evaluate(model_dir: Path, opts: EvalOptions, *, log: Log | None = None,
             facts: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the eval and write its folder; returns metrics.json's content with `path` added."""
    from serving.base import machine  # noqa: PLC0415

    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    class_names = manifest.class_names
    hw, interpolation = manifest.input.hw, manifest.input.interpolation
    if opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    datasets.check_split(opts.split)
    final = _out_dir(model_dir, opts.out)
    # Everything that can fail on the user's options fails before any image is decoded.
    ood_data = ood_images(opts.ood, manifest, opts.runtime if not opts.url else "http") if opts.ood else None
    if opts.url:
        url = check_url(opts.url)
        meta = server_metadata(url, manifest)
        variants = None
    else:
        variants = load_variants(model_dir, manifest, opts.runtime, opts.variants)
    data = load_labelled(opts.data, opts.split, class_names, hw, ignore_unknown=opts.ignore_unknown, seed=opts.seed)

    def score(images: Labelled) -> Scored:
        if opts.url:
            return score_http(images, url, meta, log=log)
        return score_inprocess(images, variants, hw, interpolation, len(class_names), batch=opts.batch_size, log=log)

    scored = score(data)
    if not scored.kept.any():
        raise UserError(f"--data {opts.data}: none of the {len(data)} images could be read")
    y = data.labels[scored.kept]
    n = int(scored.kept.sum())
    providers = {v.name: v.provider for v in variants or []}
    rows = {}
    for name, probs in scored.probs.items():
        spent = scored.seconds[name]
        rows[name] = VariantMetrics(**variant_metrics(y, probs[scored.kept], class_names), seconds=spent,
                                    model_images_per_sec=n / spent if spent else None,
                                    provider=providers.get(name, "http"),
                                    batch_size=HTTP_BATCH if opts.url else opts.batch_size)
    result = EvalMetrics(
        model=manifest.name, version=manifest.version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data=EvalData(spec=opts.data, split=opts.split, seed=opts.seed, source=data.source, images=len(data), scored=n,
                      classes=sorted({class_names[i] for i in data.labels}),
                      skipped_unreadable=dict(sorted(scored.skipped.items())), skipped_unknown_class=data.unknown),
        runtime="http" if opts.url else opts.runtime,
        url=opts.url,
        server={k: scored.server.get(k) for k in ("name", "version", "variant", "provider")} if scored.server else None,
        class_names=class_names,
        wall_seconds=scored.wall_seconds,
        images_per_sec=n / scored.wall_seconds if scored.wall_seconds else None,
        variants=rows,
        machine=(facts or machine.machine_facts)(),
        versions=machine.package_versions(),
    ).to_dict()
    if ood_data is not None:
        result["ood"] = ood_metrics(manifest, scored, ood_data, score(ood_data), opts.ood)
    _write(final, result, data, scored, log, model_dir if opts.gradcam else None, opts.runs_dir)
    result["path"] = str(final)
    return result


def ood_images(folder: Path, manifest: Manifest, runtime: str) -> Labelled:
    """The --ood folder's images (any layout, searched recursively), checked before anything is loaded."""
    from serving.predict import expand  # noqa: PLC0415
    from serving.settings import no_score  # noqa: PLC0415

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--ood {folder}: no such folder")
    files = expand([folder])
    if not files:
        raise UserError(f"--ood {folder}: no image files in it (searched its sub-folders too)")
    if manifest.ood is None:
        raise UserError(f"--ood: {no_score(manifest.name)}")
    if runtime == "keras":
        raise UserError("--ood: the run's Keras model has no OOD score output; use --runtime onnx or savedmodel")
    names = [f.relative_to(folder).as_posix() for f in files]
    return Labelled(names, np.zeros(len(files), np.int64), f"folder {folder}", paths=files)


def ood_metrics(manifest: Manifest, scored: Scored, ood_data: Labelled, ood_scored: Scored,
                folder: Path) -> dict[str, Any]:
    """Per variant: the OOD score's AUROC (--data's images in distribution, --ood's out), the max-softmax
    baseline's on the same images, and the shares the recorded threshold accepts and flags."""
    from training.exported.ood import auroc  # noqa: PLC0415

    if not ood_scored.kept.any():
        raise UserError(f"--ood {folder}: none of its {len(ood_data)} images could be read")
    threshold = manifest.ood.threshold
    out: dict[str, Any] = {"folder": str(folder), "images": len(ood_data), "scored": int(ood_scored.kept.sum()),
                           "method": manifest.ood.method, "threshold": threshold, "variants": {}}
    for name, s_in in scored.scores.items():
        s_in, s_out = s_in[scored.kept], ood_scored.scores[name][ood_scored.kept]
        msp_in = -scored.probs[name][scored.kept].max(axis=1)
        msp_out = -ood_scored.probs[name][ood_scored.kept].max(axis=1)
        out["variants"][name] = {"auroc": auroc(s_in, s_out), "msp_auroc": auroc(msp_in, msp_out),
                                 "in_accepted": float(np.mean(s_in <= threshold)),
                                 "ood_flagged": float(np.mean(s_out > threshold))}
    return out


def _out_dir(model_dir: Path, out: Path | None) -> Path:
    if out is not None:
        out = Path(out)
        if out.exists():
            raise UserError(f"--out {out} already exists; give a new folder")
        return out
    base = ModelFolder(model_dir).eval_dir / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    final, k = base, 1
    while final.exists():  # two evals in the same second
        k += 1
        final = base.with_name(f"{base.name}-{k}")
    return final


def predictions_csv(data: Labelled, scored: Scored, class_names: list[str]) -> str:
    """file, true, then per variant: predicted, confidence, correct (one row per scored image)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = list(scored.probs)
    writer.writerow(["file", "true", *[f"{v}_{c}" for v in names for c in ("predicted", "confidence", "correct")]])
    preds = {v: p.argmax(axis=1) for v, p in scored.probs.items()}
    for i in np.flatnonzero(scored.kept):
        true = int(data.labels[i])
        row: list[Any] = [data.names[i], class_names[true]]
        for v in names:
            j = int(preds[v][i])
            row += [class_names[j], f"{float(scored.probs[v][i, j]):.6f}", int(j == true)]
        writer.writerow(row)
    return buf.getvalue()


def confident_mistakes(data: Labelled, scored: Scored, variant: str, class_names: list[str],
                       k: int = MISTAKES) -> list[dict[str, Any]]:
    """The k wrong answers of `variant` given with the highest confidence, most confident first."""
    probs = scored.probs[variant]
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(scored.kept & (pred != data.labels))
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
    return [{"index": int(i), "file": data.names[i], "true": class_names[int(data.labels[i])],
             "predicted": class_names[int(pred[i])], "confidence": float(conf[i])} for i in order]


def mistake_gradcams(model_dir: Path, mistakes: list[dict[str, Any]], data: Labelled, class_names: list[str],
                     runs_dir: Path | None, log: Log | None) -> dict[int, bytes]:
    """image index -> the Grad-CAM overlay of the class the model wrongly gave it, computed through the
    run's Keras model (the export holds no Keras model); {} with a logged reason when that run is gone."""
    if not mistakes:
        return {}
    from training.exported import explain  # noqa: PLC0415 (TensorFlow only when there is something to explain)
    from training.model.build import load_model  # noqa: PLC0415

    try:
        run = explain.resolve_run(str(model_dir), runs_dir)
    except UserError as exc:
        (log or print)(f"Grad-CAM of the mistakes skipped: {exc}")
        return {}
    h, w = run.record.data.image_size
    interpolation = run.record.data.interpolation or images.DEFAULT_INTERPOLATION
    picked = [(m, data.pixels(m["index"], (h, w), interpolation)) for m in mistakes]
    picked = [(m, px) for m, px in picked if px is not None]
    if not picked:
        return {}
    pixels = np.stack([px for _, px in picked])
    wanted = np.array([class_names.index(m["predicted"]) for m, _ in picked])
    with progress.step("Grad-CAM of the mistakes", len(picked), log=log) as advance:
        maps = explain.explain_arrays(load_model(run.model_path), pixels, wanted)
        advance(len(picked))
    return {m["index"]: explain.overlay_png(px, heat) for (m, px), heat in zip(picked, maps)}


def _write(final: Path, result: dict[str, Any], data: Labelled, scored: Scored, log: Log | None,
           gradcam_from: Path | None = None, runs_dir: Path | None = None) -> None:
    from training.exported import evaluation_page  # noqa: PLC0415 (matplotlib once results exist)
    from training.record import plots  # noqa: PLC0415 (matplotlib once results exist)

    class_names = result["class_names"]
    first = next(iter(result["variants"]))
    mistakes = confident_mistakes(data, scored, first, class_names)
    for m in mistakes:
        m["thumbnail"] = data.thumbnail(m["index"])
    gradcams = mistake_gradcams(gradcam_from, mistakes, data, class_names, runs_dir, log) if gradcam_from else {}
    with storage.staged_dir(final, overwrite=False) as staging:
        storage.write_json(staging / "metrics.json", result)
        storage.write_text(staging / "predictions.csv", predictions_csv(data, scored, class_names))
        figures = {}
        for name, row in result["variants"].items():
            figures[f"confusion-{name}.png"] = plots.confusion(
                row["confusion_matrix"], class_names, f"{result['model']} {name}: rows true, columns predicted",
                staging / f"confusion-{name}.png")
        figures["reliability.png"] = plots.reliability(
            {n: r["reliability_bins"] for n, r in result["variants"].items()}, staging / "reliability.png")
        figures["coverage.png"] = plots.coverage({n: r["coverage"] for n, r in result["variants"].items()},
                                                 staging / "coverage.png")
        storage.write_text(staging / "index.html", evaluation_page.render(result, figures, mistakes, first, gradcams))
