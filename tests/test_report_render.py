"""Report renderers: Markdown, self-contained HTML (checked in a real headless browser), LaTeX
tables and JSON rows, on documents whose expected output is known."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import (
    Figure as MplFigure,  # no pyplot: no backend, no global figures
)

from kdbench.report.document import Code, Figure, Heading, Paragraph, Table
from kdbench.report.render import (
    table_to_json,
    table_to_latex,
    to_html,
    to_latex,
    to_markdown,
)

EVIL = '<script>alert("x")</script> & co'


def results_table() -> Table:
    return Table(
        columns=["recipe", "test acc %", "size KiB"],
        rows=[["teacher", "93.10 ± 0.12", "1,024"],
              [EVIL, "91.60 ± 0.26", "−0.42"],
              ["kd|t4", "90.05", "-"]],
        caption="CIFAR-10 students",
        notes=["† two seeds only", "size of the saved file"],
        numbers=[[None, 0.931, 1024], [None, 0.916, -0.42], [None, 0.9005, None]],
    )


def write_png(path: Path) -> bytes:
    """A small real image, mostly pure red so a screenshot shows whether it was drawn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = MplFigure(figsize=(3, 2), dpi=60, facecolor="red")
    fig.add_subplot().plot([0, 1], [0, 1], color="black")
    fig.savefig(path, facecolor="red")
    return path.read_bytes()


# ---------------------------------------------------------------------------------- Markdown

