"""A report as a list of blocks, rendered twice: Markdown (README.md, shown on a repository
page) and self-contained HTML (index.html, opened offline in a browser).

Keeping one document model means the two outputs can never disagree about a number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class Heading:
    """A section title; `` `code` `` spans are its only markup (a name set in code, as in
    ``Experiment `quickstart` ``), every other character is shown as typed."""

    text: str
    level: int = 2


@dataclasses.dataclass
class Paragraph:
    """Plain text; ``**bold**`` and `` `code` `` spans are the only markup renderers honour."""

    text: str


@dataclasses.dataclass
class Table:
    """A table already formatted for reading: every cell is text.

    ``numbers`` holds the raw values behind the cells (same shape, None where a cell is a
    label), for machine-readable outputs; ``notes`` are footnotes printed under the table.
    """

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    numbers: list[list[float | None]] | None = None


@dataclasses.dataclass
class Figure:
    """A figure saved as ``<stem>.png`` and ``<stem>.svg``; ``stem`` is relative to the report folder."""

    stem: Path
    caption: str


@dataclasses.dataclass
class Code:
    """A verbatim block: an experiment file, a command, the environment."""

    text: str
    language: str = ""


Block = Heading | Paragraph | Table | Figure | Code
