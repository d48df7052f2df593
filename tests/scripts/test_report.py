"""The study report: metrics.json, report.md, a self-contained report.html, the PIL plots it
shows, and the page as a headless Chromium renders it."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from detect.plots import (
    HEAT_HIGH,
    MARGIN,
    TOKEN_GAP,
    TOKEN_HEIGHT,
    bar_chart,
    roc_plot,
    scatter_plot,
    token_heatmap,
)
from hf_datasets.errors import ChexmemError
from scripts.report import PROVENANCE_KEYS, Figure, ReportPaths, Section, Table, write_report
from tests.helpers import open_in_chromium

LAYERS = [
    f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.to_v"
    for b in range(3)
    for a in range(2)
]
PROMPTS = [
    (
        "dup 1",
        ["frontal", "chest", "radiograph", "with", "cardiomegaly"],
        [0.1, 0.2, 0.3, 0.4, 2.0],
    ),
    ("dup 2", ["portable", "lateral", "view", "pleural", "effusion"], [0.5, 3.0, 0.2, 0.1, 0.0]),
    ("dup 3", ["no", "finding"], [0.7, 0.1]),
]
SCRIPT_TITLE = "<script>alert('x')</script> & co"


def provenance(model: str) -> dict[str, str]:
    """A complete provenance record for a figure from `model`."""
    return {
        "model": model,
        "data": "phantom 64px <dup>",
        "seeds": "0-3",
        "steps": "25",
        "features": "n/a",
    }


def strong_red(pixel: tuple[int, int, int]) -> bool:
    """Whether a pixel is (close to) the heat map's strongest shade."""
    return all(abs(a - b) <= 12 for a, b in zip(pixel, HEAT_HIGH, strict=True))