def _cells(line: str) -> list[str]:
    """Cells of a pipe-table line, splitting on unescaped pipes only (as GFM does)."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_markdown_table_has_one_cell_per_column_and_escapes_pipes():
    md = to_markdown([results_table()])
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table_lines) == 2 + 3  # header, alignment, three rows
    assert all(len(_cells(ln)) == 3 for ln in table_lines)
    assert r"kd\|t4" in md
    # numbers right-aligned, labels left
    assert [c.strip() for c in _cells(table_lines[1])] == ["---", "---:", "---:"]
    lines = md.splitlines()
    assert lines[0] == "**CIFAR-10 students**"
    assert lines.index("† two seeds only") > lines.index(table_lines[-1])
    # the name shows as text, it cannot become an HTML element on a Markdown page
    assert "<script>" not in md and r"\<script\>" in md


def test_markdown_figure_links_are_relative():
    md = to_markdown([Figure(Path("figures") / "pareto size", "Pareto front [b1]")])
    assert "![Pareto front \\[b1\\]](figures/pareto%20size.png)" in md
    assert "[SVG](figures/pareto%20size.svg)" in md
    with pytest.raises(ValueError, match="relative"):
        to_markdown([Figure(Path("/tmp/report/fig"), "x")])


def test_markdown_code_fence_is_longer_than_any_backtick_run_inside():
    text = "before\n```python\nx = 1\n```\nand ```` four"
    md = to_markdown([Code(text, "yaml")])
    lines = md.rstrip("\n").splitlines()
    assert lines[0] == "`````yaml" and lines[-1] == "`````"
    assert "\n".join(lines[1:-1]) == text
    assert to_markdown([Code("plain")]).splitlines()[0] == "```"


def test_markdown_headings_and_paragraphs():
    md = to_markdown([Heading("Results", 1), Heading("kd_t4 _x_", 3), Paragraph("**Best**: `kd`.")])
    # An underscore inside a word cannot start emphasis on GitHub: only the others are escaped.
    assert md.split("\n\n") == ["# Results", r"### kd_t4 \_x\_", "**Best**: `kd`.\n"]


def test_heading_code_spans_render_as_code_in_markdown_and_html(tmp_path):
    blocks = [Heading("Report", 1), Heading("Experiment `quickstart`", 3), Heading("Setup of `kd<i>_t4` and a_b *x*"),
              Heading("it`s a *lone* backtick"), Heading("Notes")]
    md = to_markdown(blocks).split("\n\n")
    # A code span stays one (GitHub shows it in code font, without the backticks); the rest
    # is escaped text, so *x* is no emphasis and a lone backtick opens no span.
    assert md[1] == "### Experiment `quickstart`"
    assert md[2] == r"## Setup of `kd<i>_t4` and a_b \*x\*"
    assert md[3] == r"## it\`s a \*lone\* backtick"
    page = to_html(blocks, tmp_path, "t")
    assert '<h3 id="experiment-quickstart">Experiment <code>quickstart</code></h3>' in page
    assert ('<h2 id="setup-of-kd-i-_t4-and-a_b-x">Setup of <code>kd&lt;i&gt;_t4</code> and a_b *x*</h2>'
            in page)
    assert '<h2 id="it-s-a-lone-backtick">it`s a *lone* backtick</h2>' in page
    # The contents list shows the heading as the page does.
    assert '<a href="#setup-of-kd-i-_t4-and-a_b-x">Setup of <code>kd&lt;i&gt;_t4</code> and a_b *x*</a>' in page
    assert "`quickstart`" not in page


# ---------------------------------------------------------------------------------- LaTeX

def test_latex_table_uses_booktabs_and_aligns_numbers_right():
    tex = table_to_latex(results_table())
    assert r"\begin{tabular}{lrr}" in tex
    lines = tex.splitlines()
    order = [lines.index(x) for x in (r"\caption{CIFAR-10 students}", r"\toprule", r"\midrule",
                                      r"\bottomrule", r"\end{tabular}", r"\par\footnotesize")]
    assert order == sorted(order)
    assert r"teacher & 93.10 $\pm$ 0.12 & 1,024 \\" in lines
    assert r"\dag{} two seeds only" in tex
    assert r'\textless{}script\textgreater{}alert("x")\textless{}/script\textgreater{} \& co' in tex
    assert "|" not in tex.replace(r"\textbar{}", "")  # kd|t4 is text, not a rule


def test_latex_escapes_every_special():
    table = Table(["name"], [["50%_x & y"], [r"a\b {c} ~d^ $e #f"], ["2× ‡"]])
    rows = table_to_latex(table).splitlines()
    assert r"50\%\_x \& y \\" in rows
    assert (r"a\textbackslash{}b \{c\} \textasciitilde{}d\textasciicircum{} \$e \#f \\") in rows
    assert r"2$\times$ \ddag{} \\" in rows
    assert r"\begin{tabular}{l}" in rows


def test_to_latex_collects_only_the_tables():
    blocks = [Heading("h"), results_table(), Paragraph("p"), Table(["a"], [["1"]], caption="second")]
    tex = to_latex(blocks)
    assert tex.splitlines()[0].startswith("%") and "booktabs" in tex.splitlines()[0]
    assert tex.count(r"\begin{table}") == 2 and r"\caption{second}" in tex
    assert "\\begin{tabular}{r}" in tex  # a column of one number is numeric


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles(tmp_path):
    body = to_latex([results_table(), Table(["name"], [["50%_x & y"], [r"a\b {c} ~d^ $e #f ‡"]])])
    (tmp_path / "t.tex").write_text("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n"
                                    "\\usepackage{booktabs}\n\\begin{document}\n" + body
                                    + "\\end{document}\n", encoding="utf-8")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-3000:]


# ---------------------------------------------------------------------------------- JSON

def test_json_rows_hold_raw_numbers_else_text():
    table = results_table()
    table.numbers[2][1] = math.nan  # a NaN is no number to report: the cell text stands
    rows = table_to_json(table)
    assert rows == [
        {"recipe": "teacher", "test acc %": 0.931, "size KiB": 1024},
        {"recipe": EVIL, "test acc %": 0.916, "size KiB": -0.42},
        {"recipe": "kd|t4", "test acc %": "90.05", "size KiB": "-"},
    ]
    assert isinstance(rows[0]["size KiB"], int)
    json.loads(json.dumps(rows, allow_nan=False))
    no_numbers = Table(["a", "b"], [["x", "1.5"]])
    assert table_to_json(no_numbers) == [{"a": "x", "b": "1.5"}]
    with pytest.raises(ValueError, match="row 0"):
        table_to_json(Table(["a", "b"], [["only one"]]))
    with pytest.raises(ValueError, match="numbers"):
        table_to_json(Table(["a", "b"], [["x", "1"]], numbers=[[None]]))


# ---------------------------------------------------------------------------------- HTML, no browser

def test_html_paragraph_markup_is_applied_after_escaping(tmp_path):
    page = to_html([Paragraph("**<b>kd</b>** beats `a<b> **x**` & more")], tmp_path, "t")
    assert ("<p><strong>&lt;b&gt;kd&lt;/b&gt;</strong> beats <code>a&lt;b&gt; **x**</code> "
            "&amp; more</p>") in page


def test_html_missing_figure_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "figs" / "pareto.size.png"))):
        to_html([Figure(Path("figs/pareto.size"), "x")], tmp_path, "t")


def test_html_headings_get_unique_ids_and_a_contents_list(tmp_path):
    page = to_html([Heading("Report", 1), Heading("CIFAR-10 results"), Heading("CIFAR-10 results"),
                    Heading("Setup <b>")], tmp_path, "t")
    assert '<h2 id="cifar-10-results">' in page and '<h2 id="cifar-10-results-2">' in page
    assert '<h2 id="setup-b">Setup &lt;b&gt;</h2>' in page
    toc = page.index('<nav class="toc"')
    assert page.index("<h1") < toc < page.index("<h2")
    assert '<a href="#cifar-10-results-2">' in page


# ---------------------------------------------------------------------------------- HTML in a browser

CHROMIUM = Path("/usr/bin/chromium")


def chromium(page: Path, *options: str) -> str:
    """Run Debian's headless chromium on a local page, offline and with a throwaway profile;
    return what it prints (the DOM with --dump-dom)."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", *options, page.as_uri()]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


