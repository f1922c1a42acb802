"""`tlserve compare`: one report (Markdown + a self-contained HTML page + PNGs) over runs,
their exports and their benchmarks, ending with the seeds' questions answered from the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serving.base import formats, storage
from serving.base.errors import UserError
from serving.base.manifest import Manifest, ModelFolder, local_folders
from serving.timing import InprocessBench
from training.record import plots, records
from training.record.page import Doc

SERVE_RUNTIME = "onnx"


LEAK_NOTE = ("A test image that copies an image the model learned from (train, or val, which chose the epochs "
             "and the temperature) is answered from memory: such a run's test accuracy reads high. Leak-free "
             "accuracy counts only the other test images. When any run leaked, 'Most accurate' ranks every run by "
             "it; a leaky run that recorded none is not ranked.")


@dataclass
class Entry:
    record: records.RunRecord
    manifest: Manifest | None
    bench: dict[str, Any] | None  # latest in-process bench of its export
    evaluation: dict[str, Any] | None = None  # latest `tlserve eval` of that export (its metrics.json)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def leak(self) -> records.Leak | None:
        return records.leak_of(self.record)

    def latency(self, runtime: str = SERVE_RUNTIME, batch: int = 1) -> float | None:
        for row in (self.bench or {}).get("results", []):
            if row["runtime"] == runtime and row["batch_size"] == batch:
                return row["p50_ms"]
        return None


def gather(run_refs: list[str], runs_dir: Path | None, models_dir: Path | None) -> list[Entry]:
    runs = [records.load_run(r, runs_dir) for r in run_refs] if run_refs else records.list_runs(runs_dir)
    if not runs:
        raise UserError(f"no finished runs in {storage.runs_dir(runs_dir)}; train one with `tlserve train`")
    exports = _exports(models_dir)
    return [Entry(run.record, *exports.get(run.name, (None, None, None))) for run in runs]


Export = tuple[Manifest, Optional[dict[str, Any]], Optional[dict[str, Any]]]


def _exports(models_dir: Path | None) -> dict[str, Export]:
    """run name → (manifest, latest in-process bench, latest eval) of its export (the newest
    benchmarked one, if any)."""
    found: dict[str, Export] = {}
    for folder in local_folders(models_dir):
        manifest = folder.manifest()
        benches = folder.bench_results("inprocess")
        bench = InprocessBench.read(benches[-1]).to_dict() if benches else None
        previous = found.get(manifest.run)
        # A benchmarked export beats an unbenchmarked one; then the newest wins.
        rank = (bench is not None, manifest.created_at)
        if previous is None or rank > (previous[1] is not None, previous[0].created_at):
            found[manifest.run] = (manifest, bench, latest_eval(folder.path))
    return found


def latest_eval(model_dir: Path) -> dict[str, Any] | None:
    """The newest in-process `tlserve eval` stored under the model folder (an HTTP eval measures the
    service, not the variants), or None."""
    from training.exported.evaluation import EvalMetrics  # noqa: PLC0415

    stored = []
    for path in ModelFolder(Path(model_dir)).eval_results():
        try:
            result = EvalMetrics.read(path).to_dict()
        except (OSError, UserError):  # unreadable, or not an eval's metrics.json
            continue
        if result.get("kind") == "eval" and result.get("runtime") != "http":
            stored.append(result)
    return max(stored, key=lambda r: r.get("created_at", ""), default=None)


def build(run_refs: list[str], out: Path, *, runs_dir: Path | None = None,
          models_dir: Path | None = None) -> tuple[Path, list[Entry]]:
    """Write the report folder; returns it with the entries it was made from."""
    entries = gather(run_refs, runs_dir, models_dir)
    storage.remove_stale_staging(Path(out).resolve().parent, Path(out).name)
    with storage.staged_dir(Path(out), overwrite=True) as staging:
        _write(entries, staging)
    return Path(out), entries


def _write(entries: list[Entry], folder: Path) -> None:
    doc = Doc("tlserve comparison")
    machines = sorted({(e.record.environment.machine if e.record.environment else {}).get("cpu", "?") for e in entries})
    doc.para(f"{len(entries)} run(s); training machine(s): {', '.join(machines)}. Every figure below is read from "
             "the runs' records, their export manifests and stored benchmarks.")
    for section in (_leaks, _training, _frozen_vs_tuned, _deployment, distillation_section, _evals):
        section(doc, entries)
    _figures(doc, entries, folder)
    _per_class(doc, entries, folder)
    doc.heading("Answers")
    doc.bullets(answers(entries))
    (folder / "report.md").write_text("\n".join(doc.md) + "\n", encoding="utf-8")
    (folder / "report.html").write_text(doc.render_html(), encoding="utf-8")


def _accuracy(e: Entry, value: float | None) -> Any:
    """A test-split figure of a run, marked where the run's test images copy images it learned from."""
    leak = e.leak
    if leak is None or value is None:
        return value
    return f"{records.format_cell(value)} (LEAKY: {leak.note()})"


