"""The terminal tables: how each command shows its result on an 80-column terminal.

The commands in cli.py compute nothing; they hand their result to one function here. Every
function takes the Console to print on (stdout, or stderr when stdout carries JSON).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from serving.base.manifest import Manifest
from training.audit.report import DataCheckReport, LabelIssues
from training.record.records import TABLE_FIELDS, RunRecord, format_cell, leak_of, table_row


def fmt(value: Any) -> str:
    return format_cell(value)


GAP = 2  # columns between two table columns (rich's SIMPLE_HEAD box without edges, collapsed padding)
SHORT_HEADER = 10  # headers up to this long are never wrapped
PROSE_MIN = 20  # a prose column (descriptions, lists) is given at least this many columns, or its longest word


def table(out: Console, title: str, columns: list[str], rows: list[list[str]], *, text: tuple[str, ...] = (),
          prose: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    """Print a table that shows every name and number whole at the console's width (80 columns when
    output is piped). Names (`text`) and numbers never wrap and are never cut; a header wraps at its
    spaces; `prose` columns wrap their words. When the columns cannot all fit, the `optional` ones
    are left out in the order given, and a line says which; if the names alone are too wide, each
    row is printed as a block of `header: value` lines instead."""
    shown = list(columns)
    while _width(shown, columns, rows, prose) > out.width and any(c in shown for c in optional):
        shown.remove(next(c for c in optional if c in shown))
    keep = [columns.index(c) for c in shown]
    if _width(shown, columns, rows, prose) > out.width:
        return _blocks(out, title, columns, rows)
    widths = _header_room({i: _natural(i, columns[i], rows) for i in keep if columns[i] not in prose}, columns,
                          out.width - _width(shown, columns, rows, prose))
    grid = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                 title_justify="left")
    for i in keep:
        col = columns[i]
        header = Text(col, no_wrap=False, overflow="fold")
        if col in prose:
            grid.add_column(header, overflow="fold", min_width=_prose_min(i, col, rows))
        else:
            grid.add_column(header, justify="left" if col in text else "right", no_wrap=True, width=widths[i])
    for row in rows:
        grid.add_row(*(row[i] for i in keep))
    out.print(grid)
    left_out = [c for c in columns if c not in shown]
    if left_out:
        out.print(f"(not shown at {out.width} columns: {', '.join(left_out)})", highlight=False)


def _header_room(widths: dict[int, int], columns: list[str], spare: int) -> dict[int, int]:
    """Widen name and number columns so that their headers fit on one line, the ones that need the
    fewest extra columns first, as far as the spare width goes; the rest wrap at their spaces."""
    for i in sorted(widths, key=lambda i: len(columns[i]) - widths[i]):
        extra = max(0, len(columns[i]) - widths[i])
        if extra <= spare:
            widths[i], spare = widths[i] + extra, spare - extra
    return widths


def _natural(i: int, header: str, rows: list[list[str]]) -> int:
    """A name's or number's column: its longest value, or its header, which wraps at its spaces only
    when longer than SHORT_HEADER (so "macro F1" stays one phrase)."""
    head = len(header) if len(header) <= SHORT_HEADER else max(len(w) for w in header.split())
    return max([head] + [len(row[i]) for row in rows])


def _prose_min(i: int, header: str, rows: list[list[str]]) -> int:
    longest_word = max([len(w) for w in header.split()] + [len(w) for row in rows for w in row[i].split()])
    return min(max(longest_word, PROSE_MIN), _natural_line(i, header, rows))


def _natural_line(i: int, header: str, rows: list[list[str]]) -> int:
    return max([len(header)] + [len(row[i]) for row in rows])


def _width(shown: list[str], columns: list[str], rows: list[list[str]], prose: tuple[str, ...]) -> int:
    widths = [(_prose_min if c in prose else _natural)(columns.index(c), c, rows) for c in shown]
    return sum(widths) + GAP * (len(widths) - 1)


def _blocks(out: Console, title: str, columns: list[str], rows: list[list[str]]) -> None:
    """The narrowest form: the first column's value on a line of its own, then each other column's."""
    _say(out, title)
    for row in rows:
        _say(out, row[0])
        for col, value in zip(columns[1:], row[1:]):
            _say(out, f"  {col}: {value}")


def _say(out: Console, line: str) -> None:
    out.print(line, highlight=False, soft_wrap=True)


# ---- runs ------------------------------------------------------------------------------------

# Headers for the run table (its CSV keeps the full field names); a header wraps at its spaces.
RUN_HEADERS = {"model": "model", "epochs": "epochs", "avg_epoch_time_sec": "s per epoch", "total_time_sec": "total s",
               "test_accuracy": "test acc", "trainable_params": "trainable params",
               "non_trainable_params": "frozen params", "epochs_to_target": "epochs to target", "macro_f1": "macro F1"}
# Seconds to one decimal; accuracies and F1 to four.
RUN_DIGITS = {"avg_epoch_time_sec": 1, "total_time_sec": 1}
# Left out, in this order, when 80 columns cannot hold every column.
RUN_OPTIONAL = ("non_trainable_params", "trainable_params", "total_time_sec", "epochs_to_target", "avg_epoch_time_sec",
                "epochs")


def print_runs(out: Console, title: str, records: list[RunRecord]) -> None:
    """The training table, one row per run (`runs` and `compare`): its columns plus epochs to target
    and macro F1; a starred accuracy counts test images the run learned from."""
    rows = [[format_cell(table_row(r)[c], RUN_DIGITS.get(c, 4)) + ("*" if c == "test_accuracy" and leak_of(r) else "")
             for c in TABLE_FIELDS] for r in records]
    table(out, title, [RUN_HEADERS[c] for c in TABLE_FIELDS], rows, text=(RUN_HEADERS["model"],),
          optional=tuple(RUN_HEADERS[c] for c in RUN_OPTIONAL))
    for r in records:
        if leak := leak_of(r):
            _say(out, f"* {r.name} is LEAKY: {leak.note()}")


def print_record(out: Console, run) -> None:
    """One finished run: data, model, parameters, timing, test figures, calibration."""
    r = run.record
    row = table_row(r)
    facts_table = Table(title=f"run {r.name}", show_header=False)
    facts_table.add_column(style="bold", no_wrap=True)
    facts_table.add_column(overflow="fold")
    m, t = r.model, r.test
    facts = {
        "data": f"{r.data.source}, {r.data.num_classes} classes; images: "
                + ", ".join(f"{split} {n:,}" for split, n in r.data.splits.items()),
        "model": f"{m.backbone} / {m.strategy}, input {m.input_shape[0]}x{m.input_shape[1]} -> {m.input_size}, "
                 f"{m.layers} layers (depth {m.depth})",
        "params": f"total {m.total_params:,}  trainable {m.trainable_params:,}  non-trainable {m.non_trainable_params:,}",
        "epochs": f"{row['epochs']}  ({row['avg_epoch_time_sec']:.1f} s each on average, {row['total_time_sec']:.1f} s "
                  "in all)",
        "to target": (f"val accuracy reached {r.target:g} at epoch {row['epochs_to_target']}"
                      if row["epochs_to_target"] is not None else f"val accuracy never reached {r.target:g}"),
        "test": f"accuracy {t.accuracy:.4f}  loss {t.loss:.4f}"
                + (f"  macro F1 {t.macro_f1:.4f}" if t.macro_f1 is not None else ""),
        "record": str(run.path / "record.json"),
    }
    leak = leak_of(r)
    if leak:
        facts["test"] += f"; LEAKY: {leak.note()}"
    cal = r.calibration
    if cal is not None:
        facts["calibration"] = calibration_line(cal)
    for key, value in facts.items():
        facts_table.add_row(key, Text(value))
    if cal is not None and cal.test_nll_rose:
        from training.fit.calibration import nll_rose_warning  # noqa: PLC0415

        facts_table.add_row(Text("WARNING", style="bold red"), Text(nll_rose_warning(cal.to_dict()), style="bold red"))
    out.print(facts_table)


def calibration_line(cal) -> str:
    """What calibration did, with the log-loss (NLL) beside the ECE: a temperature can lower the ECE
    while the NLL rises, i.e. make the model certain of its mistakes."""
    def change(split: str) -> str:
        nll, ece = (getattr(cal, f"{split}_{m}_before") for m in ("nll", "ece"))
        nll_after, ece_after = (getattr(cal, f"{split}_{m}_after") for m in ("nll", "ece"))
        if nll is None:
            return ""
        if nll_after is None:
            return f"; {split} NLL {nll:.4f}, ECE {ece:.4f}"
        return f"; {split} NLL {nll:.4f} -> {nll_after:.4f}, ECE {ece:.4f} -> {ece_after:.4f}"

    judged = (f" (judged on {cal.val_images:,} val images, {cal.val_errors:,} wrong)"
              if cal.val_errors is not None else "")
    if cal.temperature is None:
        return f"none: {cal.skipped}" + change("test")
    return f"temperature {cal.temperature:.3f}{judged}" + change("val") + change("test")


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


def int8_summary(facts) -> str:
    """What stayed float in an int8 file, how many tries the fallback took, and its speed against fp32."""
    k, n = facts.kept_float["convolutions"], facts.kept_float["of_convolutions"]
    what = f"first {k} of {n} convolutions kept float32" if k else f"all {n} convolutions int8"
    tries = len(facts.int8_tries or [1])
    speed = ", ".join(f"{b.replace('_', ' ')} {v['speedup']:.2f}x fp32 ({v['int8']:.2f} vs {v['fp32']:.2f} ms)"
                      for b, v in (facts.speed or {}).items())
    slower = facts.speed and all(v["speedup"] < 1 for v in facts.speed.values())
    note = "; slower than fp32 on this machine: serve fp32 here" if slower else ""
    return f"{what} ({tries} {'try' if tries == 1 else 'tries'}); {speed}{note}"


def print_export(out: Console, path: Path, manifest: Manifest) -> None:
    """Each file with its size, parity with Keras, test figures and the accuracy gate's decision."""
    rejected = manifest.rejected
    rows = [[file, f"{facts.bytes / 1e6:.2f}", f"{facts.max_abs_diff:.2e}", f"{facts.top1_agreement:.0%}",
             fmt(facts.test_accuracy), fmt(facts.accuracy_delta), fmt(facts.test_ece),
             "—" if facts.gate is None else ("NOT KEPT" if file in rejected else "kept")]
            for file, facts in {**manifest.artifacts, **rejected}.items()]
    table(out, f"exported {manifest.name}:{manifest.version}",
          ["file", "MB", "max diff", "top-1 agree", "test acc", "delta", "ECE", "gate"], rows, text=("file", "gate"))
    for file, facts in manifest.artifacts.items():  # too long for a cell; export logged the rejected ones
        if facts.gate is not None:
            _say(out, f"gate: {file} {gate_verdict(facts.gate)}")
    for file, facts in {**manifest.artifacts, **rejected}.items():
        if facts.kept_float is not None:
            _say(out, f"int8 ({file}): {int8_summary(facts)}")
    _say(out, f"max diff: largest |output - Keras output| on the check batch; folder: {path}")
    if not manifest.export.check_informative:
        out.print("[bold yellow]note:[/] every check image gave the same output, so the agreement above says "
                  "nothing about whether the runtimes compute the same function", highlight=False, soft_wrap=True)


