"""Shared benchmark plumbing: measured results are collected here and printed as ratio tables."""

from __future__ import annotations

import collections

import pytest

# table name -> list of row dicts, filled by the benchmark modules.
TABLES: dict[str, list[dict]] = collections.defaultdict(list)


@pytest.fixture
def report():
    """Append one row to a named table printed at the end of the run."""

    def add(table: str, **row):
        TABLES[table].append(row)

    return add


def _format(rows: list[dict]) -> list[str]:
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"
    return [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]


def pytest_terminal_summary(terminalreporter):
    for name, rows in TABLES.items():
        if rows:
            terminalreporter.write_sep("=", name)
            for text in _format(rows):
                terminalreporter.write_line(text)