@pytest.fixture(scope="module")
def plots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real figures from detect.plots, drawn outside the report folder."""
    folder = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(0)
    fpr = np.linspace(0, 1, 21)
    # two distinct pictures with the same file name, to check neither overwrites the other
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return {
        "scatter": scatter_plot(
            rng.normal(size=40),
            rng.normal(size=40),
            ["duplicated", "ordinary"] * 20,
            folder / "scatter.png",
            "score against copy similarity",
            "noise magnitude",
            "NCC",
        ),
        "roc": roc_plot({"CFG": (fpr, fpr**0.3), "no CFG": (fpr, fpr)}, folder / "roc.png", "ROC"),
        "bars": bar_chart(
            LAYERS * 2,
            [3, 10, 0, 25, 7, 1, 5, 2, float("nan"), 8, 30, 4],
            folder / "neurons.png",
            "memorization neurons per layer",
            "neurons",
            "layer",
            groups=["CFG"] * 6 + ["no CFG"] * 6,
        ),
        "heat": token_heatmap(PROMPTS, folder / "tokens.png", "trigger tokens"),
        "same_a": roc_plot({"a": (fpr, fpr**0.5)}, folder / "a" / "plot.png", "A"),
        "same_b": roc_plot({"b": (fpr, fpr**2)}, folder / "b" / "plot.png", "B"),
    }


METRICS = {
    "auc": np.float64(0.912345),
    "counts": np.arange(3),
    "tpr": [np.float32(0.5), float("nan")],
    "nested": {"missing": np.float32("nan"), "flag": np.bool_(True), "n": np.int64(7)},
    "model": Path("/models/cfg"),
}


@pytest.fixture(scope="module")
def sections(plots: dict[str, Path]) -> list[Section]:
    """Sections with every kind of content, one figure already inside figures/."""
    frame = pd.DataFrame(
        {
            "model": ["CFG", "no CFG", "a|b"],
            "AUC": [0.912345, float("nan"), 0.5],
            "prompts": [42, 17, 3],
        }
    )
    return [
        Section(
            "Data",
            text=["Phantom radiographs with `inject_duplicates` and **15 copies** each."],
            tables=[Table("Detection", frame, caption="AUC of duplicated prompts")],
        ),
        Section(
            "Detection",
            text=["Scores and ROC."],
            figures=[
                Figure(plots["scatter"], "Scatter", "magnitude vs NCC", provenance("cfg")),
                Figure(plots["roc"], "ROC curves", "", provenance("cfg, no-cfg")),
            ],
        ),
        Section(
            "Neurons",
            figures=[Figure(plots["bars"], "Neurons per layer", "NeMo", provenance("cfg"))],
        ),
        Section(
            "Trigger tokens",
            figures=[
                Figure(plots["heat"], "Token heat map", "top 3 prompts", provenance("cfg")),
                Figure(plots["same_a"], "Same name A", "", provenance("a")),
                Figure(plots["same_b"], "Same name B", "", provenance("b")),
            ],
        ),
        Section(
            SCRIPT_TITLE,
            text=["1 < 2 & <b>not bold</b>"],
            tables=[
                Table(
                    "Indexed",
                    frame.set_index("model"),
                    provenance={"model": "cfg", "data": "phantom"},
                )
            ],
        ),
    ]


@pytest.fixture(scope="module")
def report(sections: list[Section], tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    """The report written once for the tests that read it."""
    out = tmp_path_factory.mktemp("report")
    inside = out / "figures" / "inside.png"
    inside.parent.mkdir()
    fpr = np.linspace(0, 1, 11)
    roc_plot({"inside": (fpr, fpr)}, inside, "already in figures/")
    extra = Section("Inside", figures=[Figure(inside, "Already placed", "", provenance("cfg"))])
    return write_report(
        out,
        "chexmem study",
        [*sections, extra],
        METRICS,
        summary=["AUC **0.91** for `CFG`", "no copies without duplicates"],
    )


def figure_count(sections: list[Section]) -> int:
    """How many figures the report holds (the fixture adds one)."""
    return sum(len(s.figures) for s in sections) + 1


def test_metrics_round_trip(report: ReportPaths) -> None:
    data = json.loads(report.metrics.read_text())
    assert data == {
        "auc": 0.912345,
        "counts": [0, 1, 2],
        "tpr": [0.5, None],
        "nested": {"missing": None, "flag": True, "n": 7},
        "model": "/models/cfg",
    }
    assert "NaN" not in report.metrics.read_text()
    assert not list(report.metrics.parent.glob(".*partial"))


def test_metrics_reject_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(ChexmemError, match=r"metrics\['bad'\] has type object"):
        write_report(tmp_path, "t", [], {"bad": object()})


def test_markdown(report: ReportPaths, sections: list[Section]) -> None:
    text = report.markdown.read_text()
    assert text.startswith("# chexmem study\n")
    assert "- AUC **0.91** for `CFG`" in text
    for section in sections:
        assert f"## {section.title}\n" in text
    assert "| model | AUC | prompts |" in text
    assert "| CFG | 0.9123 | 42 |" in text
    assert "| no CFG | — | 17 |" in text
    assert "| a\\|b | 0.5 | 3 |" in text
    assert "*AUC of duplicated prompts*" in text
    assert "model: cfg · data: phantom" in text  # table provenance
    links = [unquote(link) for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]
    assert len(links) == figure_count(sections)
    for link in links:
        assert link.startswith("figures/")
        assert (report.markdown.parent / link).is_file()
    assert "![Scatter](figures/scatter.png)\n\n*Figure 1. Scatter: magnitude vs NCC*" in text
    assert "model: cfg · data: phantom 64px <dup> · seeds: 0-3 · steps: 25 · features: n/a" in text


def test_figures_with_one_name_are_both_kept(report: ReportPaths, plots: dict[str, Path]) -> None:
    folder = report.markdown.parent / "figures"
    assert (folder / "plot.png").read_bytes() == plots["same_a"].read_bytes()
    assert (folder / "plot-2.png").read_bytes() == plots["same_b"].read_bytes()
    assert "figures/inside.png" in report.markdown.read_text()
    assert not (folder / "inside-2.png").exists()


def test_rewriting_reuses_copied_figures(sections: list[Section], tmp_path: Path) -> None:
    for _ in range(2):
        write_report(tmp_path, "again", sections, {})
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == [
        "neurons.png",
        "plot-2.png",
        "plot.png",
        "roc.png",
        "scatter.png",
        "tokens.png",
    ]


def test_html_is_self_contained(report: ReportPaths, sections: list[Section]) -> None:
    page = report.html.read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert page.count("<img") == len(sources) == figure_count(sections)
    inside = report.markdown.parent / "figures" / "inside.png"
    paths = [f.path for s in sections for f in s.figures] + [inside]
    for source, path in zip(sources, paths, strict=True):
        assert source.startswith("data:image/png;base64,")
        image = Image.open(
            io.BytesIO(base64.b64decode(source.removeprefix("data:image/png;base64,")))
        )
        assert image.format == "PNG"
        assert image.size == Image.open(path).size
    alts = re.findall(r'<img [^>]*alt="([^"]*)"', page)
    assert alts == [f.title for s in sections for f in s.figures] + ["Already placed"]
    for banned in ("http://", "https://", "file:", 'src="figures', "<script", "url("):
        assert banned not in page, banned
    assert "<style>" in page and "max-width: 1100px" in page


def test_html_captions_and_escaping(report: ReportPaths, sections: list[Section]) -> None:
    page = report.html.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)
    assert len(captions) == figure_count(sections)
    for caption in captions:
        for key in PROVENANCE_KEYS:
            assert f"{key}: " in caption
        assert "data: phantom 64px &lt;dup&gt; · seeds: 0-3" in caption
    assert "Figure 1. Scatter</strong> magnitude vs NCC" in captions[0]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert "1 &lt; 2 &amp; &lt;b&gt;not bold&lt;/b&gt;" in page
    assert "<code>inject_duplicates</code>" in page
    assert "<strong>15 copies</strong>" in page
    assert '<td class="num">0.9123</td>' in page and "<td>—</td>" not in page
    assert '<td class="num">—</td>' in page  # NaN in a float column stays right-aligned


def test_html_toc_links_sections(report: ReportPaths, sections: list[Section]) -> None:
    page = report.html.read_text()
    targets = re.findall(r'<nav class="toc">.*?</nav>', page, re.S)[0]
    hrefs = re.findall(r'href="#([^"]+)"', targets)
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert hrefs == ids and len(ids) == len(sections) + 1
    assert len(set(ids)) == len(ids)


def test_figure_needs_provenance(plots: dict[str, Path]) -> None:
    with pytest.raises(ChexmemError, match=r"figure 'ROC' lacks provenance seeds, features"):
        Figure(plots["roc"], "ROC", provenance={"model": "m", "data": "d", "steps": "1"})
    with pytest.raises(ChexmemError, match=r"lacks provenance model, data, seeds, steps, features"):
        Figure(plots["roc"], "ROC")
    Figure(plots["roc"], "ROC", provenance=dict.fromkeys(PROVENANCE_KEYS, "n/a"))


def test_figure_must_be_a_png_on_disk(tmp_path: Path) -> None:
    figure = Figure(tmp_path / "absent.png", "Absent", provenance=provenance("m"))
    with pytest.raises(ChexmemError, match="figure 'Absent': no file at"):
        write_report(tmp_path / "out", "t", [Section("s", figures=[figure])], {})
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    figure = Figure(tmp_path / "x.jpg", "Jpeg", provenance=provenance("m"))
    with pytest.raises(ChexmemError, match="is a JPEG, not a PNG"):
        write_report(tmp_path / "out", "t", [Section("s", figures=[figure])], {})
    assert not (tmp_path / "out" / "report.md").exists()


def test_bar_chart_grows_and_fits_long_labels(plots: dict[str, Path], tmp_path: Path) -> None:
    few = Image.open(bar_chart(["a", "b"], [1, 2], tmp_path / "few.png", "t", "x", "y"))
    many = Image.open(plots["bars"])
    assert many.format == "PNG"
    assert many.height > few.height + 150
    assert many.width > few.width + 250  # room on the left for the long layer names
    pixels = np.asarray(many.convert("RGB"))
    assert (pixels < 250).any(axis=2).mean() > 0.02  # bars and text, not a blank canvas
    with pytest.raises(ChexmemError, match="has no bars"):
        bar_chart([], [], tmp_path / "none.png", "empty", "x", "y")
    assert not list(tmp_path.glob(".*partial"))


def test_token_heatmap_marks_the_strongest_token(plots: dict[str, Path], tmp_path: Path) -> None:
    image = Image.open(plots["heat"]).convert("RGB")
    assert image.width >= 600 and 100 < image.height < 400
    row_height = TOKEN_HEIGHT + TOKEN_GAP + 12
    for k, (_, _, significance) in enumerate(PROMPTS):
        y = MARGIN + k * row_height + TOKEN_HEIGHT // 2 - 6  # inside the boxes, above the text
        line = [image.getpixel((x, y)) for x in range(image.width)]
        red = [x for x, pixel in enumerate(line) if strong_red(pixel)]
        outlines = [x for x, pixel in enumerate(line) if pixel == (204, 204, 204)]
        assert len(red) > 10, f"row {k} has no strongly red token"
        # the red box is the token with the largest significance, wherever it stands
        first_is_top = int(np.argmax(significance)) == 0
        assert (red[0] == outlines[0] + 1) == first_is_top
    wrapped = token_heatmap(
        [("long", ["radiograph"] * 60, list(range(60)))], tmp_path / "long.png", "wrapped"
    )
    assert Image.open(wrapped).size[0] == image.width  # wrapped, not widened
    assert Image.open(wrapped).height > MARGIN + 4 * (TOKEN_HEIGHT + TOKEN_GAP)
    with pytest.raises(ChexmemError, match="row 'bad' has 2 tokens but 1 values"):
        token_heatmap([("bad", ["a", "b"], [1.0])], tmp_path / "bad.png", "bad")


def test_report_in_headless_chromium(
    report: ReportPaths, sections: list[Section], tmp_path: Path
) -> None:
    shot = tmp_path / "page.png"
    state, requests = open_in_chromium(report.html, shot)
    assert state["images"] == [True] * figure_count(sections)
    assert state["links"] == [True] * (len(sections) + 1)
    assert 0 < state["widest"] <= state["main"] <= 1100
    assert [url for url in requests if not url.startswith("data:")] == [report.html.as_uri()]
    screenshot = Image.open(shot)
    assert screenshot.format == "PNG" and screenshot.width == 1280
    assert screenshot.height > 2000  # the whole page, not the viewport
    colours = screenshot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50
    assert not math.isclose(shot.stat().st_size, 0)
