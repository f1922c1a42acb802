"""The one builder of tlserve's pages: `tlserve compare`'s report (Markdown and HTML at once), `tlserve
eval`'s index.html, and the data check's.

A page is self-contained: figures and thumbnails are inline (base64 data URIs), so it can be mailed or
attached to a ticket and still open in any browser. Every text given as text is escaped here; a fragment
a page builds itself (a card of thumbnails) is made from `esc` and `img` and added with `raw`.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable

from training.record.records import format_cell

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
         "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%}figure{margin:1em 0}")


def esc(text: Any) -> str:
    return html.escape(str(text))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def img(data: bytes, alt: str = "", mime: str = "image/png") -> str:
    """An inline <img> of encoded image bytes (PNG, JPEG)."""
    return f'<img alt="{esc(alt)}" src="{data_uri(data, mime)}">'


class Doc:
    """A page as Markdown and HTML at once, so the two never disagree. `extra_style` (or `style`) is CSS
    added after the shared STYLE."""

    extra_style = ""

    def __init__(self, title: str, *, style: str | None = None):
        self.title = title
        if style is not None:
            self.extra_style = style
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{esc(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{esc(text)}</h2>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{esc(text)}</p>")

    def bullets(self, items: Iterable[str], *, empty: str | None = None) -> None:
        """A list; `empty` is the one item shown when there is none (e.g. "none")."""
        items = list(items) or ([empty] if empty is not None else [])
        self.md += [f"- {i}" for i in items] + [""]
        self.html.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")

    def table(self, headers: list[str], rows: list[list[Any]], *, empty: str | None = None) -> None:
        """Cells through records.format_cell (floats to 4 places, ints with separators, None as a dash);
        with no rows, `empty` (e.g. "none found") fills one row across the table."""
        cells = [[format_cell(c) for c in row] for row in rows]
        self.md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.md += ["| " + " | ".join(row) + " |" for row in cells] + [""]
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells)
        if not cells and empty is not None:
            self.md[-1:-1] = [f"| {empty} |"]
            body = f"<tr><td colspan={len(headers)}>{esc(empty)}</td></tr>"
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path, alt: str) -> None:
        """A figure saved beside the page: linked from the Markdown, inline in the HTML."""
        self.md += [f"![{alt}]({path.name})", ""]
        self.html.append(f'<figure><img alt="{esc(alt)}" src="{data_uri(path.read_bytes())}"></figure>')

    def figure(self, data: bytes, alt: str, mime: str = "image/png") -> None:
        """A figure that exists only in the page (e.g. a chart drawn for it)."""
        self.md += [f"({alt})", ""]
        self.html.append(f"<figure>{img(data, alt, mime)}</figure>")

    def raw(self, fragment: str, md: str | None = None) -> None:
        """HTML the caller built from esc() and img() (cards of thumbnails); `md` stands for it in Markdown."""
        self.html.append(fragment)
        if md is not None:
            self.md += [md, ""]

    def render_md(self) -> str:
        return "\n".join(self.md) + "\n"

    def render_html(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>"
                f"<style>{STYLE}{self.extra_style}</style></head><body>" + "\n".join(self.html) + "</body></html>\n")
