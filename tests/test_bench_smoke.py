"""Tests of the benchmark harness: reporting, goal checks and the module runner.

These test the code that publishes the figures (JSON, docs/BENCHMARKS.md, the chart)
and the driver's guarantees (a failing, hanging or malformed module becomes an error
row; every process it started is stopped) -- never the speed of anything.

The report and goal tests run in-process (``make test-fast`` includes them); the
runner and command-line tests start processes and are marked ``subprocess``.
"""

from __future__ import annotations

import json
import math
import os
import select
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from bench import _harness as h
from bench.__main__ import MODULES, _run_module

from tests.support.timing import LONG, MS

#: Bound on one ``python -m bench`` command that does no measuring.
CLI_TIMEOUT = 6 * LONG

ROOT = Path(__file__).resolve().parent.parent
X = "\u00d7"  # the multiplication sign people write in goals


def _row(name: str, value: float, baseline: float | None, ratio: float | None, goal: str) -> h.Row:
    return {
        "module": "synthetic",
        "name": name,
        "unit": "MB/s",
        "value": value,
        "min": value * 0.9,
        "max": value * 1.1,
        "baseline": "bare" if baseline is not None else None,
        "baseline_value": baseline,
        "ratio": ratio,
        "goal": goal,
    }


def _synthetic_result() -> dict[str, Any]:
    rows = [
        _row("upload", 380.0, 400.0, 0.95, f"≥ 350 MB/s and ≥ 0.95 {X} bare"),
        _row("download | fast", 200.0, 400.0, 0.5, "ratio >= 0.95"),
        _row("opens", 1234.5, None, None, "informational"),
        h.error_row("broken", "bench.broken: RuntimeError: boom"),
    ]
    for row in rows:
        row["met"] = h.goal_met(row)
    return {
        "schema": h.RESULT_SCHEMA,
        "generated_utc": "2026-01-01 00:00 UTC",
        "command": "python -m bench",
        "reproduce": "make bench",
        "quick": False,
        "duration_s": 1.0,
        "machine": h.machine_info(include_openssh=False),
        "modules": [
            {"module": "synthetic", "status": "ok", "seconds": 0.5, "rows": 3},
            {"module": "broken", "status": "error", "seconds": 0.1, "rows": 0},
        ],
        "rows": rows,
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def test_report_writes_json_markdown_and_chart(tmp_path: Path) -> None:
    result = _synthetic_result()
    json_path = tmp_path / "results" / "latest.json"
    md_path = tmp_path / "docs" / "BENCHMARKS.md"
    png_path = tmp_path / "docs" / "benchmarks.png"

    h.write_report(result, json_path=json_path, md_path=md_path, png_path=png_path)

    # JSON: strict (no NaN), every row kept, the error row's missing figures are null.
    doc = json.loads(json_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    assert doc["schema"] == h.RESULT_SCHEMA
    assert [r["name"] for r in doc["rows"]] == [r["name"] for r in result["rows"]]
    assert doc["rows"][0]["met"] is True
    assert doc["rows"][1]["met"] is False
    assert doc["rows"][2]["met"] is None
    assert doc["rows"][3]["value"] is None and doc["rows"][3]["error"]
    assert doc["machine"]["cpu_count"] == os.cpu_count()
    assert doc["machine"]["python"].endswith(sys.version.split()[0])

    md = md_path.read_text(encoding="utf-8")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Benchmark | Figure |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Benchmark",
        "Figure",
        "Value",
        "Spread (min-max)",
        "Unit",
        "Baseline",
        "Baseline value",
        "Ratio",
        "Goal",
        "Met?",
    ]
    upload = next(line for line in lines if "| upload |" in line)
    assert f"| 380 | 342 {h.EN_DASH} 418 | MB/s | bare | 400 | 0.95 |" in upload
    assert upload.rstrip().endswith("| yes |")
    download = next(line for line in lines if "download" in line and line.startswith("|"))
    assert "download \\| fast" in download  # a pipe in a name must not break the table
    assert download.rstrip().endswith("| **no** |")
    opens = next(line for line in lines if "| opens |" in line)
    assert "| 1,234 |" in opens and opens.rstrip().endswith("| — |")
    assert "| broken | broken: ERROR | ERROR |" in md
    assert "- **broken: ERROR**: bench.broken: RuntimeError: boom" in md
    assert "![Ratio of each figure to its baseline](benchmarks.png)" in md
    assert (
        "**4 figures; 2 with a checkable goal: 1 met, 1 missed; 1 error row(s).**"
        " Missed: download \\| fast." in md
    )
    assert "make bench" in md and "make bench-quick" in md
    assert f"| CPUs | {os.cpu_count()} |" in md

    width, height = _png_size(png_path)
    assert width >= 400 and height >= 200
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_single_sample_has_no_spread(tmp_path: Path) -> None:
    row = _row("one", 5.0, 10.0, 0.5, "ratio >= 1")
    row["min"] = row["max"] = 5.0
    about = "Measures X.\n\nSee :func:`measure` and::\n\n    a -> b"
    modules = [{"module": "one", "status": "ok", "rows": 1, "about": about}]
    md = h.render_markdown({"rows": [row], "modules": modules}, chart=None)
    assert "| 5.00 | none (one sample) | MB/s |" in md
    assert "### `bench/one.py`\n\nMeasures X.\n\nSee `measure` and:\n\n    a -> b" in md


def test_chart_draws_one_bar_per_finite_ratio(tmp_path: Path) -> None:
    rows = _synthetic_result()["rows"]
    rows.append(_row("nan ratio", 1.0, 1.0, math.nan, "ratio >= 1"))
    assert h.render_chart(rows, tmp_path / "a.png", title="t") == 2
    assert h.render_chart([], tmp_path / "empty.png", title="t") == 0
    assert _png_size(tmp_path / "empty.png")[0] > 0


@pytest.mark.parametrize(
    ("goal", "unit", "expected"),
    [
        (f"≥ 0.95 {X} bare qh3", "MB/s", [("ratio", ">=", 0.95)]),
        ("ratio >= 0.8", "opens/s", [("ratio", ">=", 0.8)]),
        (
            f"≥ 350 MB/s upload, ≥ 0.95 {X} bare",
            "MB/s",
            [("value", ">=", 350.0), ("ratio", ">=", 0.95)],
        ),
        ("at least 1.0x ssh -R", "MB/s", [("ratio", ">=", 1.0)]),
        ("≤ 5 µs per round trip", "µs", [("value", "<=", 5.0)]),
        ("p99 below ssh (ratio > 1)", "ms", [("ratio", ">", 1.0)]),
        ("informational", "µs", []),
        ("", "µs", []),
    ],
)
def test_parse_goal(goal: str, unit: str, expected: list[tuple[str, str, float]]) -> None:
    checks = h.parse_goal(goal, unit)
    assert [(c.target, c.op, c.threshold) for c in checks] == expected


def test_goal_met_needs_every_check_and_a_figure() -> None:
    row = _row("t", 360.0, 400.0, 0.9, f"≥ 350 MB/s and ≥ 0.95 {X} bare")
    assert h.goal_met(row) is False
    row["ratio"] = 0.96
    assert h.goal_met(row) is True
    row["ratio"] = None
    assert h.goal_met(row) is None
    assert h.goal_met(h.error_row("m", "boom")) is None


def test_make_row_and_validate_row() -> None:
    up = h.make_row("tp", "MB/s", [3.0, 1.0, 2.0], goal="≥ 0.5 x", baseline="b", baseline_value=4.0)
    assert (up["value"], up["min"], up["max"], up["ratio"]) == (2.0, 1.0, 3.0, 0.5)
    assert h.validate_row(up) == []
    lat = h.make_row(
        "lat",
        "µs",
        [2.0],
        goal="ratio ≥ 1",
        baseline="b",
        baseline_value=1.0,
        higher_is_better=False,
    )
    assert lat["ratio"] == 0.5
    assert h.validate_row({"name": "x"})  # missing keys
    assert h.validate_row([1, 2]) == ["row is a list, not a dict"]
    bad = dict(up, value=True)
    assert any("'value'" in p for p in h.validate_row(bad))
    assert any("min <= value <= max" in p for p in h.validate_row(dict(up, value=9.0)))
    with pytest.raises(ValueError):
        h.summarize([])
    assert h.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert h.percentile([float(i) for i in range(1, 101)], 99) == 99.0


_FAKE_MODULES = {
    "good": """
        \"\"\"Fake throughput benchmark.\"\"\"
        def run(quick):
            return [{"name": "tp", "unit": "MB/s", "value": 2.0, "min": 1.0, "max": 3.0,
                     "baseline": "bare", "baseline_value": 2.0, "ratio": 1.0,
                     "goal": "ratio >= 0.95", "quick": quick}]
    """,
    "boom": """
        def run(quick):
            raise RuntimeError("kaboom")
    """,
    "badformat": """
        def run(quick):
            return [{"name": "x", "unit": "s", "value": "fast"}]
    """,
    "hang": """
        import os, subprocess, sys, threading
        def run(quick):
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            with open(os.environ["BENCH_TEST_PIDFILE"], "w") as f:
                f.write(str(helper.pid))
            threading.Event().wait(600)
            return []
    """,
}


def _pid_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited (or had already) within ``timeout`` seconds.

    A pidfd becomes readable when the process terminates: no polling of its state.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


@pytest.mark.subprocess
def test_runner_turns_failures_into_error_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, source in _FAKE_MODULES.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(source))
    pidfile = tmp_path / "helper.pid"
    monkeypatch.setenv("BENCH_TEST_PIDFILE", str(pidfile))

    def run(name: str, timeout: float = CLI_TIMEOUT) -> tuple[dict[str, Any], list[h.Row]]:
        return _run_module(
            name, quick=True, timeout=timeout, package="fakebench", search_path=tmp_path
        )

    status, rows = run("good")
    assert status["status"] == "ok" and status["rows"] == 1
    assert status["about"] == "Fake throughput benchmark."
    assert rows[0]["module"] == "good" and rows[0]["met"] is True and rows[0]["quick"] is True

    status, rows = run("boom")
    assert status["status"] == "error" and "RuntimeError: kaboom" in status["error"]
    assert len(rows) == 1 and "kaboom" in str(rows[0]["error"])

    status, rows = run("badformat")
    assert status["status"] == "format-error"
    assert "breaks the row format" in str(rows[0]["error"]) and "'value' is str" in str(
        rows[0]["error"]
    )

    status, rows = run("absent")
    assert status["status"] == "missing" and rows[0]["error"]

    status, rows = run("hang", timeout=3_000 * MS)  # the runner cuts it off: no hang here
    assert status["status"] == "timeout" and rows[0]["error"]
    helper_pid = int(pidfile.read_text())
    assert _pid_gone(helper_pid, timeout=LONG), "process started by the module survived"


