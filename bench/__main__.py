"""Run every quic-reverse benchmark and publish the figures: ``python -m bench``.

Usage::

    python -m bench [--quick] [--only NAME ...] [--json PATH] [--doc | --no-doc]
                    [--timeout SECONDS] [--render JSON] [--docs-dir DIR]

Each benchmark module (fixed list :data:`MODULES`) runs in its own child process, in its
own process group, one after the other: a module that hangs is interrupted after
``--timeout`` seconds (SIGINT so its cleanup runs, then SIGTERM/SIGKILL to the whole
group, which takes down anything it started, such as a private sshd), and a module that
is missing, raises, times out or returns rows in the wrong format becomes an error row
in the results and makes the command exit with status 1 -- it is never dropped silently.
Speed itself never fails the command: benchmarks report, they do not judge.

Outputs:

* full run of every module (``make bench``): ``bench/results/latest.json``,
  ``docs/BENCHMARKS.md`` and ``docs/benchmarks.png``;
* ``--quick`` (``make bench-quick``, CI smoke run, < 1 minute): ``bench/results/quick.json``
  only, so smoke runs leave the committed documents alone;
* ``--only``: ``bench/results/partial.json`` only (a subset must not replace the published
  page); ``--doc`` forces the page and chart, ``--json`` picks another JSON path;
* ``--render JSON``: re-render the page and chart from an earlier result file.

Exit status: 0 all modules ran, 1 some module failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._harness import (
    ManagedProcess,
    Row,
    error_row,
    format_number,
    goal_met,
    machine_info,
    print_table,
    sanitize_for_json,
    validate_row,
    write_report,
)

logger = logging.getLogger("quic_reverse.bench")

#: The benchmark modules, in the order they run (cheapest first).
MODULES: tuple[str, ...] = (
    "wire",
    "transport",
    "session",
    "rust",
    "tunnel",
    "udp",
    "paths",
    "fleet",
)

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = ROOT / "docs"
DOC_NAME = "BENCHMARKS.md"
CHART_NAME = "benchmarks.png"

#: Per-module time limits (seconds) unless ``--timeout`` is given.
FULL_TIMEOUT = 1800.0
QUICK_TIMEOUT = 50.0
#: What ``--quick`` promises for the whole run (reported, not enforced by killing).
QUICK_BUDGET = 60.0

REPRODUCE = "make bench"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the quic-reverse benchmarks (each against its baseline in the same "
        "run) and write the JSON results, docs/BENCHMARKS.md and its chart.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repetitions (< 1 min in total); for CI smoke runs",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=MODULES,
        metavar="NAME",
        help=f"run only these modules (of: {', '.join(MODULES)})",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="where to write the JSON")
    parser.add_argument(
        "--doc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write docs/BENCHMARKS.md and docs/benchmarks.png "
        "(default: only for a full run of every module)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"time limit per module (default {FULL_TIMEOUT:g}, quick {QUICK_TIMEOUT:g})",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="do not run anything: re-render the page and chart from this result file",
    )
    parser.add_argument(
        "--docs-dir",
        type=Path,
        default=DOCS_DIR,
        metavar="DIR",
        help=f"where {DOC_NAME} and {CHART_NAME} go (default: docs/)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Internal: run one module in this (child) process and write its rows to a file.
    parser.add_argument("--child", metavar="MODULE", help=argparse.SUPPRESS)
    parser.add_argument("--package", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error("--timeout must be a positive number of seconds")
    if args.child is not None and (
        args.result_file is None
        or not args.child.isidentifier()
        or not all(part.isidentifier() for part in args.package.split("."))
    ):
        parser.error("--child needs a module name and --result-file")
    return args


# --------------------------------------------------------------------------- child side


def _run_child(name: str, quick: bool, result_file: Path, package: str = "bench") -> int:
    """Import ``<package>.<name>``, call ``run(quick)`` and write the outcome as JSON."""
    outcome: dict[str, Any]
    qualified = f"{package}.{name}"
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(qualified)
        run = getattr(module, "run", None)
        if not callable(run):
            raise TypeError(f"{qualified} has no callable run(quick)")
        rows = run(quick)
        if not isinstance(rows, list):
            raise TypeError(f"{qualified}.run() returned {type(rows).__name__}, not a list")
        # The module's docstring says what it measures; the published page quotes it.
        outcome = {"status": "ok", "rows": rows, "about": inspect.getdoc(module) or ""}
    except ModuleNotFoundError as exc:
        missing = exc.name == qualified
        outcome = {
            "status": "missing" if missing else "error",
            "error": f"module {qualified} does not exist"
            if missing
            else f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        outcome = {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    outcome["seconds"] = time.perf_counter() - t0
    try:
        # Extra keys a module adds (p50, p99, notes...) are kept; odd types become text.
        text = json.dumps(sanitize_for_json(outcome), allow_nan=False, default=str)
    except (TypeError, ValueError) as exc:
        text = json.dumps(
            {
                "status": "error",
                "error": f"rows are not JSON-serialisable: {exc}",
                "seconds": outcome["seconds"],
            }
        )
    result_file.write_text(text, encoding="utf-8")
    return 0 if outcome["status"] == "ok" else 1


# --------------------------------------------------------------------------- parent side


def _run_module(
    name: str,
    *,
    quick: bool,
    timeout: float,
    package: str = "bench",
    search_path: Path = ROOT,
    verbose: bool = False,
) -> tuple[dict[str, Any], list[Row]]:
    """Run module ``<package>.<name>`` in a child process; return its status and rows.

    ``package``/``search_path`` exist so that the tests can run fake benchmark modules
    through exactly the same machinery.
    """
    status: dict[str, Any] = {"module": name, "status": "ok", "seconds": None, "rows": 0}
    source = search_path.joinpath(*package.split("."), f"{name}.py")
    if not source.is_file():
        rel = os.path.relpath(source, search_path)
        status.update(status="missing", error=f"{rel} does not exist")
        return status, [error_row(name, status["error"], name=f"{name}: missing")]
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench", "--child", name, "--result-file", str(result_file)]
        cmd += ["--package", package]
        if quick:
            cmd.append("--quick")
        if verbose:
            cmd.append("--verbose")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(search_path), str(ROOT), env.get("PYTHONPATH", "")) if p
        )
        t0 = time.monotonic()
        # The module's own output (progress, logs) goes to our stderr; stdout is the table.
        child = ManagedProcess(
            cmd,
            label=f"{package}.{name}",
            grace=10.0,
            stdout=sys.stderr,
            stderr=None,
            env=env,
            cwd=ROOT,
        )
        timed_out = False
        with child:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                logger.error("%s.%s exceeded %g s; stopping it", package, name, timeout)
        status["seconds"] = time.monotonic() - t0
        if timed_out:
            status.update(status="timeout", error=f"did not finish within {timeout:g} s")
            return status, [error_row(name, f"{package}.{name}: {status['error']}")]
        try:
            outcome = json.loads(result_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            status.update(
                status="error",
                error=f"child exited with code {child.returncode} without a result ({exc})",
            )
            return status, [error_row(name, f"{package}.{name}: {status['error']}")]
    if outcome.get("status") != "ok":
        status.update(status=outcome.get("status", "error"), error=outcome.get("error"))
        if outcome.get("traceback"):
            print(outcome["traceback"], file=sys.stderr)
        return status, [error_row(name, f"{package}.{name}: {status['error']}")]
    if isinstance(outcome.get("about"), str) and outcome["about"]:
        status["about"] = outcome["about"]
    rows: list[Row] = []
    problems_seen = False
    raw_rows = outcome.get("rows", [])
    if not raw_rows:
        status.update(status="error", error="run() returned no rows")
        return status, [error_row(name, f"{package}.{name}: run() returned no rows")]
    for i, raw in enumerate(raw_rows):
        raw = _restore_nan(raw)
        problems = validate_row(raw)
        if problems:
            problems_seen = True
            label = raw.get("name") if isinstance(raw, dict) else None
            rows.append(
                error_row(
                    name,
                    f"{package}.{name} row {i} breaks the row format: {'; '.join(problems)}",
                    name=f"{name}: {label if isinstance(label, str) else f'row {i}'} (bad format)",
                )
            )
            continue
        row: Row = {"module": name, **raw}
        row["met"] = goal_met(row)
        rows.append(row)
    status["rows"] = len(rows)
    if problems_seen:
        status.update(status="format-error", error="some rows break the row format")
    return status, rows


def _restore_nan(raw: object) -> Any:
    """JSON carries NaN as null; put NaN back in the numeric slots so validation holds."""
    if isinstance(raw, dict):
        out = dict(raw)
        for key in ("value", "min", "max"):
            if key in out and out[key] is None:
                out[key] = math.nan
        return out
    return raw


def _command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "bench", *argv])


def _run_all(args: argparse.Namespace, argv: Sequence[str]) -> int:
    names = [m for m in MODULES if args.only is None or m in args.only]
    partial = len(names) != len(MODULES)
    timeout = args.timeout or (QUICK_TIMEOUT if args.quick else FULL_TIMEOUT)
    if args.json is not None:
        json_path: Path = args.json
    elif args.quick:
        json_path = RESULTS_DIR / "quick.json"
    elif partial:
        json_path = RESULTS_DIR / "partial.json"
    else:
        json_path = RESULTS_DIR / "latest.json"
    write_doc = args.doc if args.doc is not None else not (args.quick or partial)

    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    machine = machine_info(include_openssh="tunnel" in names or "paths" in names)
    modules: list[dict[str, Any]] = []
    rows: list[Row] = []
    for name in names:
        print(
            f"[bench] running bench.{name}{' (quick)' if args.quick else ''} ...", file=sys.stderr
        )
        status, module_rows = _run_module(
            name, quick=args.quick, timeout=timeout, verbose=args.verbose
        )
        modules.append(status)
        rows.extend(module_rows)
        print(
            f"[bench] bench.{name}: {status['status']} in {format_number(status['seconds'])} s"
            + (f" -- {status['error']}" if status.get("error") else ""),
            file=sys.stderr,
        )
    result: dict[str, Any] = {
        "schema": "quic-reverse-bench/1",
        "generated_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command_line(argv),
        "reproduce": REPRODUCE,
        "quick": bool(args.quick),
        "duration_s": round(time.monotonic() - t0, 2),
        "machine": machine,
        "modules": modules,
        "rows": rows,
    }
    write_report(
        result,
        json_path=json_path,
        md_path=args.docs_dir / DOC_NAME if write_doc else None,
        png_path=args.docs_dir / CHART_NAME if write_doc else None,
    )
    print_table(rows)
    if args.quick and result["duration_s"] > QUICK_BUDGET:
        print(
            f"[bench] WARNING: quick mode took {result['duration_s']} s, over its "
            f"{QUICK_BUDGET:g} s budget (see the per-module times above)",
            file=sys.stderr,
        )
    failed = [m["module"] for m in modules if m["status"] != "ok"]
    print(
        f"\n[bench] {len(rows)} rows in {result['duration_s']} s; JSON: {json_path}",
        file=sys.stderr,
    )
    if write_doc:
        print(f"[bench] wrote {DOC_NAME} and {CHART_NAME} in {args.docs_dir}", file=sys.stderr)
    if failed:
        print(f"[bench] FAILED modules: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _render(path: Path, docs_dir: Path) -> int:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"python -m bench: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        print(f"python -m bench: {path} is not a benchmark result file", file=sys.stderr)
        return 2
    result["rows"] = [_restore_nan(r) for r in result["rows"]]
    write_report(
        result, json_path=None, md_path=docs_dir / DOC_NAME, png_path=docs_dir / CHART_NAME
    )
    print(f"[bench] wrote {DOC_NAME} and {CHART_NAME} in {docs_dir} from {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.child is not None:
        return _run_child(args.child, args.quick, args.result_file, args.package)
    if args.render is not None:
        return _render(args.render, args.docs_dir)
    # SIGTERM (a CI job being cancelled) unwinds like Ctrl-C, so the running module's
    # process group is stopped by its ``with`` block instead of being orphaned.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run_all(args, argv)
    except KeyboardInterrupt:
        print("[bench] interrupted; child processes stopped, nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
