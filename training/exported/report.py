"""`tlserve compare`: one report (Markdown + a self-contained HTML page + PNGs) over runs,
their exports and their benchmarks, ending with the seeds' questions answered from the numbers.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serving.base import formats, storage
from serving.base.errors import UserError
from serving.base.manifest import Manifest, ModelFolder, local_folders
from training.record import plots, records

SERVE_RUNTIME = "onnx"


@dataclass
class Entry:
    record: records.RunRecord
    manifest: Manifest | None
    bench: dict[str, Any] | None  # latest in-process bench of its export
    evaluation: dict[str, Any] | None = None  # latest `tlserve eval` of that export (its metrics.json)

    @property
    def name(self) -> str:
        return self.record.name

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
        bench = storage.read_json(benches[-1]) if benches else None
        previous = found.get(manifest.run)
        # A benchmarked export beats an unbenchmarked one; then the newest wins.
        rank = (bench is not None, manifest.created_at)
        if previous is None or rank > (previous[1] is not None, previous[0].created_at):
            found[manifest.run] = (manifest, bench, latest_eval(folder.path))
    return found


def latest_eval(model_dir: Path) -> dict[str, Any] | None:
    """The newest in-process `tlserve eval` stored under the model folder (an HTTP eval measures the
    service, not the variants), or None."""
    stored = []
    for path in ModelFolder(Path(model_dir)).eval_results():
        try:
            result = storage.read_json(path)
        except (OSError, ValueError):
            continue
        if result.get("kind") == "eval" and result.get("runtime") != "http":
            stored.append(result)
    return max(stored, key=lambda r: r.get("created_at", ""), default=None)




class Doc:
    """The report as Markdown and HTML at once, so the two never disagree."""

    extra_style = ""

    def __init__(self, title: str):
        self.title = title
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]) -> None:
        self.md += [f"- {i}" for i in items] + [""]
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        cells = [[records.format_cell(c) for c in row] for row in rows]
        self.md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.md += ["| " + " | ".join(row) + " |" for row in cells] + [""]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path, alt: str) -> None:
        self.md += [f"![{alt}]({path.name})", ""]
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>')

    def render_html(self) -> str:
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
                 "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
                 "img{max-width:100%}figure{margin:1em 0}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}{self.extra_style}</style></head><body>" + "\n".join(self.html) + "</body></html>\n")


def build(run_refs: list[str], out: Path, *, runs_dir: Path | None = None,
          models_dir: Path | None = None) -> tuple[Path, list[Entry]]:
    """Write the report folder; returns it with the entries it was made from."""
    entries = gather(run_refs, runs_dir, models_dir)
    storage.remove_stale_staging(Path(out).resolve().parent, Path(out).name)
    with storage.staged_dir(Path(out), overwrite=True) as staging:
        _write(entries, staging)
    return Path(out), entries


def _write(entries: list[Entry], folder: Path) -> None:
    recs = [e.record for e in entries]
    doc = Doc("tlserve comparison")
    machines = sorted({(r.environment.machine if r.environment else {}).get("cpu", "?") for r in recs})
    doc.para(f"{len(entries)} run(s); training machine(s): {', '.join(machines)}. Every figure below is read from "
             "the runs' records, their export manifests and stored benchmarks.")

    doc.heading("Training (seed 001's table)")
    doc.table(list(records.TABLE_FIELDS), [[records.table_row(r)[f] for f in records.TABLE_FIELDS] for r in recs])

    doc.heading("Frozen vs fine-tuned (seed 000's table)")
    rows = []
    for e in entries:
        r = e.record
        strategy = r.model.strategy
        frozen = r.test.phase1_accuracy if strategy == "finetune" else \
            (r.test.accuracy if strategy == "frozen" else None)
        tuned = r.test.accuracy if strategy != "frozen" else None
        rows.append([e.name, r.model.backbone, strategy, frozen, tuned, r.model.total_params,
                     r.model.trainable_params, r.model.non_trainable_params])
    doc.table(["run", "backbone", "strategy", "frozen accuracy", "fine-tuned / trained accuracy", "total params",
               "trainable params", "frozen params"], rows)

    doc.heading("Deployment: size and latency beside accuracy")
    rows = []
    for e in entries:
        a = e.manifest.artifacts if e.manifest else {}
        fp32, int8 = a.get(formats.BY_VARIANT["fp32"].file), a.get(formats.BY_VARIANT["int8"].file)
        rows.append([e.name, e.record.test.accuracy, fp32.bytes / 1e6 if fp32 else None,
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

    distillation_section(doc, entries)

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

    doc.heading("Curves")
    as_json = [r.to_dict() for r in recs]  # the plots read the record.json shape
    doc.image(plots.curves(as_json, folder / "curves.png"), "training and validation accuracy and loss per epoch")
    doc.image(plots.accuracy_bars(as_json, folder / "test_accuracy.png"), "test accuracy per run")
    points = [(e.name, e.latency(), e.record.test.accuracy) for e in entries if e.latency() is not None]
    if points:
        doc.image(plots.tradeoff(points, folder / "accuracy_vs_latency.png"), "accuracy against serving latency")
    else:
        doc.para("No benchmarked exports yet, so no accuracy-vs-latency plot.")

    doc.heading("Per-class accuracy, precision, recall, F1 and confusion matrices")
    for e in entries:
        t = e.record.test
        scores = t.per_class  # records before precision/recall/F1 were recorded lack it
        if scores:
            doc.table(["class", f"{e.name} accuracy", "precision", "recall", "F1", "support"],
                      [[c, a, scores[c]["precision"], scores[c]["recall"], scores[c]["f1"], scores[c]["support"]]
                       for c, a in t.per_class_accuracy.items()])
            doc.para(f"{e.name}: macro F1 {records.format_cell(t.macro_f1)}, "
                     f"weighted F1 {records.format_cell(t.weighted_f1)}.")
        else:
            doc.table(["class", f"{e.name} accuracy"], [[c, a] for c, a in t.per_class_accuracy.items()])
        doc.image(plots.confusion(t.confusion_matrix, e.record.data.class_names, e.name,
                                  folder / f"confusion-{e.name}.png"), f"confusion matrix of {e.name}")

    doc.heading("Answers")
    doc.bullets(answers(entries))
    (folder / "report.md").write_text("\n".join(doc.md) + "\n", encoding="utf-8")
    (folder / "report.html").write_text(doc.render_html(), encoding="utf-8")


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
    out = []
    best = max(entries, key=lambda e: e.record.test.accuracy)
    tied = [e.name for e in entries if e is not best and e.record.test.accuracy == best.record.test.accuracy]
    out.append(f"Most accurate: {best.name} at {best.record.test.accuracy:.4f} test accuracy"
               + (f" (tied with {', '.join(tied)})" if tied else "") + f" — {_facts(best)}.")
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
