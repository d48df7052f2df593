"""A study report as three files: report.md (figures in figures/), one self-contained
report.html (images embedded, no external references, no JavaScript) and metrics.json.

The renderer knows nothing about any particular study: callers assemble the sections.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

from hf_datasets.errors import ChexmemError

PROVENANCE_KEYS = ("model", "data", "seeds", "steps", "features")
MISSING = "—"

CSS = """
body { margin: 0; background: #f4f5f7; color: #1d2330;
  font: 16px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 32px 40px 64px; background: #fff;
  box-sizing: border-box; min-height: 100vh; }
h1 { font-size: 1.9em; line-height: 1.25; margin: 0 0 0.6em; }
h2 { font-size: 1.4em; margin: 2em 0 0.6em; padding-bottom: 0.25em;
  border-bottom: 1px solid #e3e6eb; }
p { margin: 0.6em 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88em;
  background: #f0f2f5; padding: 0.1em 0.35em; border-radius: 3px; }
ul.summary { background: #f3f7fc; border-left: 4px solid #1f77b4; margin: 1em 0;
  padding: 0.8em 1em 0.8em 2.2em; }
nav.toc { margin: 1.2em 0 2em; }
nav.toc h2 { font-size: 1.1em; margin: 0 0 0.3em; border: none; }
nav.toc ol { margin: 0; padding-left: 1.6em; }
a { color: #1f5fa0; text-decoration: none; }
a:hover { text-decoration: underline; }
.table-wrap { overflow-x: auto; margin: 1.4em 0; }
table { border-collapse: collapse; font-size: 0.92em; }
.table-caption { font-size: 0.92em; color: #3b4252; padding-bottom: 0.4em; }
th, td { padding: 0.35em 0.8em; border-bottom: 1px solid #e3e6eb; text-align: left;
  vertical-align: top; }
thead th { background: #eef1f5; border-bottom: 2px solid #c9ced6; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f8f9fb; }
figure { margin: 1.8em 0; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto;
  border: 1px solid #e3e6eb; }
figcaption { font-size: 0.92em; color: #3b4252; margin-top: 0.6em; }
.provenance { display: block; color: #6b7280; font-size: 0.88em; margin-top: 0.25em; }
"""


@dataclass
class Figure:
    """A PNG on disk with its title, caption and where its numbers came from."""

    path: Path
    title: str
    caption: str = ""
    provenance: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.provenance = dict(self.provenance or {})
        missing = [key for key in PROVENANCE_KEYS if not str(self.provenance.get(key, "")).strip()]
        if missing:
            raise ChexmemError(
                f"figure {self.title!r} lacks provenance {', '.join(missing)} "
                f"(every figure names {', '.join(PROVENANCE_KEYS)}; use 'n/a' where one does "
                "not apply)"
            )


@dataclass
class Table:
    """A data frame with its title, caption and (optional) provenance."""

    title: str
    frame: pd.DataFrame
    caption: str = ""
    provenance: dict[str, str] = field(default_factory=dict)


@dataclass
class Section:
    """One headed part of the report: paragraphs, then tables, then figures."""

    title: str
    text: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class ReportPaths:
    """The three files a report is made of."""

    markdown: Path
    html: Path
    metrics: Path


def write_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[Section],
    metrics: dict,
    summary: Sequence[str] = (),
) -> ReportPaths:
    """report.md, report.html and metrics.json in `out_dir`, figures copied to its figures/."""
    out = Path(out_dir)
    figures = [figure for section in sections for figure in section.figures]
    sizes = {id(figure): _png_size(figure) for figure in figures}
    metrics_text = json.dumps(_jsonable(metrics, "metrics"), indent=2, allow_nan=False) + "\n"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    names = _place_figures(figures, out / "figures")
    paths = ReportPaths(out / "report.md", out / "report.html", out / "metrics.json")
    _write_atomic(paths.metrics, metrics_text.encode())
    _write_atomic(paths.markdown, _markdown(title, sections, summary, names).encode())
    _write_atomic(paths.html, _html(title, sections, summary, sizes).encode())
    return paths


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` written to `path` under a temporary name in the same folder, then renamed."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _jsonable(value: Any, where: str) -> Any:
    """`value` as plain JSON types: numpy to Python, non-finite floats to None, paths to str."""
    if isinstance(value, Mapping):
        return {
            (k if isinstance(k, str) else str(_jsonable(k, where))): _jsonable(v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{k}]") for k, v in enumerate(value)]
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    raise ChexmemError(f"{where} has type {type(value).__name__}, which metrics.json cannot hold")


def _png_size(figure: Figure) -> tuple[int, int]:
    """Width and height of a figure's PNG (a clear error when it is missing or not a PNG)."""
    if not figure.path.is_file():
        raise ChexmemError(f"figure {figure.title!r}: no file at {figure.path}")
    try:
        with Image.open(figure.path) as image:
            kind, size = image.format, image.size
    except OSError as error:
        raise ChexmemError(f"figure {figure.title!r}: {figure.path} is not an image") from error
    if kind != "PNG":
        raise ChexmemError(f"figure {figure.title!r}: {figure.path} is a {kind}, not a PNG")
    return size


def _place_figures(figures: Sequence[Figure], folder: Path) -> dict[int, str]:
    """Each figure's file name in `folder`, copying in those that live elsewhere."""
    names: dict[int, str] = {}
    by_source: dict[Path, str] = {}
    taken: set[str] = set()
    for figure in figures:
        source = figure.path.resolve()
        if source in by_source:
            names[id(figure)] = by_source[source]
            continue
        if source.is_relative_to(folder.resolve()):
            name = source.relative_to(folder.resolve()).as_posix()
        else:
            name = _free_name(source, folder, taken)
            if not (folder / name).exists():
                _write_atomic(folder / name, source.read_bytes())
        by_source[source] = names[id(figure)] = name
        taken.add(name)
    return names


def _free_name(source: Path, folder: Path, taken: set[str]) -> str:
    """A file name in `folder` for `source`: its own, or numbered when another file has it."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem).strip("._") or "figure"
    data = source.read_bytes()
    for k in range(1, 10_000):
        name = f"{stem}.png" if k == 1 else f"{stem}-{k}.png"
        target = folder / name
        if name in taken:
            continue
        # the same picture left by an earlier run of the report is reused, not duplicated
        if not target.exists() or target.read_bytes() == data:
            return name
    raise ChexmemError(f"figures/ already holds too many files named like {source.name}")


def _provenance(provenance: Mapping[str, Any]) -> str:
    """'model: … · data: … · …': the five standard keys first, then any others."""
    keys = [k for k in PROVENANCE_KEYS if k in provenance]
    keys += [k for k in provenance if k not in PROVENANCE_KEYS]
    return " · ".join(f"{key}: {provenance[key]}" for key in keys)


def _cell(value: Any) -> str:
    """A table cell as text: floats to 4 significant digits, missing values as a dash."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return MISSING if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return MISSING
    return str(value)


def _is_number(value: Any) -> bool:
    """Whether a cell holds a number (right-aligned in HTML)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[Any]]]:
    """Column names and row values, with a meaningful index made into leading columns."""
    if not isinstance(frame, pd.DataFrame):
        raise ChexmemError(f"a table holds a {type(frame).__name__}, not a pandas DataFrame")
    plain_index = isinstance(frame.index, pd.RangeIndex) and frame.index.name is None
    shown = frame if plain_index else frame.reset_index()
    columns = [
        " / ".join(str(part) for part in col) if isinstance(col, tuple) else str(col)
        for col in shown.columns
    ]
    return columns, [list(row) for row in shown.itertuples(index=False, name=None)]


# ---- markdown


def _md_cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(number: int, table: Table) -> list[str]:
    """A table as GitHub markdown, with its title, caption and provenance."""
    columns, rows = _table_rows(table.frame)
    lines = [f"**Table {number}. {table.title}**", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in columns) + " |")
    lines.append(
        "|" + "|".join("---:" if _numeric(rows, k) else "---" for k in range(len(columns))) + "|"
    )
    lines += ["| " + " | ".join(_md_cell(_cell(v)) for v in row) + " |" for row in rows]
    lines.append("")
    if table.caption:
        lines += [f"*{table.caption}*", ""]
    if table.provenance:
        lines += [_provenance(table.provenance), ""]
    return lines


def _numeric(rows: Sequence[Sequence[Any]], column: int) -> bool:
    """Whether a column holds numbers only (right-aligned)."""
    return bool(rows) and all(_is_number(row[column]) for row in rows)


def _md_figure(number: int, figure: Figure, name: str) -> list[str]:
    """A figure as a markdown image link with its caption and provenance lines."""
    alt = figure.title.replace("[", "\\[").replace("]", "\\]")
    caption = f"Figure {number}. {figure.title}" + (f": {figure.caption}" if figure.caption else "")
    return [
        f"![{alt}](figures/{quote(name)})",
        "",
        f"*{caption}*",
        "",
        _provenance(figure.provenance),
        "",
    ]


def _markdown(
    title: str, sections: Sequence[Section], summary: Sequence[str], names: Mapping[int, str]
) -> str:
    """The whole report as markdown."""
    lines = [f"# {title}", ""]
    if summary:
        lines += [f"- {item}" for item in summary] + [""]
    figure_number = table_number = 0
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.text:
            lines += [paragraph, ""]
        for table in section.tables:
            table_number += 1
            lines += _md_table(table_number, table)
        for figure in section.figures:
            figure_number += 1
            lines += _md_figure(figure_number, figure, names[id(figure)])
    return "\n".join(lines).rstrip() + "\n"


# ---- html


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** marks made into <code> and <strong>."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _section_id(number: int, title: str) -> str:
    """A unique, readable element id for a section."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return f"section-{number}" + (f"-{slug}" if slug else "")


def _html_table(number: int, table: Table) -> str:
    """A table under its title, caption and provenance (as wide as the page, not the table)."""
    columns, rows = _table_rows(table.frame)
    caption = f"<strong>Table {number}. {html.escape(table.title)}</strong>"
    if table.caption:
        caption += f" {_inline(table.caption)}"
    if table.provenance:
        caption += f'<span class="provenance">{html.escape(_provenance(table.provenance))}</span>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(_cell(v))}</td>'
            if _is_number(v)
            else f"<td>{html.escape(_cell(v))}</td>"
            for v in row
        )
        + "</tr>\n"
        for row in rows
    )
    return (
        f'<div class="table-wrap"><div class="table-caption">{caption}</div>\n'
        f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table></div>"
    )


def _html_figure(number: int, figure: Figure, size: tuple[int, int]) -> str:
    """A figure as <figure> with the PNG embedded as a data URI."""
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    caption = f"<strong>Figure {number}. {html.escape(figure.title)}</strong>"
    if figure.caption:
        caption += f" {_inline(figure.caption)}"
    caption += f'<span class="provenance">{html.escape(_provenance(figure.provenance))}</span>'
    return (
        f'<figure id="figure-{number}"><img src="data:image/png;base64,{data}" '
        f'alt="{html.escape(figure.title)}" width="{size[0]}" height="{size[1]}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _html(
    title: str,
    sections: Sequence[Section],
    summary: Sequence[str],
    sizes: Mapping[int, tuple[int, int]],
) -> str:
    """The whole report as one self-contained HTML page."""
    ids = [_section_id(k, section.title) for k, section in enumerate(sections, start=1)]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(
            '<ul class="summary">' + "".join(f"<li>{_inline(s)}</li>" for s in summary) + "</ul>"
        )
    if sections:
        links = "".join(
            f'<li><a href="#{i}">{html.escape(s.title)}</a></li>'
            for i, s in zip(ids, sections, strict=True)
        )
        parts.append(f'<nav class="toc"><h2>Contents</h2><ol>{links}</ol></nav>')
    figure_number = table_number = 0
    for section_id, section in zip(ids, sections, strict=True):
        body = [f"<h2>{html.escape(section.title)}</h2>"]
        body += [f"<p>{_inline(paragraph)}</p>" for paragraph in section.text]
        for table in section.tables:
            table_number += 1
            body.append(_html_table(table_number, table))
        for figure in section.figures:
            figure_number += 1
            body.append(_html_figure(figure_number, figure, sizes[id(figure)]))
        parts.append(f'<section id="{section_id}">\n' + "\n".join(body) + "\n</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(parts) + "\n</main>\n</body>\n</html>\n"
    )
