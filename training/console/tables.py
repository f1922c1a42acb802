"""The terminal tables: how each command shows its result on an 80-column terminal.

The commands in cli.py compute nothing; they hand their result to one function here. Every
function takes the Console to print on (stdout, or stderr when stdout carries JSON).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from serving.base.manifest import Manifest
from training.record.records import TABLE_FIELDS, RunRecord, format_cell, table_row


def fmt(value: Any) -> str:
    return format_cell(value)


def table(title: str, columns: list[str], rows: list[list[str]], *, text: tuple[str, ...] = ()) -> Table:
    """A table that shows every name and number whole on an 80-column terminal: no vertical rules,
    a number column never narrower than its longest value (headers wrap instead), and the `text`
    columns (names) wrap inside their cell rather than being cut."""
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
    for i, col in enumerate(columns):
        if col in text:
            out.add_column(col, overflow="fold", ratio=1, min_width=8)
        else:
            widest = max((len(row[i]) for row in rows), default=1)
            out.add_column(col, justify="right", overflow="fold", min_width=widest)
    for row in rows:
        out.add_row(*row)
    return out


def _say(out: Console, line: str) -> None:
    out.print(line, highlight=False, soft_wrap=True)


# ---- runs ------------------------------------------------------------------------------------

# Short headers for the run table (its CSV keeps the full field names).
RUN_HEADERS = {"model": "model", "epochs": "epochs", "avg_epoch_time_sec": "s/epoch", "total_time_sec": "total s",
               "test_accuracy": "test acc", "trainable_params": "trainable", "non_trainable_params": "frozen",
               "epochs_to_target": "to target", "macro_f1": "macro F1"}


def print_runs(out: Console, title: str, records: list[RunRecord]) -> None:
    """Seed 001's columns plus epochs_to_target, one row per run (`runs` and `compare`)."""
    rows = [[fmt(table_row(r)[c]) for c in TABLE_FIELDS] for r in records]
    out.print(table(title, [RUN_HEADERS.get(c, c) for c in TABLE_FIELDS], rows, text=("model",)))


def print_record(out: Console, run) -> None:
    """One finished run: data, model, parameters, timing, test figures, calibration."""
    r = run.record
    row = table_row(r)
    facts_table = Table(title=f"run {r.name}", show_header=False)
    facts_table.add_column(style="bold", no_wrap=True)
    facts_table.add_column(overflow="fold")
    m, t = r.model, r.test
    facts = {
        "data": f"{r.data.source}, {r.data.num_classes} classes, splits {r.data.splits}",
        "model": f"{m.backbone} / {m.strategy}, input {m.input_shape[0]}x{m.input_shape[1]} -> {m.input_size}, "
                 f"{m.layers} layers (depth {m.depth})",
        "params": f"total {m.total_params:,}  trainable {m.trainable_params:,}  non-trainable {m.non_trainable_params:,}",
        "epochs": f"{row['epochs']}  (avg {row['avg_epoch_time_sec']:.2f}s, total {row['total_time_sec']:.1f}s)",
        "epochs_to_target": f"{row['epochs_to_target']} (target {r.target})",
        "test": f"accuracy {t.accuracy:.4f}  loss {t.loss:.4f}"
                + (f"  macro F1 {t.macro_f1:.4f}" if t.macro_f1 is not None else ""),
        "record": str(run.path / "record.json"),
    }
    cal = r.calibration
    if cal is not None and cal.temperature is not None:
        facts["calibration"] = (f"temperature {cal.temperature:.3f}; test ECE {cal.test_ece_before:.4f} -> "
                                f"{cal.test_ece_after:.4f} (val {cal.val_ece_before:.4f} -> {cal.val_ece_after:.4f})")
    elif cal is not None and cal.skipped:
        facts["calibration"] = f"skipped: {cal.skipped}"
    for key, value in facts.items():
        facts_table.add_row(key, value)
    out.print(facts_table)


def print_interrupted(out: Console, paused: list[tuple[str, int]]) -> None:
    for name, epochs in paused:
        _say(out, f"interrupted after {epochs} epoch(s): {name}  (continue: tlserve train --resume {name})")


# ---- models before training ------------------------------------------------------------------


def print_summary(out: Console, result: dict, image_size: int, num_classes: int, *, layers: bool) -> None:
    """`tlserve summary`: counts per phase, and with `layers` every layer of the last phase."""
    counts = Table(title=f"{result['backbone']} / {result['strategy']}: {image_size}x{image_size} images -> input "
                         f"{result['input_size']}, {num_classes} classes")
    counts.add_column("")
    for phase in result["phases"]:
        counts.add_column(phase["phase"], justify="right")
    for key in ("layers", "depth", "total_params", "trainable_params", "non_trainable_params", "trainable_layers", "frozen_layers"):
        counts.add_row(key, *(f"{phase['facts'][key]:,}" for phase in result["phases"]))
    out.print(counts)
    if layers:
        listing = Table(title="layers (last phase)")
        for col in ("#", "layer", "type", "params", "trainable"):
            listing.add_column(col)
        for i, layer in enumerate(result["layers"]):
            listing.add_row(str(i), layer["name"], layer["type"], f"{layer['params']:,}", "yes" if layer["trainable"] else "no")
        out.print(listing)