class DomReader(HTMLParser):
    """What a reader sees: table cells row by row, images, scripts, links, the title."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.images: list[dict] = []
        self.scripts = 0
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.title = self.figcaption = ""
        self._in = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1
        elif tag in ("title", "figcaption"):
            self._in = tag
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v is not None]
        if "id" in attrs:
            self.ids.append(attrs["id"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None
        elif tag == self._in:
            self._in = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        elif self._in:
            setattr(self, self._in, getattr(self, self._in) + data)


def test_html_page_in_a_real_browser(tmp_path):
    png = write_png(tmp_path / "figures" / "pareto.png")
    blocks = [Heading("Benchmark <report>", 1), Heading("Results"),
              Paragraph("The **best** student is `kd`."), results_table(),
              Figure(Path("figures/pareto"), 'Accuracy vs size "b1"'), Heading("Setup"),
              Code("kdbench run cifar.yaml\n<no tag here>", "bash")]
    page = tmp_path / "index.html"
    page.write_text(to_html(blocks, tmp_path, "Report <1>"), encoding="utf-8")
    source = page.read_text(encoding="utf-8")
    # self-contained and inert: nothing to fetch, nothing to run
    assert "http://" not in source and "https://" not in source
    assert "<script" not in source.lower()

    dom = DomReader()
    dom.feed(chromium(page, "--dump-dom"))
    assert dom.title == "Report <1>"
    assert dom.scripts == 0
    assert dom.rows == [["recipe", "test acc %", "size KiB"], *results_table().rows]
    assert len(dom.images) == 1
    image = dom.images[0]
    assert image["alt"] == 'Accuracy vs size "b1"' and dom.figcaption == 'Accuracy vs size "b1"'
    prefix = "data:image/png;base64,"
    assert image["src"].startswith(prefix) and base64.b64decode(image["src"][len(prefix):]) == png
    assert all(u.startswith(("data:", "#")) for u in dom.urls)
    assert {"benchmark-report", "results", "setup"} <= set(dom.ids)

    shot = tmp_path / "shot.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1200,900")
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
    assert red.sum() > 1000  # the embedded figure was decoded and drawn