def _leaks(doc: Doc, entries: list[Entry]) -> None:
    """Test accuracy beside the accuracy on the test images the run's data check found no copy of."""
    doc.heading("Test images that copy training images (the runs' data checks)")
    rows = []
    for e in entries:
        t, check = e.record.test, e.record.data_check
        copies = e.leak.copies if e.leak else (None if check is None else 0)
        verdict = "not checked" if check is None else ("LEAKY" if e.leak else "no copies found")
        rows.append([e.name, verdict, t.accuracy, e.record.data.splits["test"], copies,
                     t.leak_free_accuracy, t.leak_free_images,
                     "off" if check is None else check.mode + (" (--drop-leaks)" if check.dropped else "")])
    doc.table(["run", "test split", "test accuracy", "test images", "copies of train/val images", "leak-free accuracy",
               "leak-free images", "data check"], rows)
    doc.para(LEAK_NOTE)


def _training(doc: Doc, entries: list[Entry]) -> None:
    doc.heading("Training (seed 001's table)")
    column = records.TABLE_FIELDS.index("test_accuracy")
    rows = []
    for e in entries:
        row = [records.table_row(e.record)[f] for f in records.TABLE_FIELDS]
        row[column] = _accuracy(e, row[column])
        rows.append(row)
    doc.table(list(records.TABLE_FIELDS), rows)


def _frozen_vs_tuned(doc: Doc, entries: list[Entry]) -> None:
    doc.heading("Frozen vs fine-tuned (seed 000's table)")
    rows = []
    for e in entries:
        r = e.record
        strategy = r.model.strategy
        frozen = r.test.phase1_accuracy if strategy == "finetune" else \
            (r.test.accuracy if strategy == "frozen" else None)
        tuned = r.test.accuracy if strategy != "frozen" else None
        rows.append([e.name, r.model.backbone, strategy, _accuracy(e, frozen), _accuracy(e, tuned),
                     r.model.total_params, r.model.trainable_params, r.model.non_trainable_params])
    doc.table(["run", "backbone", "strategy", "frozen accuracy", "fine-tuned / trained accuracy", "total params",
               "trainable params", "frozen params"], rows)


def _deployment(doc: Doc, entries: list[Entry]) -> None:
    doc.heading("Deployment: size and latency beside accuracy")
    rows = []
    for e in entries:
        a = e.manifest.artifacts if e.manifest else {}
        fp32, int8 = a.get(formats.BY_VARIANT["fp32"].file), a.get(formats.BY_VARIANT["int8"].file)
        rows.append([e.name, _accuracy(e, e.record.test.accuracy), fp32.bytes / 1e6 if fp32 else None,
                     int8.bytes / 1e6 if int8 else None, int8.accuracy_delta if int8 else None,
                     e.latency("keras"), e.latency("onnx"), e.latency("onnx-int8"), e.latency("onnx", 32)])
    doc.table(["run", "test accuracy", "onnx MB", "int8 MB", "int8 accuracy delta", "keras p50 ms (b1)",
               "onnx p50 ms (b1)", "int8 p50 ms (b1)", "onnx p50 ms (b32)"], rows)
    missing = [e.name for e in entries if e.manifest is None]
    unbenched = [e.name for e in entries if e.manifest is not None and e.bench is None]
    if missing:
        doc.para(f"Not exported: {', '.join(missing)} (`tlserve export RUN`).")
    if unbenched:
        doc.para(f"Exported but not benchmarked: {', '.join(unbenched)} (`tlserve bench MODEL`).")


