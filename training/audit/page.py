"""The data check's folder: report.json and a self-contained index.html.

The page carries everything inline (thumbnails as base64 JPEG, the class-balance chart as a base64
PNG), so it can be mailed or attached to a ticket and still show every pair.
"""
from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from serving.base import storage
from serving.base.errors import UserError
from training.audit.analysis import Report
from training.audit.fingerprints import SPLITS
from training.audit.labels import suspect_list
from training.audit.report import DataCheckReport, Entry, LabelIssues, PairItem

THUMB = 128          # px on the longer side: enough to judge "same scene" at a glance
PAGE_PAIRS = 600     # pairs shown per section; the JSON lists them all
PAGE_SUSPECTS = 300  # label suspects shown; the JSON lists them all


def default_out() -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return storage.home() / "data-check" / stamp


def write(report: Report, out: Path, *, overwrite: bool = False, suspects: Path | None = None) -> Path:
    """report.json + index.html in `out`, all or nothing; with `suspects`, the label suspects' list there too."""
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; pick a new folder")
    issues = report.facts.label_issues
    if suspects is not None and (issues is None or issues.status != "done"):
        why = "fast mode" if issues is None else issues.why
        raise UserError(f"--suspects {suspects}: no label issues were looked for ({why})")
    with storage.staged_dir(out, overwrite=True) as staging:
        storage.write_json(staging / "report.json", report.facts.to_dict())
        storage.write_text(staging / "index.html", page(report))
    if suspects is not None:
        storage.write_text(Path(suspects), suspect_list(issues))
    return out


def page(report: Report) -> str:
    d = report.facts
    leaks_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v.images:,}</td><td>{v.of:,}</td><td>{v.percent:.2f}%</td></tr>"
        for k, v in d.leaks.items()) or "<tr><td colspan=4>none found</td></tr>"
    dup_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['exact']:,}</td><td>{v['near']:,}</td></tr>"
                       for k, v in d.duplicates.items()) or "<tr><td colspan=3>none found</td></tr>"
    sections = [
        _head(d),
        f"<p>splits: {', '.join(f'{s} {n:,}' for s, n in d.splits.items())}</p>",
        "<h2>Leaks: held-out images with a copy in an earlier split</h2><table><tr><th>which</th><th>images</th>"
        f"<th>of</th><th>share</th></tr>{leaks_rows}</table>",
        f"<h2>Duplicate pairs</h2><table><tr><th>splits</th><th>exact</th><th>near</th></tr>{dup_rows}</table>"
        + ("<p><b>Pair search stopped early: too many pairs (see pairs_truncated).</b></p>" if d.pairs_truncated else ""),
        _pairs_html("Label conflicts: the same image under two classes", d.label_conflicts, report),
        _pairs_html("Pairs across splits (leaks)", [p for p in d.pairs if p.a.split != p.b.split], report),
        _pairs_html("Pairs within a split", [p for p in d.pairs if p.a.split == p.b.split], report),
        _labels_html(d.label_issues, report),
        "<h2>Class balance</h2>" + _balance_html(d) + _chart(d),
        "<h2>Image sizes, modes and formats</h2>" + _facts_html(d),
        _files_html(d),
    ]
    style = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:90%}"
             ".pair{display:inline-block;margin:.4em;padding:.3em;border:1px solid #ddd;font-size:75%;"
             "width:270px;vertical-align:top}.pair img{width:128px;height:128px;object-fit:contain;"
             "background:#eee}.conflict{border-color:#c00}.suspect{width:400px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tlserve data check</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


def _head(d: DataCheckReport) -> str:
    th = d.thresholds
    return (f"<h1>Data check</h1><p>{html.escape(d.source)}<br>mode {d.mode}; thresholds: pHash distance &le; "
            f"{th['phash_distance']} bits with pixel correlation &ge; {th['pixel_correlation']}, "
            f"embedding cosine &ge; {th['cosine']} (full mode); embeddings: "
            f"{html.escape(d.embeddings)}; search: {html.escape(_search_line(d))}; {d.seconds.get('total', 0):.1f} s</p>")


def _pairs_html(title: str, pairs: list[PairItem], report: Report) -> str:
    if not pairs:
        return f"<h2>{html.escape(title)}</h2><p>none found</p>"
    cards = []
    for item in pairs[:PAGE_PAIRS]:
        cos = "" if item.cosine is None else f", cos {item.cosine:.3f}"
        conflict = " conflict" if item.a.label != item.b.label else ""
        cards.append(
            f"<div class='pair{conflict}'>{_img(report, item.a.row)} {_img(report, item.b.row)}<br>{item.kind} "
            f"({item.how}, {item.hamming} bits, pixels r {item.pixel_correlation:.2f}{cos})<br>{_who(item.a)}<br>"
            f"{_who(item.b)}</div>")
    more = f"<p>{len(pairs) - PAGE_PAIRS:,} more in report.json</p>" if len(pairs) > PAGE_PAIRS else ""
    return f"<h2>{html.escape(title)} ({len(pairs):,})</h2>{''.join(cards)}{more}"


