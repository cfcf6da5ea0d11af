"""Render a report (a list of blocks from :mod:`kdbench.report.document`) to GitHub Markdown,
one self-contained HTML file, LaTeX tables (booktabs) and JSON rows.

Every text may come from a plugin or a config (a recipe named ``<script>``, a label with
``50%_x``), so each output format escapes it; numbers are never re-formatted here, the cells
arrive as text and every format shows the same text.
"""

from __future__ import annotations

import base64
import html
import math
import numbers as _numbers
import re
from pathlib import Path, PurePath
from urllib.parse import quote

from .document import Block, Code, Figure, Heading, Paragraph, Table

# --------------------------------------------------------------------------------------------
# Shared helpers

#: Cells that stand for "no value" and so do not decide whether a column is numeric.
_PLACEHOLDERS = {"", "-", "–", "—", "n/a", "na", "nan", "none"}
_NUM = r"[+\-−]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][+\-−]?\d+)?"
#: A formatted figure: "91.60", "−0.42", "1,234", "91.60 ± 0.26", "2.1×", "×2.1", "12.5%",
#: "0.31*", "73.4†" (footnote markers and units around one number, optionally ± a second).
_NUMERIC = re.compile(rf"[~≈×x]?\s*{_NUM}\s*(?:±\s*{_NUM})?\s*[%×x]?\s*[*†‡§¶]*", re.IGNORECASE)


def looks_numeric(cell: str) -> bool:
    return bool(_NUMERIC.fullmatch(cell.strip()))


def numeric_columns(table: Table) -> list[bool]:
    """Per column: every non-placeholder cell looks like a number (and at least one does);
    those columns are right-aligned so digits line up."""
    _check_shape(table)
    out = []
    for j in range(len(table.columns)):
        cells = [row[j].strip() for row in table.rows if row[j].strip().lower() not in _PLACEHOLDERS]
        out.append(bool(cells) and all(looks_numeric(c) for c in cells))
    return out


def _check_shape(table: Table) -> None:
    # A short row would shift every following cell under the wrong header without any error.
    for i, row in enumerate(table.rows):
        if len(row) != len(table.columns):
            raise ValueError(f"table {table.caption!r}: row {i} has {len(row)} cells, "
                             f"expected {len(table.columns)} ({table.columns})")
    if table.numbers is not None and (len(table.numbers) != len(table.rows)
                                      or any(len(n) != len(table.columns) for n in table.numbers)):
        raise ValueError(f"table {table.caption!r}: numbers do not have the shape of rows")


def _stem(figure: Figure) -> str:
    stem = PurePath(figure.stem)
    if stem.is_absolute():
        raise ValueError(f"figure stem {stem} must be relative to the report folder")
    return stem.as_posix()


# --------------------------------------------------------------------------------------------
# Markdown

#: Characters that would turn a label into markup (emphasis, code, links, raw HTML, a cell
#: break); backslash-escaped, which CommonMark shows as the plain character.
# Characters that would start markup. ``_`` only where it could open emphasis (not inside a
# word, as in ``split_seed``) and ``[`` only where a link could follow, so that labels such as
# ``mlp(hidden=[64])`` stay readable in the plain text of a README.
_MD_SPECIAL = re.compile(r"([\\`*<>|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\[(?=[^\]]*\][(\[])|\](?=[(\[]))")