def _evals(doc: Doc, entries: list[Entry]) -> None:
    doc.heading("Exported variants on labelled data (tlserve eval) beside their latency")
    rows = []
    for e in entries:
        ev = e.evaluation
        for variant, m in (ev or {}).get("variants", {}).items():
            # eval names ONNX rows by variant (fp32), bench by runtime (onnx)
            runtime = formats.BY_VARIANT[variant].runtime if variant in formats.BY_VARIANT else variant
            rows.append([e.name, variant, ev["data"]["source"], m["images"], m["accuracy"], m["macro_f1"], m["ece"],
                         e.latency(runtime), e.latency(runtime, 32), m.get("model_images_per_sec")])
    if rows:
        doc.table(["run", "variant", "eval data", "images", "accuracy", "macro F1", "ECE", "p50 ms (b1)",
                   "p50 ms (b32)", "eval images/s"], rows)
    else:
        doc.para("No stored evals yet (tlserve eval MODEL --data SPEC).")


def _figures(doc: Doc, entries: list[Entry], folder: Path) -> None:
    doc.heading("Curves")
    as_json = [e.record.to_dict() for e in entries]  # the plots read the record.json shape
    doc.image(plots.curves(as_json, folder / "curves.png"), "training and validation accuracy and loss per epoch")
    leaky = {e.name: e.leak.free_accuracy for e in entries if e.leak is not None}
    doc.image(plots.accuracy_bars(as_json, folder / "test_accuracy.png", leaky=leaky), "test accuracy per run")
    points = [(e.name + (" (LEAKY)" if e.leak else ""), e.latency(), e.record.test.accuracy)
              for e in entries if e.latency() is not None]
    if points:
        doc.image(plots.tradeoff(points, folder / "accuracy_vs_latency.png"), "accuracy against serving latency")
    else:
        doc.para("No benchmarked exports yet, so no accuracy-vs-latency plot.")


def _per_class(doc: Doc, entries: list[Entry], folder: Path) -> None:
    doc.heading("Per-class accuracy, precision, recall, F1 and confusion matrices")
    for e in entries:
        t = e.record.test
        name = e.name + (f" (LEAKY: {e.leak.copies:,} of {e.leak.of:,} test images are copies)" if e.leak else "")
        scores = t.per_class  # records before precision/recall/F1 were recorded lack it
        if scores:
            doc.table(["class", f"{name} accuracy", "precision", "recall", "F1", "support"],
                      [[c, a, scores[c]["precision"], scores[c]["recall"], scores[c]["f1"], scores[c]["support"]]
                       for c, a in t.per_class_accuracy.items()])
            doc.para(f"{name}: macro F1 {records.format_cell(t.macro_f1)}, "
                     f"weighted F1 {records.format_cell(t.weighted_f1)}.")
        else:
            doc.table(["class", f"{name} accuracy"], [[c, a] for c, a in t.per_class_accuracy.items()])
        doc.image(plots.confusion(t.confusion_matrix, e.record.data.class_names, name,
                                  folder / f"confusion-{e.name}.png"), f"confusion matrix of {name}")


def most_accurate(entries: list[Entry]) -> str:
    """The most accurate run. When any run's test images copy its training images, every run is ranked by
    its leak-free accuracy (a clean run's equals its accuracy) and a leaky run without one is not ranked."""
    leaky = [e for e in entries if e.leak is not None]
    if not leaky:
        score, what = (lambda e: e.record.test.accuracy), "test accuracy"
        ranked = entries
    else:
        score, what = (lambda e: e.record.test.accuracy if e.leak is None else e.leak.free_accuracy), \
            "leak-free test accuracy"
        ranked = [e for e in entries if score(e) is not None]
    unranked = [e.name for e in entries if e not in ranked]
    skip = f" Not ranked: {', '.join(unranked)} (leaky; no leak-free accuracy recorded)." if unranked else ""
    if not ranked:
        return f"Most accurate: none can be told: every run leaked and none recorded a leak-free accuracy.{skip}"
    best = max(ranked, key=score)
    tied = [e.name for e in ranked if e is not best and score(e) == score(best)]
    mark = "" if best.leak is None else f" (LEAKY, {best.record.test.accuracy:.4f} on all test images: {best.leak.note()})"
    others = "".join(f" {e.name} is LEAKY ({e.record.test.accuracy:.4f} on all test images): {e.leak.note()}."
                     for e in leaky if e is not best)
    return (f"Most accurate: {best.name} at {score(best):.4f} {what}{mark}"
            + (f" (tied with {', '.join(tied)})" if tied else "") + f" — {_facts(best)}.{others}{skip}")