def print_models(out: Console, rows: list[dict]) -> None:
    """`tlserve models`: one row per export, then where each one lives."""
    from serving.catalog import shown_tag  # noqa: PLC0415

    table(out, "exported models", ["name", "backbone", "strategy", "test acc", "MB", "variants"],
          [[r["name"], r["backbone"], r["strategy"], fmt(r["test_accuracy"]), fmt(r["onnx_mb"]),
            r["variants"].replace(",", " ")] for r in rows], text=("name", "backbone", "strategy"), prose=("variants",))
    for r in rows:
        tag = shown_tag(r)
        _say(out, f"{r['name']}: {r['where']}" + (f"  (BentoML {tag})" if tag else ""))


def print_predictions(out: Console, title: str, results: list) -> None:
    """`tlserve predict`: one row per image, named by the part of its path that differs from the
    others' (relative to the folder they share), so that every row can be told apart; with the OOD
    score where the model has one."""
    paths = [Path(os.path.abspath(r.path)) for r in results]
    base = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path.cwd()
    scored = any(r.ood_score is not None for r in results)
    rows = []
    for p, r in zip(paths, results):
        row = [p.relative_to(base).as_posix(), ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r.top)]
        if scored:
            row.append("-" if r.ood_score is None else f"{r.ood_score:.3g}" + ("" if r.in_distribution else " OUT"))
        rows.append(row)
    table(out, title, ["image", "prediction"] + (["OOD score"] if scored else []), rows, text=("image",),
          prose=("prediction",))
    _say(out, f"image paths are relative to {base}")
    if scored:
        _say(out, "OOD score: how unlike the training images an image is; OUT: above the model's threshold")


