"""The eval folder's index.html: one self-contained page (figures and thumbnails inline as base64),
so it can be mailed or attached to a ticket and still open in any browser."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from training.record.page import Doc, esc, img

MISTAKES_STYLE = (".mistakes{display:flex;flex-wrap:wrap;gap:12px}.mistake{width:150px;font-size:12px;"
                  "border:1px solid #ddd;padding:6px}.mistake img{width:128px;height:128px;object-fit:contain;"
                  "image-rendering:pixelated;background:#eee}.gradcam:empty{display:none}")


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    return [[name, r["images"], r["accuracy"], r["top5_accuracy"], r["macro_f1"], r["weighted_f1"], r["ece"],
             round(r["model_images_per_sec"]) if r["model_images_per_sec"] else None,
             r["provider"].replace("ExecutionProvider", "")] for name, r in result["variants"].items()]


SUMMARY_HEADERS = ["variant", "images", "acc", "top-5", "macro F1", "wtd F1", "ECE", "img/s", "provider"]


def scored_classes(result: dict[str, Any]) -> list[str]:
    """Classes with a per-class row in any variant (in the data, or predicted by one), in model order."""
    seen = {c for r in result["variants"].values() for c in r["per_class"]}
    return [c for c in result["class_names"] if c in seen]


def render(result: dict[str, Any], figures: dict[str, Path], mistakes: list[dict[str, Any]], variant: str,
           gradcam: dict[int, bytes] | None = None) -> str:
    """`gradcam`: image index -> a PNG to show beside that mistake (the Grad-CAM of the class it was
    wrongly given, evaluation.mistake_gradcams); its slot on the page stays empty without it."""
    d = result["data"]
    doc = Doc(f"tlserve eval: {result['model']}:{result['version']}", style=MISTAKES_STYLE)
    doc.para(f"Data: {d['source']} ({d['spec']}); {d['scored']:,} of {d['images']:,} images scored; "
             f"runtime {result['runtime']}{' at ' + result['url'] if result['url'] else ''}; {result['created_at']} "
             f"on {result['machine'].get('cpu', '?')}. Every figure below is in metrics.json; "
             "each image's answers are in predictions.csv.")
    if d["skipped_unreadable"]:
        doc.para(f"Skipped as unreadable ({len(d['skipped_unreadable'])}): " + ", ".join(d["skipped_unreadable"]))
    if d["skipped_unknown_class"]:
        doc.para("Skipped, class not known to the model: " + ", ".join(
            f"{c} ({n} images)" for c, n in d["skipped_unknown_class"].items()))

    doc.heading("Summary per variant")
    doc.table(SUMMARY_HEADERS, summary_rows(result))
    doc.para("Precision, recall and F1 are over the classes present in the data or the predictions; "
             "ECE is the expected calibration error over 15 equal-width confidence bins.")

    doc.heading("Per class")
    names = list(result["variants"])
    headers = ["class", "support"] + [f"{v} {m}" for v in names for m in ("precision", "recall", "F1")]
    rows = []
    for c in scored_classes(result):
        support = next(r["per_class"][c]["support"] for r in result["variants"].values() if c in r["per_class"])
        rows.append([c, support] + [result["variants"][v]["per_class"].get(c, {}).get(m)
                                    for v in names for m in ("precision", "recall", "f1")])
    doc.table(headers, rows)

    doc.heading("Abstaining: accuracy against coverage")
    thresholds = [r["threshold"] for r in next(iter(result["variants"].values()))["coverage"]]
    doc.table(["threshold"] + [f"{v} {m}" for v in names for m in ("kept", "accuracy")],
              [[t] + [x for v in names for x in (result["variants"][v]["coverage"][i]["coverage"],
                                                  result["variants"][v]["coverage"][i]["accuracy"])]
               for i, t in enumerate(thresholds)])
    doc.image(figures["coverage.png"], "accuracy of the answers kept against the share kept")

    doc.heading("Calibration")
    doc.image(figures["reliability.png"], "reliability diagram")
    doc.heading("Confusion matrices")
    for name in names:
        doc.image(figures[f"confusion-{name}.png"], f"confusion matrix, {name}")

    doc.heading(f"Most confident mistakes ({variant})")
    if not mistakes:
        doc.para("No mistakes.")
    cards = []
    for m in mistakes:
        thumb = img(m["thumbnail"], m["file"]) if m.get("thumbnail") else ""
        heat = (gradcam or {}).get(m["index"])
        heat_html = img(heat, "Grad-CAM") if heat else ""
        cards.append(f'<div class="mistake">{thumb}<div class="gradcam">{heat_html}</div>'
                     f'<div>{esc(m["file"])}</div><div>true <b>{esc(m["true"])}</b></div>'
                     f'<div>said <b>{esc(m["predicted"])}</b> at {m["confidence"]:.3f}</div></div>')
    doc.raw('<div class="mistakes">' + "".join(cards) + "</div>")
    return doc.render_html()
