"""Shared benchmark plumbing: measured results are collected here and printed as ratio tables.

With ``--benchmark-json`` the tables also go into the results file (key ``tables``), next to the
machine's description (``machine_info``, see benchmarks/machine.py), so that benchmarks/report.py
can rebuild every table from the file alone.
"""

from __future__ import annotations

import collections

import pytest

from benchmarks.machine import metadata

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


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(metadata())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["tables"] = {name: rows for name, rows in TABLES.items() if rows}