def print_errors(out: Console, failures: list[str]) -> None:
    for failure in failures:
        out.print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)  # a path stays on one line


# ---- evaluation and data ---------------------------------------------------------------------


def print_eval(out: Console, result: dict) -> None:
    """`tlserve eval`: the summary per variant, per-class figures, and accuracy when abstaining."""
    from training.exported.evaluation_page import SUMMARY_HEADERS, scored_classes, summary_rows  # noqa: PLC0415

    d = result["data"]
    _say(out, f"{d['source']}: {d['scored']:,} of {d['images']:,} images scored")
    table(out, f"eval {result['model']}:{result['version']}", SUMMARY_HEADERS,
          [[fmt(c) for c in row] for row in summary_rows(result)], text=("variant", "provider"))
    names = list(result["variants"])
    first = result["variants"][names[0]]["per_class"]
    table(out, f"per class ({names[0]}; F1 of the others)",
          ["class", "support", "precision", "recall", "F1", *[f"{v} F1" for v in names[1:]]],
          [[c, *[fmt(first.get(c, {}).get(m)) for m in ("support", "precision", "recall", "f1")],
            *[fmt(result["variants"][v]["per_class"].get(c, {}).get("f1")) for v in names[1:]]]
           for c in scored_classes(result)], text=("class",))
    thresholds = [r["threshold"] for r in result["variants"][names[0]]["coverage"]]
    table(out, "abstaining below a confidence threshold: share kept, accuracy of those kept",
          ["threshold", *[f"{v} {m}" for v in names for m in ("kept", "acc")]],
          [[f"{t:g}", *[fmt(result["variants"][v]["coverage"][i][m]) for v in names
                        for m in ("coverage", "accuracy")]] for i, t in enumerate(thresholds)])
    for label, items in (("unreadable", d["skipped_unreadable"]), ("unknown class", d["skipped_unknown_class"])):
        if items:
            _say(out, f"skipped ({label}): " + ", ".join(f"{k} ({v})" for k, v in items.items()))
    if result.get("ood"):
        o = result["ood"]
        out.print(table(f"OOD: {o['scored']:,} images of {o['folder']} against the {d['scored']:,} above "
                        f"({o['method']}, threshold {o['threshold']:.4g})",
                        ["variant", "AUROC", "max-softmax AUROC", "in accepted", "OOD flagged"],
                        [[v, fmt(r["auroc"]), fmt(r["msp_auroc"]), fmt(r["in_accepted"]), fmt(r["ood_flagged"])]
                         for v, r in o["variants"].items()], text=("variant",)))
    _say(out, f"wrote {result['path']} (metrics.json, predictions.csv, index.html)")