def print_backbones(out: Console) -> None:
    """The backbones `--backbone` accepts, and the CNN presets `--cnn-layers` accepts."""
    from training.model.backbones import CNN_PRESETS, CNN_TOKENS, REGISTRY  # noqa: PLC0415

    listing = Table(title="backbones")
    for col in ("name", "weights", "default input", "preprocess", "description"):
        listing.add_column(col)
    for spec in REGISTRY.values():
        listing.add_row(spec.name, "imagenet | none | PATH" if spec.pretrained else "none (random init)",
                        str(spec.default_input or "image size"), spec.preprocess, spec.description)
    out.print(listing)
    presets = Table(title="CNN presets (--cnn-layers)", caption=f"Tokens: {CNN_TOKENS}.")
    presets.add_column("preset")
    presets.add_column("layers")
    presets.add_column("padding")
    for preset, (spec, padding) in CNN_PRESETS.items():
        presets.add_row(preset, spec, padding)
    out.print(presets)


# ---- exports ---------------------------------------------------------------------------------


def gate_verdict(gate: dict) -> str:
    """The accuracy gate's verdict on one kept variant, printed under the export table."""
    return (f"kept: accuracy drop {gate['accuracy_drop_points']:.2f} pt, worst class "
            f"{gate['worst_class']!r} {gate['worst_class_drop_points']:.2f} pt")


def print_export(out: Console, path: Path, manifest: Manifest) -> None:
    """Each file with its size, parity with Keras, test figures and the accuracy gate's decision."""
    rejected = manifest.rejected
    rows = [[file, f"{facts.bytes / 1e6:.2f}", f"{facts.max_abs_diff:.2e}", f"{facts.top1_agreement:.0%}",
             fmt(facts.test_accuracy), fmt(facts.accuracy_delta), fmt(facts.test_ece),
             "—" if facts.gate is None else ("NOT KEPT" if file in rejected else "kept")]
            for file, facts in {**manifest.artifacts, **rejected}.items()]
    out.print(table(f"exported {manifest.name}:{manifest.version}",
                    ["file", "MB", "max diff", "top-1 agree", "test acc", "delta", "ECE", "gate"], rows,
                    text=("file", "gate")))
    for file, facts in manifest.artifacts.items():  # too long for a cell; export logged the rejected ones
        if facts.gate is not None:
            _say(out, f"gate: {file} {gate_verdict(facts.gate)}")
    _say(out, f"max diff: largest |output - Keras output| on the check batch; folder: {path}")
    if not manifest.export.check_informative:
        out.print("[bold yellow]note:[/] every check image gave the same output, so the agreement above says "
                  "nothing about whether the runtimes compute the same function", highlight=False, soft_wrap=True)


def print_models(out: Console, rows: list[dict]) -> None:
    """`tlserve models`: one row per export, then where each one lives."""
    from serving.catalog import shown_tag  # noqa: PLC0415

    out.print(table("exported models", ["name", "backbone", "strategy", "test acc", "MB", "variants"],
                    [[r["name"], r["backbone"], r["strategy"], fmt(r["test_accuracy"]), fmt(r["onnx_mb"]),
                      r["variants"].replace(",", " ")] for r in rows], text=("name", "variants")))
    for r in rows:
        tag = shown_tag(r)
        _say(out, f"{r['name']}: {r['where']}" + (f"  (BentoML {tag})" if tag else ""))


def print_predictions(out: Console, title: str, results: list) -> None:
    listing = Table(title=title)
    listing.add_column("image")
    listing.add_column("prediction")
    for r in results:
        listing.add_row(r.path, ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r.top))
    out.print(listing)


def print_errors(out: Console, failures: list[str]) -> None:
    for failure in failures:
        out.print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)  # a path stays on one line


# ---- evaluation and data ---------------------------------------------------------------------


def print_eval(out: Console, result: dict) -> None:
    """`tlserve eval`: the summary per variant, per-class figures, and accuracy when abstaining."""
    from training.exported.evaluation_page import SUMMARY_HEADERS, scored_classes, summary_rows  # noqa: PLC0415

    d = result["data"]
    _say(out, f"{d['source']}: {d['scored']:,} of {d['images']:,} images scored")
    out.print(table(f"eval {result['model']}:{result['version']}", SUMMARY_HEADERS,
                    [[fmt(c) for c in row] for row in summary_rows(result)], text=("variant", "provider")))
    names = list(result["variants"])
    first = result["variants"][names[0]]["per_class"]
    out.print(table(f"per class ({names[0]}; F1 of the others)",
                    ["class", "support", "precision", "recall", "F1", *[f"{v} F1" for v in names[1:]]],
                    [[c, *[fmt(first.get(c, {}).get(m)) for m in ("support", "precision", "recall", "f1")],
                      *[fmt(result["variants"][v]["per_class"].get(c, {}).get("f1")) for v in names[1:]]]
                     for c in scored_classes(result)], text=("class",)))
    thresholds = [r["threshold"] for r in result["variants"][names[0]]["coverage"]]
    out.print(table("abstaining below a confidence threshold: share kept, accuracy of those kept",
                    ["threshold", *[f"{v} {m}" for v in names for m in ("kept", "acc")]],
                    [[f"{t:g}", *[fmt(result["variants"][v]["coverage"][i][m]) for v in names
                                  for m in ("coverage", "accuracy")]] for i, t in enumerate(thresholds)]))
    for label, items in (("unreadable", d["skipped_unreadable"]), ("unknown class", d["skipped_unknown_class"])):
        if items:
            _say(out, f"skipped ({label}): " + ", ".join(f"{k} ({v})" for k, v in items.items()))
    _say(out, f"wrote {result['path']} (metrics.json, predictions.csv, index.html)")


