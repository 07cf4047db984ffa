"""Results as plain-text tables, as the protocols and the benches print them."""

from __future__ import annotations


def cell(value: float | None, digits: int = 2, samples: int | None = None) -> str:
    """`value` with `digits` decimals and, in parentheses, the `samples` it rests on; "-" for no value."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + ("" if samples is None else f" ({samples})")


def text_table(header: list[str], rows: list[list[str]], names: int = 2) -> str:
    """Rows under a header and a rule: the first `names` columns (names) left-aligned, numbers
    right-aligned, as in the papers' tables."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < names else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])
