"""Tables for the ``peftkern`` command and the benchmarks (rich), rendered to text so they can be logged too."""
from __future__ import annotations

import contextlib
import io
from typing import Optional

from rich import box
from rich.console import Console
from rich.table import Table


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], title: Optional[str] = None,
          min_widths: Optional[dict] = None) -> Table:
    """``columns`` = [(key, header)]; numbers right-aligned, floats to 3 decimals; ``min_widths`` {key: width}
    keeps tables printed row by row aligned."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    min_widths = min_widths or {}
    for key, header in columns:
        numeric = any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in rows)
        t.add_column(header, justify="right" if numeric else "left", min_width=min_widths.get(key), no_wrap=True)
    for r in rows:
        t.add_row(*(cell(r.get(k)) for k, _ in columns))
    return t


def render(renderable) -> str:
    """Plain text of a rich renderable (no colour codes: it goes to logs and files as well as the terminal)."""
    out = io.StringIO()  # wide enough that no column is squeezed: a long row wraps in the terminal instead
    Console(file=out, width=1000, no_color=True, highlight=False, force_terminal=False).print(renderable)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()).strip("\n")


def format_table(rows: list[dict], columns: list[tuple[str, str]], title: Optional[str] = None,
                 min_widths: Optional[dict] = None) -> str:
    return render(table(rows, columns, title, min_widths))


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool = True):
    """A progress bar on stderr (drawn only on a terminal; ``print`` output goes above it). Yields
    ``step(description=None)``, which advances it by one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=console, transient=True,
                   disable=not (enabled and console.is_terminal))
    with bar:
        task = bar.add_task("", total=total)
        yield lambda description=None: bar.update(task, advance=1, description=description or "")