def distillation_section(doc: Doc, entries: list[Entry]) -> None:
    """Each distilled run (--teacher) beside its teacher: accuracy on the same test split, size, latency."""
    students = [e for e in entries if e.record.distillation is not None]
    if not students:
        return
    by_name = {e.name: e for e in entries}
    doc.heading("Distillation: student beside teacher")
    rows = []
    for s in students:
        d, teacher = s.record.distillation, by_name.get(s.record.distillation.teacher)
        rows.append([s.name, d.teacher, s.record.test.accuracy, d.teacher_test_accuracy, s.record.model.total_params,
                     d.teacher_params, s.latency(), teacher.latency() if teacher else None, d.temperature, d.weight])
    doc.table(["student", "teacher", "student test acc", "teacher test acc", "student params", "teacher params",
               "student onnx p50 ms (b1)", "teacher onnx p50 ms (b1)", "temperature", "weight"], rows)


def _facts(e: Entry) -> str:
    m = e.record.model
    share = m.trainable_params / m.total_params if m.total_params else 0
    return (f"{m.backbone} / {m.strategy}: depth {m.depth} layers, {m.total_params:,} parameters of which "
            f"{share:.1%} trainable, {e.record.epochs} epochs at input {m.input_size}x{m.input_size}")


def answers(entries: list[Entry]) -> list[str]:
    """The seeds' questions, answered by comparing the recorded numbers."""
    out = [most_accurate(entries)]
    fastest = min(entries, key=lambda e: e.record.total_time_sec)
    per_epoch = min(entries, key=lambda e: e.record.avg_epoch_time_sec or float("inf"))
    out.append(f"Fastest to train: {fastest.name} in {fastest.record.total_time_sec:.1f} s in total — {_facts(fastest)}.")
    if per_epoch is not fastest:
        cached = per_epoch.record.training is not None and per_epoch.record.training.feature_cache
        out.append(f"Fastest per epoch: {per_epoch.name} at {per_epoch.record.avg_epoch_time_sec:.2f} s per epoch"
                   + (" (head trained on cached backbone features)." if cached else "."))
    served = [e for e in entries if e.latency() is not None]
    if served:
        quick = min(served, key=lambda e: e.latency())
        out.append(f"Fastest to serve: {quick.name} at {quick.latency():.3f} ms p50 (onnxruntime, batch 1, "
                   f"{quick.bench['machine'].get('cpu', '?')}) with {quick.record.model.total_params:,} parameters.")
    else:
        out.append("Fastest to serve: not measured yet (export and `tlserve bench` the runs).")
    for s in (e for e in entries if e.record.distillation is not None):
        d, teacher = s.record.distillation, next((e for e in entries if e.name == s.record.distillation.teacher), None)
        speed = (f", {s.latency():.3f} ms vs {teacher.latency():.3f} ms p50 at batch 1"
                 if teacher is not None and s.latency() is not None and teacher.latency() is not None else "")
        out.append(f"Distilled: {s.name} ({s.record.model.total_params:,} parameters) reaches {s.record.test.accuracy:.4f} "
                   f"test accuracy taught by {d.teacher} ({d.teacher_params:,} parameters, {d.teacher_test_accuracy:.4f})"
                   f"{speed}.")
    if len(entries) > 1:
        slow = max(entries, key=lambda e: e.record.total_time_sec)
        s, f = slow.record, fastest.record
        out.append(f"Why, in the records: {slow.name} took {s.total_time_sec / max(f.total_time_sec, 1e-9):.1f}x "
                   f"as long as {fastest.name} — {s.epochs} epochs over {s.data.splits['train']:,} training "
                   f"images vs {f.epochs} over {f.data.splits['train']:,}, {s.model.trainable_params:,} "
                   f"vs {f.model.trainable_params:,} trainable parameters, depth {s.model.depth} vs "
                   f"{f.model.depth}, input {s.model.input_size} vs {f.model.input_size} px.")
    return out