def _md_text(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _md_heading(heading: Heading) -> str:
    """``#`` and the text escaped, except its `code` spans, which stay code spans."""
    pieces = []
    for i, piece in enumerate(_INLINE_CODE.split(" ".join(str(heading.text).split()))):
        if i % 2 == 0:
            pieces.append(_MD_SPECIAL.sub(r"\\\1", piece))  # spaces kept: they part text from code
        else:
            # A span that starts or ends with a space loses one on each side in CommonMark.
            pieces.append(f"` {piece} `" if piece.startswith(" ") or piece.endswith(" ") else f"`{piece}`")
    return "#" * min(max(heading.level, 1), 6) + " " + "".join(pieces)


def _md_table(table: Table) -> str:
    numeric = numeric_columns(table)
    lines = []
    if table.caption:
        lines += [f"**{_md_text(table.caption)}**", ""]
    lines.append("| " + " | ".join(_md_text(c) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in table.rows]
    for note in table.notes:  # one paragraph each, so they do not run together
        lines += ["", _md_text(note)]
    return "\n".join(lines)


def _md_figure(figure: Figure) -> str:
    url = quote(_stem(figure), safe="/")  # spaces and parentheses would end the link early
    caption = _md_text(figure.caption)
    alt = re.sub(r"(?<!\\)([\[\]])", r"\\\1", caption)  # inside ![...] every bracket counts
    link = f"[SVG]({url}.svg)"
    return f"![{alt}]({url}.png)\n" + (f"*{caption}* ({link})" if caption else link)


def _md_code(code: Code) -> str:
    longest = max((len(run) for run in re.findall(r"`+", code.text)), default=0)
    fence = "`" * max(3, longest + 1)
    language = re.sub(r"[^\w+.#-]", "", code.language)
    return f"{fence}{language}\n{code.text.rstrip(chr(10))}\n{fence}"


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown; figure links are relative to the report folder."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(_md_heading(block))
        elif isinstance(block, Paragraph):
            parts.append(block.text)  # authored text with its own ** and ` markup
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, Figure):
            parts.append(_md_figure(block))
        elif isinstance(block, Code):
            parts.append(_md_code(block))
        else:
            raise TypeError(f"not a report block: {block!r}")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { color-scheme: light; --line: #d0d7de; --zebra: #f6f8fa; --head: #eef1f4; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0; background: #fff; }
main { max-width: 1600px; margin: 0 auto; padding: 1.5rem 1rem 4rem; }
h1, h2, h3 { line-height: 1.25; } h2 { border-bottom: 1px solid var(--line); padding-bottom: .3rem; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
p code { background: var(--zebra); padding: .1em .3em; border-radius: 4px; }
pre { background: var(--zebra); padding: .8rem; overflow-x: auto; border-radius: 6px; }
nav.toc { background: var(--zebra); border: 1px solid var(--line); border-radius: 6px;
          padding: .5rem 1rem; display: inline-block; }
nav.toc p { margin: .2rem 0; font-weight: 600; } nav.toc ol { margin: .2rem 0; padding-left: 1.4rem; }
/* The wrapper scrolls both ways: sideways on narrow screens, and down within a long table so
   that the sticky header stays in view (sticky sticks to the nearest scrolling box). */
.table-wrap { overflow: auto; max-height: 85vh; margin: 1rem 0 .3rem; border: 1px solid var(--line); }
table { border-collapse: separate; border-spacing: 0; font-size: 14px; min-width: 100%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .4rem .6rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; text-align: left; }
thead th { position: sticky; top: 0; background: var(--head); z-index: 1; }
tbody tr:nth-child(even) td { background: var(--zebra); }
tbody tr:hover td { background: #fff8c5; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
p.notes { font-size: 13px; color: #57606a; margin-top: .2rem; }
figure { margin: 1.5rem 0; } figure img { max-width: min(100%, 1100px); height: auto; }
figcaption { font-size: 14px; color: #57606a; }
"""

_INLINE_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str, bold: bool = True) -> str:
    """Escape, then honour `code` and (unless ``bold`` is False, as in headings) **bold**
    (escaping first means markup cannot smuggle tags in; code spans are cut out first so
    ``**`` inside them stays literal)."""
    out = []
    for i, piece in enumerate(_INLINE_CODE.split(text)):
        piece = html.escape(piece)
        if i % 2:
            out.append(f"<code>{piece}</code>")
        else:
            out.append(_BOLD.sub(r"<strong>\1</strong>", piece) if bold else piece)
    return "".join(out)


def _plain(text: str) -> str:
    """A heading's text without its code-span backticks: what its anchor is made of."""
    return _INLINE_CODE.sub(r"\1", text)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^\w]+", "-", text.lower()).strip("-_") or "section"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def _html_table(table: Table) -> str:
    numeric = numeric_columns(table)
    e = html.escape

    def cls(j: int) -> str:
        return ' class="num"' if numeric[j] else ""

    head = "".join(f'<th scope="col"{cls(j)}>{e(c)}</th>' for j, c in enumerate(table.columns))
    body = "\n".join("<tr>" + "".join(f"<td{cls(j)}>{e(c)}</td>" for j, c in enumerate(row)) + "</tr>"
                     for row in table.rows)
    caption = f"<caption>{e(table.caption)}</caption>" if table.caption else ""
    notes = ('\n<p class="notes">' + "<br>".join(e(n) for n in table.notes) + "</p>") if table.notes else ""
    return (f'<div class="table-wrap"><table>{caption}\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody></table></div>{notes}")


def _html_figure(figure: Figure, base: Path) -> str:
    path = Path(base) / (_stem(figure) + ".png")  # not with_suffix: stems may hold dots
    if not path.is_file():
        raise FileNotFoundError(f"figure image not found: {path}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _html_code(code: Code) -> str:
    language = re.sub(r"[^\w+.#-]", "", code.language)
    attr = f' class="language-{language}"' if language else ""
    return f"<pre><code{attr}>{html.escape(code.text)}</code></pre>"


def _toc(entries: list[tuple[str, str]]) -> str:
    """``entries``: (anchor, heading text already rendered as HTML)."""
    items = "".join(f'<li><a href="#{slug}">{text}</a></li>' for slug, text in entries)
    return f'<nav class="toc" aria-label="Contents"><p>Contents</p><ol>{items}</ol></nav>'


def to_html(blocks: list[Block], base: Path, title: str) -> str:
    """One self-contained HTML5 page: inline CSS, figures embedded as PNG data URLs read from
    ``base``, no script and no external URL, so it opens offline and can be mailed as is."""
    taken: set[str] = set()
    parts, toc = [], []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            slug = _slug(_plain(block.text), taken)
            text = _inline(block.text, bold=False)
            if level == 2:
                toc.append((slug, text))
            parts.append(f'<h{level} id="{slug}">{text}</h{level}>')
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Figure):
            parts.append(_html_figure(block, base))
        elif isinstance(block, Code):
            parts.append(_html_code(block))
        else:
            raise TypeError(f"not a report block: {block!r}")
    if len(toc) > 1:  # after the page's title heading when it opens with one
        at = 1 if blocks and isinstance(blocks[0], Heading) and blocks[0].level == 1 else 0
        parts.insert(at, _toc(toc))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------
# LaTeX

#: One pass over the characters, so the backslash of an escape is never escaped again.
#: ``<``, ``>`` and ``|`` print as other glyphs in LaTeX's default font encoding; the
#: Unicode symbols are ones pdflatex's utf8 input does not know.
_LATEX = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
    "±": r"$\pm$", "×": r"$\times$", "−": "$-$", "≤": r"$\leq$", "≥": r"$\geq$", "≈": r"$\approx$",
    "†": r"\dag{}", "‡": r"\ddag{}",
})


def latex_escape(text: str) -> str:
    return str(text).translate(_LATEX)


def table_to_latex(table: Table) -> str:
    """A booktabs ``table`` float; numeric columns right-aligned, notes in small print."""
    numeric = numeric_columns(table)
    e = latex_escape

    def line(cells: list[str]) -> str:
        return " & ".join(e(c) for c in cells) + r" \\"

    out = [r"\begin{table}[htbp]", r"\centering"]
    if table.caption:
        out.append(rf"\caption{{{e(table.caption)}}}")
    out += [r"\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}",
            r"\toprule", line(table.columns), r"\midrule"]
    out += [line(row) for row in table.rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        out += [r"\par\footnotesize", (r"\par" + "\n").join(e(n) for n in table.notes)]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def to_latex(blocks: list[Block]) -> str:
    """Every table of the report, ready to ``\\input`` into a paper."""
    tables = [table_to_latex(b) for b in blocks if isinstance(b, Table)]
    return "\n".join(["% Generated by kdbench. Needs \\usepackage{booktabs} in the preamble.\n", *tables])


# --------------------------------------------------------------------------------------------
# JSON


def _raw(value) -> float | int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, _numbers.Integral):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else value  # NaN is not JSON; the cell text says "–"


def table_to_json(table: Table) -> list[dict]:
    """One dict per row, column -> the raw number behind the cell where there is one (so a
    reader gets 0.9160, not "91.60 ± 0.26"), else the cell's text."""
    _check_shape(table)
    if len(set(table.columns)) != len(table.columns):
        raise ValueError(f"table {table.caption!r}: duplicate column names {table.columns}")
    out = []
    for i, row in enumerate(table.rows):
        raw = table.numbers[i] if table.numbers is not None else [None] * len(row)
        out.append({col: (cell if (r := _raw(v)) is None else r)
                    for col, cell, v in zip(table.columns, row, raw)})
    return out
