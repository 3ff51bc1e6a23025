"""``declip-fast write-dataset`` on hostile input and a hostile environment.

One bad row must cost that row, never the job or its neighbours: a caption too long for ``csv``'s
field limit, an unterminated quote, a row with a stray delimiter. Skips name the table line a
record starts on (1-based, the header is line 1), which is where an editor shows it. A writer
killed outright must not leave its workers running, and the temporary file it leaves is removed
by the next write of the same output. An output that cannot be written is one line naming the
path, exit status 1, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from declip_fast.data.sources import MAX_CAPTION_CHARS, list_pairs

REPO = Path(__file__).resolve().parents[2]


def reasons(skips) -> dict[str, str]:
    """``path:line`` -> reason, for a table's skips."""
    return {Path(s.source.split(" ")[0]).name: s.reason for s in skips}


# -- listing a table (no images read, no FFCV) --------------------------------------------------


def test_unterminated_quote_costs_one_row_not_the_rows_after(tmp_path):
    """An opening quote without its closing one used to swallow the next rows into one caption."""
    (tmp_path / "t.csv").write_text(
        "image,caption\n"  # 1
        '0.png,"a quoted caption"\n'  # 2
        '1.png,"never closed\n'  # 3: swallows up to the next quote
        "2.png,second row\n"  # 4
        '3.png,"third, quoted"\n'  # 5
        '4.png,"opened again\n'  # 6: closed by a quote ending line 7 ...
        '5.png,five inches 5"\n'  # 7: ... which reads as a row of its own
        '6.png,"open until the end\n'  # 8: the end of the file comes first
    )
    pairs, skips = list_pairs(tmp_path / "t.csv")
    assert [(Path(p.source.split(" ")[0]).name, p.caption) for p in pairs] == [
        ("t.csv:2", "a quoted caption"),
        ("t.csv:4", "second row"),
        ("t.csv:5", "third, quoted"),
        ("t.csv:7", 'five inches 5"'),
    ]
    assert reasons(skips) == {
        "t.csv:3": "malformed row (unterminated quote)",
        "t.csv:6": "malformed row (unterminated quote)",
        "t.csv:8": "malformed row (unterminated quote)",
    }


def test_wrong_field_counts_and_stray_quotes_are_skipped(tmp_path):
    """An unquoted delimiter used to cut a caption short without a word; now the row is a skip."""
    (tmp_path / "t.tsv").write_text(
        "0.png\tfine\n"  # 1: no header: two columns
        "1.png\tcut\there\n"  # 2: three non-empty fields
        "2.png\ttrailing tab is harmless\t\n"  # 3
        "3.png\n"  # 4: one field
        "\tno image\n"  # 5
        '5.png\t"a "stray" quote"\n'  # 6
        "\n"  # 7: blank lines are not rows
        "7.png\tlast\n"
    )  # 8
    pairs, skips = list_pairs(tmp_path / "t.tsv")
    assert [p.caption for p in pairs] == ["fine", "trailing tab is harmless", "last"]
    assert reasons(skips) == {
        "t.tsv:2": "malformed row (wrong number of fields)",
        "t.tsv:4": "malformed row (wrong number of fields)",
        "t.tsv:5": "malformed row (no image path)",
        "t.tsv:6": "malformed row (stray quote)",
    }


def test_header_sets_the_field_count(tmp_path):
    """Extra columns are fine when the header names them; more fields than the header are not."""
    (tmp_path / "t.csv").write_text("url,caption,image\nhttp://x,a caption,0.png\nhttp://y,a, b,1.png\n")
    pairs, skips = list_pairs(tmp_path / "t.csv")
    assert [(p.caption, Path(p.image.path).name) for p in pairs] == [("a caption", "0.png")]
    assert reasons(skips) == {"t.csv:3": "malformed row (wrong number of fields)"}


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_numbers_count_quoted_newlines(tmp_path, newline):
    """A record with a quoted newline spans two lines; the next records keep their real numbers."""
    lines = ["image,caption", '0.png,"two', 'lines"', "1.png", "2.png,after"]
    (tmp_path / "t.csv").write_bytes(newline.join(lines).encode() + newline.encode())
    pairs, skips = list_pairs(tmp_path / "t.csv")
    assert [p.source.split(" ")[0].rsplit(":", 1)[1] for p in pairs] == ["2", "5"]
    assert pairs[0].caption == f"two{newline}lines"
    assert reasons(skips) == {"t.csv:4": "malformed row (wrong number of fields)"}