@pytest.mark.subprocess
def test_cli_rejects_unknown_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nosuch", "--no-doc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
    assert set(MODULES) == {
        "wire",
        "transport",
        "session",
        "rust",
        "tunnel",
        "udp",
        "paths",
        "fleet",
    }


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.subprocess
def test_cli_quick_wire_run(tmp_path: Path) -> None:
    """The real command on the real wire benchmark, as CI's smoke run uses it."""
    out = tmp_path / "quick.json"
    doc_before = _mtime(ROOT / "docs" / "BENCHMARKS.md")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "wire",
            "--no-doc",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=9 * LONG,  # one quick benchmark module
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    assert doc["quick"] is True
    assert [m["module"] for m in doc["modules"]] == ["wire"]
    assert doc["modules"][0]["status"] == "ok"
    assert doc["rows"], "the wire benchmark returned no rows"
    for row in doc["rows"]:
        assert row["module"] == "wire"
        assert "error" not in row
        assert h.validate_row(row) == [], row
        assert row["name"] in proc.stdout  # the summary table names every figure
    doc_after = _mtime(ROOT / "docs" / "BENCHMARKS.md")
    assert doc_after == doc_before, "--no-doc run touched docs/BENCHMARKS.md"


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_quick_every_module(tmp_path: Path) -> None:
    """``make bench-quick`` as CI runs it: every benchmark module runs and reports rows.

    This keeps the benchmarks from rotting silently; it checks that each one runs and
    returns well-formed figures, never how fast anything is.
    """
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-doc", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=115_000 * MS,  # every quick module, inside pytest's 120 s
        check=False,
    )
    doc = json.loads(out.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    statuses = {m["module"]: m["status"] for m in doc["modules"]}
    assert statuses == dict.fromkeys(MODULES, "ok"), proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    for module in MODULES:
        rows = [r for r in doc["rows"] if r["module"] == module]
        assert rows, f"bench.{module} returned no rows"
        assert all(h.validate_row(r) == [] for r in rows)


@pytest.mark.subprocess
def test_cli_render_rewrites_page_from_json(tmp_path: Path) -> None:
    """``--render`` rebuilds the page and chart from a result file, nothing else."""
    source = tmp_path / "result.json"
    h.write_report(_synthetic_result(), json_path=source)
    docs = tmp_path / "docs"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--render", str(source), "--docs-dir", str(docs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in docs.iterdir()) == ["BENCHMARKS.md", "benchmarks.png"]
    md = (docs / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "| synthetic | upload | 380 |" in md and "](benchmarks.png)" in md
    assert _png_size(docs / "benchmarks.png")[0] > 0

    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--render", str(bad), "--docs-dir", str(docs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 2 and "cannot read" in proc.stderr