def print_data_check(out: Console, d: dict, folder: Path) -> None:
    """`tlserve data check`: leaks, duplicates, balance, image facts and anything unreadable."""
    def say(line: str) -> None:
        out.print(line, highlight=False)

    say(f"{d['source']}: " + ", ".join(f"{s} {n:,}" for s, n in d["splits"].items()))
    rows = [[k, f"{v['images']:,}", f"{v['of']:,}", f"{v['percent']:.2f}%"] for k, v in d["leaks"].items()]
    out.print(table("leaks across splits", ["which", "images", "of", "share"], rows or [["none", "0", "", ""]],
                    text=("which",)))
    rows = [[k, f"{v['exact']:,}", f"{v['near']:,}"] for k, v in d["duplicates"].items()]
    out.print(table("duplicate pairs", ["splits", "exact", "near"], rows or [["none", "0", "0"]], text=("splits",)))
    names = d["class_names"]
    splits = list(d["balance"])
    rows = [[c, *[f"{d['balance'][s]['counts'][c]:,}" for s in splits]] for c in names]
    rows.append(["largest/smallest", *[str(d["balance"][s]["largest_smallest_ratio"]) for s in splits]])
    out.print(table("class balance", ["class", *splits], rows, text=("class",)))
    facts = d["images"]
    say("sizes: " + ", ".join(f"{k} {sum(v.values()):,}" for k, v in list(facts["sizes"].items())[:6])
        + (" ..." if len(facts["sizes"]) > 6 else ""))
    say("kinds: " + (", ".join(f"{k} {v:,}" for k, v in facts["kinds"].items() if v) or "all plain RGB"))
    for line in facts["class_outliers"]:
        say(f"warning: {line}")
    if d["label_conflicts"]:
        say(f"warning: {len(d['label_conflicts']):,} label conflict(s): the same image under two classes")
    for u in d["unreadable"]:
        say(f"unreadable: {u['file']}: {u['why']}")
    for f in d["not_images"]:
        say(f"not an image: {f}")
    say(f"embeddings: {d['embeddings']}; search: {d['search']['used']}")
    say(f"report: {folder / 'index.html'} and {folder / 'report.json'} ({d['seconds'].get('total', 0):.1f} s)")


# ---- tune ------------------------------------------------------------------------------------

def trial_printer(out: Console, names: list[str]):
    """Prints one line per finished trial of `tlserve tune`, under a header printed before the first."""
    widths = [max(8, len(n)) for n in names]
    header = f"{'trial':>5}  {'state':<8}  {'val acc':>7}  {'ran':>6}  {'seconds':>7}  " + \
             "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    printed = []

    def show(row) -> None:
        if not printed:
            _say(out, header)
            printed.append(True)
        values = "  ".join(f"{_param(row.params.get(n)):>{w}}" for n, w in zip(names, widths))
        _say(out, f"{row.number:>5}  {row.state:<8}  {fmt(row.val_accuracy):>7}  {fmt(row.epochs):>6}  "
                  f"{fmt(row.seconds):>7}  {values}")

    return show


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else fmt(value)


def print_tune(out: Console, result) -> None:
    """The study's outcome: the best trial, and the best and default configurations' test accuracy."""
    s = result.summary
    counts = ", ".join(f"{n} {state}" for state, n in sorted(s["trials"].items()))
    best = result.best
    _say(out, f"study {result.study}: {counts}; search {s['search']['seconds']:.1f}s wall, "
              f"{s['search']['cpu_seconds']:.1f}s CPU (features {s['search']['extract_seconds']:.1f}s)")
    _say(out, f"best: trial {best.number}, val accuracy {fmt(best.val_accuracy)}: "
              + ", ".join(f"{k}={_param(v)}" for k, v in best.params.items()))
    rows = [[label, facts["name"], fmt(facts["val_accuracy"]), fmt(facts["test_accuracy"])]
            for label, facts in (("best", s["best_run"]), ("default", s["default_run"])) if facts]
    if rows:
        out.print(table("test split, measured once after the search", ["configuration", "run", "val acc", "test acc"],
                        rows, text=("run",)))
    _say(out, f"recipe: {result.recipe}   (tlserve train --config {result.recipe})")
    _say(out, f"study folder: {result.folder}")