def print_data_check(out: Console, d: DataCheckReport, folder: Path, suspects: Path | None = None) -> None:
    """`tlserve data check`: leaks, duplicates, label issues, balance, image facts and anything unreadable."""
    def say(line: str) -> None:
        out.print(line, highlight=False)

    say(f"{d.source}: " + ", ".join(f"{s} {n:,}" for s, n in d.splits.items()))
    rows = [[k, f"{v.images:,}", f"{v.of:,}", f"{v.percent:.2f}%"] for k, v in d.leaks.items()]
    table(out, "leaks across splits", ["which", "images", "of", "share"], rows or [["none", "0", "", ""]],
          text=("which",))
    rows = [[k, f"{v['exact']:,}", f"{v['near']:,}"] for k, v in d.duplicates.items()]
    table(out, "duplicate pairs", ["splits", "exact", "near"], rows or [["none", "0", "0"]], text=("splits",))
    _print_label_issues(out, d.label_issues, suspects)
    splits = list(d.balance)
    rows = [[c, *[f"{d.balance[s].counts[c]:,}" for s in splits]] for c in d.class_names]
    rows.append(["largest/smallest", *[str(d.balance[s].largest_smallest_ratio) for s in splits]])
    table(out, "class balance", ["class", *splits], rows, text=("class",))
    facts = d.images
    say("sizes: " + ", ".join(f"{k} {sum(v.values()):,}" for k, v in list(facts.sizes.items())[:6])
        + (" ..." if len(facts.sizes) > 6 else ""))
    say("kinds: " + (", ".join(f"{k} {v:,}" for k, v in facts.kinds.items() if v) or "all plain RGB"))
    for line in facts.class_outliers:
        say(f"warning: {line}")
    if d.label_conflicts:
        say(f"warning: {len(d.label_conflicts):,} label conflict(s): the same image under two classes")
    for u in d.unreadable:
        say(f"unreadable: {u['file']}: {u['why']}")
    for f in d.not_images:
        say(f"not an image: {f}")
    say(f"embeddings: {d.embeddings}; search: {d.search.used if d.search else 'exact'}")
    say(f"report: {folder / 'index.html'} and {folder / 'report.json'} ({d.seconds.get('total', 0):.1f} s)")