def test_caption_over_the_csv_field_limit_is_one_skip(tmp_path):
    """``csv`` refuses fields over 131,072 characters with an error that ended the whole job."""
    import csv

    limit = csv.field_size_limit()
    huge, longest = "word " * 40_000, "x" * MAX_CAPTION_CHARS
    (tmp_path / "t.csv").write_text(f'0.png,"{huge}"\n1.png,"{longest}"\n2.png,short\n')
    pairs, skips = list_pairs(tmp_path / "t.csv")
    assert [p.source.split(" ")[0].rsplit(":", 1)[1] for p in pairs] == ["2", "3"]
    assert [(s.source.split(" ")[0], s.reason) for s in skips] == [(f"{tmp_path / 't.csv'}:1", "caption too long")]
    assert csv.field_size_limit() == limit  # raised for the read only


# -- the CLI ------------------------------------------------------------------------------------


def save_images(folder: Path, n: int) -> None:
    from PIL import Image

    for i in range(n):
        y, x = np.mgrid[0:24, 0:20]
        rgb = np.stack([(15 * i) % 100 + 2 * x, 40 + 2 * y, np.full_like(x, (200 - 29 * i) % 256)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{i}.png")


def run_cli(*args: str) -> int:
    from declip_fast.cli import main

    return main(["write-dataset", *args, "--quiet", "--workers", "1", "--max-side", "32"])


def written_captions(path: Path, captions: list[str]) -> None:
    from declip_fast.data.tokenizer import tokenize
    from tests.data.test_write import read_beton

    samples = read_beton(path)
    np.testing.assert_array_equal(np.stack([s["tokens"] for s in samples]), tokenize(captions).numpy())


def test_cli_counts_bad_rows_and_keeps_their_neighbours(tmp_path, capsys):
    """The issue's table through the CLI: every row that is fine is written, the rest counted."""
    pytest.importorskip("ffcv")
    save_images(tmp_path, 6)
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n"  # 1
        f'0.png,"{"long caption " * 12_000}"\n'  # 2: 156,000 characters
        '1.png,"unterminated\n'  # 3
        "2.png,a red square\n"  # 4
        '3.png,"a caption over\ntwo lines"\n'  # 5-6
        "missing.png,no such image\n"  # 7: a worker's skip, named by its line
        "4.png,a blue, square\n"  # 8
        '5.png,"a green square"\n'
    )  # 9
    out, report = tmp_path / "out.beton", tmp_path / "summary.json"
    assert run_cli(str(tmp_path / "pairs.csv"), str(out), "--summary-json", str(report)) == 0
    summary = json.loads(report.read_text())
    assert (summary["written"], summary["skipped"]) == (3, 4)
    assert {Path(s["source"].split(" ")[0]).name: s["reason"] for s in summary["skips"]} == {
        "pairs.csv:2": "caption too long",
        "pairs.csv:3": "malformed row (unterminated quote)",
        "pairs.csv:7": "missing image",
        "pairs.csv:8": "malformed row (wrong number of fields)",
    }
    written_captions(out, ["a red square", "a caption over\ntwo lines", "a green square"])
    printed = capsys.readouterr().out
    assert "caption too long: 1" in printed and "malformed row (unterminated quote): 1" in printed


def test_long_caption_file_is_skipped(tmp_path):
    """A caption file (folder or tar source) over the limit is a skip too, and is not read whole."""
    pytest.importorskip("ffcv")
    from declip_fast.data.write import WriteConfig, write_dataset

    source = tmp_path / "src"
    source.mkdir()
    save_images(source, 2)
    (source / "0.txt").write_text("a" * (MAX_CAPTION_CHARS + 1))
    (source / "1.txt").write_text("a short caption")
    summary = write_dataset(
        source, tmp_path / "out.beton", WriteConfig(workers=1, progress=False, max_side=32, page_size=1 << 21)
    )
    assert summary.written == 1 and [(Path(s.source).name, s.reason) for s in summary.skips] == [
        ("0", "caption too long")
    ]


def cli_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command line, run on this checkout's code."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "declip_fast.cli", "write-dataset", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_output_errors_are_one_line_naming_the_path(tmp_path):
    """Checked before FFCV's import and the listing: each fails in well under a second."""
    (tmp_path / "pairs.csv").write_text("0.png,a caption\n")
    (tmp_path / "a_file").write_text("")
    cases = {
        tmp_path / ("n" * 300 + ".beton"): "file name too long",
        tmp_path / "a_file" / "out.beton": "is not a folder",
        tmp_path / "a_file" / "sub" / "out.beton": "is not a folder",
    }
    for out, reason in cases.items():
        result = cli_subprocess(str(tmp_path / "pairs.csv"), str(out), timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert str(out) in result.stderr and reason in result.stderr


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: read-only permissions, or /sys where those do not bind."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").touch()
        except OSError:
            return candidate
        (candidate / "probe").unlink()
    pytest.skip("no folder here refuses new files (root, no sysfs)")


def test_unwritable_and_missing_output_folders(tmp_path, capsys):
    """A read-only folder, or one that cannot be created, is one line; a missing one is created."""
    pytest.importorskip("ffcv")
    save_images(tmp_path, 1)
    (tmp_path / "pairs.csv").write_text("0.png,a caption\n")
    locked = unwritable_folder(tmp_path)
    try:
        for out, where in ((locked / "out.beton", locked), (locked / "new" / "out.beton", locked / "new")):
            assert run_cli(str(tmp_path / "pairs.csv"), str(out)) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and str(where) in err
            assert not out.exists() and not any(p.name.endswith(".partial") for p in locked.iterdir())
    finally:
        if locked != Path("/sys"):
            locked.chmod(0o755)
    # a missing folder is made; a name just short of the limit still leaves room for the temporary
    for out in (tmp_path / "new" / "deeper" / "out.beton", tmp_path / ("n" * 240 + ".beton")):
        assert run_cli(str(tmp_path / "pairs.csv"), str(out)) == 0
        assert out.is_file()


def test_full_disk_mid_write_is_one_line(tmp_path, capsys, monkeypatch):
    """An OS error while pages are written (ENOSPC here) names the output; nothing is left behind."""
    pytest.importorskip("ffcv")
    import errno

    from declip_fast.data import write

    save_images(tmp_path, 1)
    (tmp_path / "pairs.csv").write_text("0.png,a caption\n")

    def full(self, prepared):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(write._BetonFile, "append", full)
    out = tmp_path / "out" / "data.beton"
    assert run_cli(str(tmp_path / "pairs.csv"), str(out)) == 2
    assert capsys.readouterr().err == f"error: cannot write {out}: No space left on device\n"
    assert list(out.parent.iterdir()) == []


def test_leftover_partial_files(tmp_path, caplog):
    """A dead writer's temporary file is removed (and named); a live writer's is left alone."""
    pytest.importorskip("ffcv")
    fcntl = pytest.importorskip("fcntl")
    save_images(tmp_path, 1)
    (tmp_path / "pairs.csv").write_text("0.png,a caption\n")
    dead = tmp_path / ".out.beton.99999999.0123abcd.partial"  # no such process id
    live = tmp_path / f".out.beton.{os.getpid()}.89abcdef.partial"
    other = tmp_path / ".other.beton.99999999.0123abcd.partial"
    for path in (dead, live, other):
        path.write_bytes(b"half a file")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as its writer holds it
        with caplog.at_level(logging.WARNING, logger="declip_fast"):
            assert run_cli(str(tmp_path / "pairs.csv"), str(tmp_path / "out.beton")) == 0
    assert not dead.exists() and live.exists() and other.exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(dead) in m and "removed" in m for m in messages)
    assert any(str(live) in m and "in progress" in m for m in messages)
    assert all("\n" not in m for m in messages)


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (zombies excluded: they are dead, only not yet reaped)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_writer_takes_its_workers_along(tmp_path, caplog):
    """SIGKILL runs no cleanup: the workers used to live on (waiting forever) and the temporary
    file stayed. The job is held mid-write by a FIFO posing as an image, which a worker's open()
    waits on; ~15 s, most of it the writer's FFCV import."""
    pytest.importorskip("ffcv")
    save_images(tmp_path, 1)
    os.mkfifo(tmp_path / "stuck.png")
    rows = ["stuck.png,a worker waits here"] + [f"0.png,caption {i}" for i in range(200)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out" / "data.beton"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "declip_fast.cli",
            "write-dataset",
            str(tmp_path / "pairs.csv"),
            str(out),
            "--quiet",
            "--workers",
            "2",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and writer.poll() is None:
            partials = list(out.parent.glob(".data.beton.*.partial")) if out.parent.exists() else []
            workers = descendants(writer.pid)
            if partials and len(workers) >= 2:
                break
            time.sleep(0.1)
        assert writer.poll() is None, writer.stderr.read()
        assert partials and len(workers) >= 2, "the writer never got going"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)], "workers outlived their writer"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        for pid in workers:  # on failure: the processes this test started, by id
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        writer.stderr.close()
    assert [p.name for p in out.parent.iterdir()] == [partials[0].name]  # no file that looks finished
    # the next write of the same output removes the dead writer's file and says so
    (tmp_path / "good.csv").write_text("0.png,a caption\n")
    with caplog.at_level(logging.WARNING, logger="declip_fast"):
        assert run_cli(str(tmp_path / "good.csv"), str(out)) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["data.beton"]
    assert any(str(partials[0]) in r.getMessage() and "removed" in r.getMessage() for r in caplog.records)