def _labels_html(issues: LabelIssues | None, report: Report) -> str:
    """Each suspect beside its given class's and its suggested class's most typical image."""
    title = "<h2>Label issues: images whose label the data argues against</h2>"
    if issues is None:
        return f"{title}<p>not looked for (fast mode)</p>"
    if issues.status != "done":
        return f"{title}<p>skipped: {html.escape(issues.why)}</p>"
    head = (f"{title}<p>{html.escape(issues.method or '')}; {html.escape(issues.classifier or '')}; out-of-fold "
            f"accuracy {issues.out_of_fold_accuracy:.3f}; {html.escape(issues.why)}. Left: the image; middle: a typical "
            "image of its given class; right: of the suggested class.</p>")
    if issues.caution:
        head += f"<p class='caution'><b>Caution:</b> {html.escape(issues.caution)}</p>"
    cards = []
    for s in issues.suspects[:PAGE_SUSPECTS]:
        given, suggested = issues.typical.get(s.given), issues.typical.get(s.suggested)
        cards.append(
            f"<div class='pair suspect'>{_img(report, s.row)} {_img(report, given and given.row)} "
            f"{_img(report, suggested and suggested.row)}<br>{html.escape(s.split)}: {html.escape(s.file)}<br>given "
            f"<b>{html.escape(s.given)}</b> (p {s.probabilities.get(s.given, 0):.2f}), suggested "
            f"<b>{html.escape(s.suggested)}</b> (p {s.probabilities.get(s.suggested, 0):.2f}); score {s.score:.3f}</div>")
    more = f"<p>{len(issues.suspects) - PAGE_SUSPECTS:,} more in report.json</p>" if len(issues.suspects) > PAGE_SUSPECTS else ""
    return head + "".join(cards) + more


def _who(e: Entry) -> str:
    return f"{html.escape(e.split)}: {html.escape(e.file)} [{html.escape(e.label)}]"


def _img(report: Report, row: int | None) -> str:
    if row is None or report.thumbnail is None:
        return "<span>(no image)</span>"
    try:
        img = report.thumbnail(row)
    except Exception:  # the file changed since the check read it: say so in place of the picture
        return "<span>(unreadable now)</span>"
    img = img.copy()
    if max(img.size) > THUMB:
        img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=88)
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _balance_html(d: DataCheckReport) -> str:
    splits = list(d.balance)
    head = "".join(f"<th>{s}</th>" for s in splits)
    body = "".join(f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{d.balance[s].counts[c]:,}</td>" for s in splits)
                   + "</tr>" for c in d.class_names)
    ratio = "".join(f"<td>{d.balance[s].largest_smallest_ratio}</td>" for s in splits)
    return f"<table><tr><th>class</th>{head}</tr>{body}<tr><th>largest / smallest</th>{ratio}</tr></table>"


def _chart(d: DataCheckReport) -> str:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    names = d.class_names
    splits = list(d.balance)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.5))
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(names))
    for i, s in enumerate(splits):
        ax.bar(x + i * width, [d.balance[s].counts[c] for c in names], width, label=s)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f"<p><img alt='class balance' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'></p>"


def _facts_html(d: DataCheckReport) -> str:
    facts = d.images
    size_rows = "".join(f"<tr><td>{html.escape(size)}</td>" + "".join(f"<td>{c.get(s, 0):,}</td>" for s in SPLITS) + "</tr>"
                        for size, c in list(facts.sizes.items())[:50])
    kinds = ", ".join(f"{k} {v:,}" for k, v in facts.kinds.items())
    modes = ", ".join(f"{k} {v:,}" for k, v in facts.modes.items())
    formats = ", ".join(f"{k} {v:,}" for k, v in facts.formats.items())
    cameras = ", ".join(f"{html.escape(k)} {v:,}" for k, v in facts.cameras.items())
    outliers = "".join(f"<li>{html.escape(line)}</li>" for line in facts.class_outliers) or "<li>none</li>"
    return (f"<table><tr><th>size (WxH)</th>{''.join(f'<th>{s}</th>' for s in SPLITS)}</tr>{size_rows}</table>"
            f"<p>kinds: {kinds}<br>modes: {modes}<br>formats: {formats}<br>cameras (EXIF): {cameras}</p>"
            f"<p>classes that differ in size, format, mode or camera from the others:</p><ul>{outliers}</ul>")


def _files_html(d: DataCheckReport) -> str:
    bad = "".join(f"<li>{html.escape(u['file'])}: {html.escape(u['why'])}</li>" for u in d.unreadable) or "<li>none</li>"
    other = "".join(f"<li>{html.escape(f)}</li>" for f in d.not_images) or "<li>none</li>"
    return (f"<h2>Files that will not decode</h2><ul>{bad}</ul>"
            f"<h2>Files that are not images (skipped by training)</h2><ul>{other}</ul>")


def _search_line(d: DataCheckReport) -> str:
    """How the pairs were searched (reports written before the faiss switch have no "search")."""
    how = d.search
    if how is None:
        return "exact"
    return how.used + (f" ({how.index})" if how.index else "") + f": {how.why}"