def _print_label_issues(out: Console, issues: LabelIssues | None, suspects: Path | None, shown: int = 15) -> None:
    """The most suspect labels: file, given and suggested class, score and both probabilities."""
    if issues is None:
        return
    if issues.status != "done":
        out.print(f"label issues: skipped: {issues.why}", highlight=False)
        return
    rows = [[s.file, s.given, s.suggested, f"{s.score:.3f}", f"{s.probabilities.get(s.given, 0):.2f}",
             f"{s.probabilities.get(s.suggested, 0):.2f}"] for s in issues.suspects[:shown]]
    title = (f"label issues: {len(issues.suspects):,} suspect(s) of {issues.images:,} images (out-of-fold accuracy "
             f"{issues.out_of_fold_accuracy:.3f}; most suspect first)")
    table(out, title, ["file", "given", "suggested", "score", "p(given)", "p(suggested)"],
          rows or [["none", "", "", "", "", ""]], text=("file", "given", "suggested"))
    if len(issues.suspects) > shown:
        out.print(f"... {len(issues.suspects) - shown:,} more in report.json", highlight=False)
    if issues.caution:
        out.print(f"caution: {issues.caution}", highlight=False)
    if suspects is not None:
        out.print(f"suspects' list: {suspects} (tlserve train --exclude {suspects} drops them from training)",
                  highlight=False)


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
        table(out, "test split, measured once after the search", ["configuration", "run", "val acc", "test acc"],
              rows, text=("run",))
    _say(out, f"recipe: {result.recipe}   (tlserve train --config {result.recipe})")
    _say(out, f"study folder: {result.folder}")
