"""Shared benchmark helpers: statistics, rows, ports, processes, machine info.

Every benchmark module ``bench/<name>.py`` exposes ``run(quick: bool) -> list[dict]``
returning rows in one format (see :data:`ROW_KEYS`).  This module holds what those
modules and the ``python -m bench`` driver share, so that every figure is computed the
same way:

* :func:`summarize` / :func:`time_runs` / :func:`time_runs_async` -- median, min and
  max over several runs (the project reports medians with their spread, never one run).
* :func:`make_row` -- builds a row in the common format, computing the ratio against a
  baseline measured in the same run; :func:`validate_row` checks a row from any module.
* :func:`free_port`, :func:`wait_tcp_port` -- loopback-only port helpers.
* :class:`ManagedProcess` -- a subprocess in its own process group that is always
  stopped (SIGINT, then SIGTERM, then SIGKILL to the whole group) when the ``with``
  block exits, including on errors and ``KeyboardInterrupt``.
* :func:`machine_info` -- CPU count/model, Python, QUIC stack versions, OpenSSH.
* :func:`print_table` -- the table a module prints when run alone.

Nothing here asserts speed: benchmarks report figures, they never fail on them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

logger = logging.getLogger("quic_reverse.bench")

LOOPBACK = "127.0.0.1"
EN_DASH = "\u2013"  # spreads read "1.2 - 3.4" with a real dash, not a minus sign

#: Keys every row must carry, with the types a value may have.
ROW_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "unit": (str,),
    "value": (int, float),
    "min": (int, float),
    "max": (int, float),
    "baseline": (str, type(None)),
    "baseline_value": (int, float, type(None)),
    "ratio": (int, float, type(None)),
    "goal": (str,),
}

Row = dict[str, object]


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class Summary:
    """Median and spread of a set of samples (``n`` = number of samples)."""

    median: float
    min: float
    max: float
    n: int


def summarize(samples: Iterable[float]) -> Summary:
    """Return the median, min and max of ``samples``.

    Raises ``ValueError`` on an empty sample set: a figure without a measurement must
    not be published as a number.
    """
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no samples to summarize")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def time_runs(fn: Callable[[], object], runs: int, *, warmup: int = 1) -> list[float]:
    """Call ``fn`` ``warmup + runs`` times and return the wall time (s) of the last ``runs``."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def time_runs_async(
    fn: Callable[[], Awaitable[object]], runs: int, *, warmup: int = 1
) -> list[float]:
    """Async twin of :func:`time_runs`: awaits ``fn()`` and times each await."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        await fn()
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of ``samples``; used for p50/p99 latency."""
    if not samples:
        raise ValueError("no samples")
    if not 0 <= pct <= 100:
        raise ValueError("pct must be within 0..100")
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


# --------------------------------------------------------------------------- rows


def make_row(
    name: str,
    unit: str,
    samples: Iterable[float] | Summary,
    *,
    goal: str,
    baseline: str | None = None,
    baseline_value: float | None = None,
    higher_is_better: bool = True,
) -> Row:
    """Build a row in the common format from samples (or a ready :class:`Summary`).

    The ratio is ``value / baseline_value`` when higher is better (throughput, rates)
    and ``baseline_value / value`` when lower is better (latency, µs per operation), so a
    ratio above 1 always means "better than the baseline".  State which one you use in
    ``goal`` (e.g. ``"ratio >= 0.95 (x bare qh3)"``).
    """
    s = samples if isinstance(samples, Summary) else summarize(samples)
    ratio: float | None = None
    if baseline_value is not None and baseline_value > 0 and s.median > 0:
        ratio = s.median / baseline_value if higher_is_better else baseline_value / s.median
    return {
        "name": name,
        "unit": unit,
        "value": s.median,
        "min": s.min,
        "max": s.max,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": ratio,
        "goal": goal,
    }


def validate_row(row: object) -> list[str]:
    """Return the ways ``row`` violates the common format (empty list = valid)."""
    if not isinstance(row, Mapping):
        return [f"row is a {type(row).__name__}, not a dict"]
    problems: list[str] = []
    for key, types in ROW_KEYS.items():
        if key not in row:
            problems.append(f"missing key {key!r}")
            continue
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " | ".join("None" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key!r} is {type(value).__name__}, expected {wanted}")
    if problems:
        return problems
    lo, mid, hi = (float(row[k]) for k in ("min", "value", "max"))
    if all(math.isfinite(x) for x in (lo, mid, hi)) and not lo <= mid <= hi:
        problems.append(f"expected min <= value <= max, got {lo} / {mid} / {hi}")
    if row["baseline"] is None and row["ratio"] is not None:
        problems.append("ratio given without a baseline name")
    return problems


# --------------------------------------------------------------------------- ports


def free_port(kind: str = "tcp") -> int:
    """Return a currently free port on 127.0.0.1 (``kind`` is ``"tcp"`` or ``"udp"``).

    The port is released before returning, so another process could take it; prefer
    binding to port 0 directly where the code under test allows it.
    """
    if kind not in ("tcp", "udp"):
        raise ValueError("kind must be 'tcp' or 'udp'")
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_tcp_port(
    port: int,
    *,
    host: str = LOOPBACK,
    timeout: float = 10.0,
    process: ManagedProcess | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections, for at most ``timeout`` seconds.

    Polls with a short back-off (bounded in time).  If ``process`` exits first, raises
    ``RuntimeError`` with its exit code instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{process.label} exited with code {process.returncode} before port {port} opened"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout} s")
        time.sleep(delay)  # polling an external process: there is no event to wait on
        delay = min(delay * 2, 0.2)


# --------------------------------------------------------------------------- processes


class ManagedProcess:
    """A subprocess that is always stopped, with its whole process group, on exit.

    Use as a context manager::

        with ManagedProcess(["/usr/sbin/sshd", "-D", "-f", cfg], label="sshd") as p:
            wait_tcp_port(port, process=p)
            ...

    The child gets its own session/process group, so grandchildren are stopped too.
    On exit it receives SIGINT (Python children run their ``finally`` blocks), then
    SIGTERM, then SIGKILL, each after ``grace`` seconds, and is always reaped.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        label: str | None = None,
        grace: float = 3.0,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.args = list(args)
        self.label = label or Path(self.args[0]).name
        self.grace = grace
        self._stdout = stdout
        self._stderr = stderr
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The running ``Popen`` (only valid inside the ``with`` block)."""
        if self._proc is None:
            raise RuntimeError(f"{self.label} is not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def start(self) -> ManagedProcess:
        if self._proc is not None:
            raise RuntimeError(f"{self.label} already started")
        logger.debug("starting %s: %s", self.label, self.args)
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,
        )
        return self

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """Wait for a normal exit, at most ``timeout`` s (``subprocess.TimeoutExpired``)."""
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        """Stop the process group (idempotent); return the exit code."""
        proc = self._proc
        if proc is None:
            return None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            _signal_group(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.grace)
        if proc.poll() is None:  # pragma: no cover - SIGKILL cannot be ignored
            proc.wait()
        # The leader is gone; take down anything it left behind in its group.
        _signal_group(proc.pid, signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        logger.debug("%s stopped with code %s", self.label, proc.returncode)
        return proc.returncode

    def __enter__(self) -> ManagedProcess:
        # ``with ManagedProcess(...).start() as p`` works too (like ``subprocess.Popen``).
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- machine


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "cpu model"):
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def openssh_version() -> str | None:
    """``ssh -V`` of the OpenSSH client on PATH (None if absent)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return None
    try:
        out = subprocess.run([ssh, "-V"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stderr or out.stdout).strip()
    return text.splitlines()[0] if text else None


def sshd_path() -> str | None:
    """Path of the OpenSSH server binary, if installed."""
    for candidate in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("sshd")


def git_revision(repo: Path | None = None) -> str | None:
    """Short commit id of the checkout (with ``-dirty`` when it has local changes)."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info(*, include_openssh: bool = True) -> dict[str, object]:
    """Describe the machine the figures come from (stored with every result file)."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info: dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "qh3": _package_version("qh3"),
        "aioquic": _package_version("aioquic"),
        "cryptography": _package_version("cryptography"),
        "matplotlib": _package_version("matplotlib"),
        "quic_reverse": _package_version("quic-reverse"),
        "git": git_revision(),
        "loadavg_at_start": load,
    }
    if include_openssh:
        info["openssh"] = openssh_version()
        info["sshd"] = sshd_path()
    return info


# --------------------------------------------------------------------------- output


def format_number(value: object) -> str:
    """Compact human formatting for table cells (3 significant digits, no exponent)."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    x = float(value)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude >= 100:
        return f"{x:,.0f}"
    if magnitude >= 10:
        return f"{x:.1f}"
    if magnitude >= 1:
        return f"{x:.2f}"
    digits = max(2, 2 - math.floor(math.log10(magnitude)))
    whole, _, decimals = f"{x:.{digits}f}".partition(".")
    return f"{whole}.{decimals.rstrip('0').ljust(2, '0')}"


def print_table(rows: Sequence[Mapping[str, object]], file: IO[str] | None = None) -> None:
    """Print rows as an aligned plain-text table (used by ``python -m bench.<name>``)."""
    out = file if file is not None else sys.stdout
    show_met = any("met" in row for row in rows)
    header: tuple[str, ...] = (
        "figure",
        "value",
        "min-max",
        "unit",
        "baseline",
        "baseline value",
        "ratio",
        "goal",
    )
    if show_met:
        header += ("met?",)
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        if row.get("error"):
            cells: tuple[str, ...] = (str(row.get("name", "?")), "ERROR", "", "", "", "", "")
            cells += (str(row["error"]),) + (("",) if show_met else ())
            table.append(cells)
            continue
        cells = (
            str(row.get("name", "?")),
            format_number(row.get("value")),
            f"{format_number(row.get('min'))}-{format_number(row.get('max'))}",
            str(row.get("unit", "")),
            str(row.get("baseline") or "—"),
            format_number(row.get("baseline_value")),
            format_number(row.get("ratio")),
            str(row.get("goal", "")),
        )
        if show_met:
            met = row.get("met")
            cells += ("yes" if met is True else "NO" if met is False else "—",)
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip(), file=out
        )
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def sanitize_for_json(value: object) -> object:
    """Replace non-finite floats (NaN, inf) by ``None`` recursively: strict JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): sanitize_for_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize_for_json(v) for v in value]
    return value


_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """Lowercase, dash-separated identifier (for anchors and file names)."""
    return _SLUG.sub("-", text.lower()).strip("-")


# --------------------------------------------------------------------------- goals

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}

_GOAL_REWRITES = (
    ("≥", ">="),
    ("≤", "<="),
    ("=>", ">="),
    ("=<", "<="),
    ("\u00d7", "x"),
    ("at least", ">="),
    ("at most", "<="),
    ("no less than", ">="),
    ("no more than", "<="),
)

_GOAL_CLAUSE = re.compile(
    r"(?P<op>>=|<=|>|<)\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<times>x(?![a-z])|times\b)?\s*(?P<rest>\S*)",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class GoalCheck:
    """One machine-checkable part of a goal: ``<target> <op> <threshold>``.

    ``target`` is ``"ratio"`` (the row's ratio) or ``"value"`` (the row's median).
    """

    target: str
    op: str
    threshold: float

    def holds(self, row: Mapping[str, object]) -> bool | None:
        """True/False if the row meets this check, None if the figure is missing."""
        actual = row.get(self.target)
        if isinstance(actual, bool) or not isinstance(actual, int | float):
            return None
        if not math.isfinite(float(actual)):
            return None
        return _OPS[self.op](float(actual), self.threshold)

    def describe(self) -> str:
        return f"{self.target} {self.op} {self.threshold:g}"


def parse_goal(goal: str, unit: str = "") -> list[GoalCheck]:
    """Extract the checkable comparisons from a free-text goal.

    Understood forms (``≥``/``>=``, ``≤``/``<=``, ``>``, ``<``, "at least", "at most"):

    * ``"≥ 0.95 x bare qh3"`` (also with the multiplication sign), ``"ratio >= 0.8"``,
      ``">= 1.0x ssh -R"`` -> ratio checks;
    * ``"≥ 350 MB/s"`` (number followed by the row's unit) -> a check on the value;
    * a bare number (``">= 1.0"``) is a ratio check.

    Several comparisons ("≥ 350 MB/s and ≥ 0.95 x bare") must all hold.  Text without a
    comparison ("informational", "report only") yields no check: the goal is shown
    but "met?" stays empty rather than guessed.
    """
    text = goal.lower()
    for old, new in _GOAL_REWRITES:
        text = text.replace(old, new)
    unit_l = unit.strip().lower()
    checks: list[GoalCheck] = []
    for m in _GOAL_CLAUSE.finditer(text):
        before = text[max(0, m.start() - 12) : m.start()]
        rest = m.group("rest")
        if m.group("times") or "ratio" in before:
            target = "ratio"
        elif _names_unit(rest, unit_l):
            target = "value"
        else:
            target = "ratio"
        checks.append(GoalCheck(target, m.group("op"), float(m.group("num"))))
    return checks


def _names_unit(rest: str, unit: str) -> bool:
    """Whether the word after a goal's number is a unit (so the goal is on the value)."""
    if not rest:
        return False
    if unit and (rest.startswith(unit) or unit.startswith(rest)):
        return True
    return _UNIT_WORD.match(rest) is not None


_UNIT_WORD = re.compile(r"^(?:[kmgt]i?b|[kmgt]?b/s|[\u00b5u]?s\b|ms|ns|/s|ops|op/s|%)")


def goal_met(row: Mapping[str, object]) -> bool | None:
    """Whether ``row`` meets its goal: True, False, or None (no checkable goal / no figure)."""
    if row.get("error"):
        return None
    checks = parse_goal(str(row.get("goal", "")), str(row.get("unit", "")))
    if not checks:
        return None
    verdicts = [c.holds(row) for c in checks]
    if any(v is False for v in verdicts):
        return False
    if any(v is None for v in verdicts):
        return None
    return True


def ratio_goal(row: Mapping[str, object]) -> GoalCheck | None:
    """The first ratio check of the row's goal (drawn as the goal line in the chart)."""
    for check in parse_goal(str(row.get("goal", "")), str(row.get("unit", ""))):
        if check.target == "ratio":
            return check
    return None


# --------------------------------------------------------------------------- report

RESULT_SCHEMA = "quic-reverse-bench/1"


def error_row(module: str, message: str, *, name: str | None = None) -> Row:
    """A row standing for a benchmark that is missing, raised, or broke the format."""
    return {
        "module": module,
        "name": name or f"{module}: ERROR",
        "unit": "",
        "value": math.nan,
        "min": math.nan,
        "max": math.nan,
        "baseline": None,
        "baseline_value": None,
        "ratio": None,
        "goal": "",
        "error": message,
    }


def _cell(text: object) -> str:
    """Escape text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met_cell(met: object) -> str:
    if met is True:
        return "yes"
    if met is False:
        return "**no**"
    return "—"


def _spread_cell(row: Mapping[str, Any]) -> str:
    lo, hi = row.get("min"), row.get("max")
    if lo == hi and isinstance(lo, int | float) and math.isfinite(float(lo)):
        return "none (one sample)"
    return f"{format_number(lo)} {EN_DASH} {format_number(hi)}"


def _goal_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    checked = [r for r in rows if r.get("met") is not None]
    met = sum(1 for r in checked if r.get("met") is True)
    missed = [str(r.get("name", "?")) for r in checked if r.get("met") is False]
    errors = sum(1 for r in rows if r.get("error"))
    text = (
        f"**{len(rows)} figures; {len(checked)} with a checkable goal: {met} met,"
        f" {len(missed)} missed"
    )
    text += f"; {errors} error row(s).**" if errors else ".**"
    if missed:
        text += " Missed: " + "; ".join(_cell(m) for m in missed) + "."
    return text


_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _rst_to_md(text: str) -> str:
    """Docstring (reST-ish) to markdown: roles become code spans, ``::`` becomes ``:``."""
    text = _RST_ROLE.sub(r"`\1`", text)
    return re.sub(r"::\n", ":\n", text)


def render_markdown(result: Mapping[str, Any], *, chart: str | None) -> str:
    """Render a result document (as written to JSON) as the BENCHMARKS.md page.

    ``chart`` is the chart's path relative to the markdown file (None: no chart).
    """
    rows: list[Mapping[str, Any]] = list(result.get("rows", []))
    machine: Mapping[str, Any] = result.get("machine", {})
    modules: list[Mapping[str, Any]] = list(result.get("modules", []))
    reproduce = str(result.get("reproduce", "make bench"))
    lines: list[str] = [
        "# Benchmarks",
        "",
        f"_Generated {result.get('generated_utc', '?')} by `{result.get('command', '?')}`"
        f" at commit `{machine.get('git') or '?'}`"
        f"{' (quick mode: smoke-test sizes, not representative)' if result.get('quick') else ''}."
        " Do not edit by hand: this page, `docs/benchmarks.png` and"
        " `bench/results/latest.json` are written by the benchmark command._",
        "",
        "## Reproduce",
        "",
        "After the README's set-up, from the repository root:",
        "",
        "```sh",
        f"{reproduce:<27} # every benchmark; writes this page, the chart, the JSON",
        "make bench-quick            # < 1 min smoke run (CI): bench/results/quick.json only",
        ".venv/bin/python -m bench --only wire session   # a subset",
        "```",
        "",
        "The tunnel benchmark compares with `ssh -N -R` through a private `sshd` it starts",
        "and stops itself on 127.0.0.1 (Debian package `openssh-server`); without `sshd`",
        "its ssh figures are reported as skipped. The path benchmark (`bench.paths`) runs",
        "the same comparison between two network namespaces joined by a veth pair (MTU",
        "1500) or by `pathlab`'s user-space delay line (50 ms RTT, 0/1/5 % loss each way);",
        "it needs root and is reported as skipped elsewhere.",
        "",
        "Every figure is the **median of several runs** with its spread (min-max), measured",
        "beside its **baseline in the same run** on the same machine, over loopback",
        "(127.0.0.1) unless the figure names a path. The ratio compares the figure with its",
        "baseline as the module defines it (stated in the goal); a goal is met when every",
        "comparison in it holds.",
        "Benchmarks report speed, they never fail on it. Numbers from a shared or busy",
        "machine are noisy: compare ratios, not absolute values, across machines.",
        "",
        "## Results",
        "",
        _goal_summary(rows),
        "",
        "| Benchmark | Figure | Value | Spread (min-max) | Unit | Baseline | Baseline value"
        " | Ratio | Goal | Met? |",
        "|---|---|--:|--:|---|---|--:|--:|---|:-:|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(
                f"| {_cell(row.get('module', '?'))} | {_cell(row.get('name', '?'))} | ERROR"
                " | — | — | — | — | — | see Errors | — |"
            )
            continue
        spread = _spread_cell(row)
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    row.get("module", "?"),
                    row.get("name", "?"),
                    format_number(row.get("value")),
                    spread,
                    row.get("unit", ""),
                    row.get("baseline") or "—",
                    format_number(row.get("baseline_value")),
                    format_number(row.get("ratio")),
                    row.get("goal", "") or "—",
                    _met_cell(row.get("met")),
                )
            )
            + " |"
        )
    if not rows:
        lines.append("| — | no results | | | | | | | | |")
    lines.append("")
    if chart is not None:
        lines += [
            "## Ratios to baseline",
            "",
            f"![Ratio of each figure to its baseline]({chart})",
            "",
            "Green: goal met; red: goal missed; grey: no checkable goal. The black tick on a"
            " bar is its ratio goal; the dashed line is parity with the baseline (1.0).",
            "",
        ]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["## Errors", ""]
        for row in errors:
            lines.append(f"- **{_cell(row.get('name', '?'))}**: {_cell(row.get('error'))}")
        lines.append("")
    if modules:
        lines += [
            "## Benchmark modules",
            "",
            "| Module | Status | Rows | Wall time (s) |",
            "|---|---|--:|--:|",
        ]
        for mod in modules:
            lines.append(
                f"| `bench/{_cell(mod.get('module', '?'))}.py` | {_cell(mod.get('status', '?'))}"
                f" | {_cell(mod.get('rows', 0))} | {format_number(mod.get('seconds'))} |"
            )
        lines.append("")
    described = [m for m in modules if isinstance(m.get("about"), str) and m.get("about")]
    if described:
        lines += ["## What each benchmark measures", ""]
        lines.append("_From each module's docstring._")
        lines.append("")
        for mod in described:
            lines += [f"### `bench/{mod.get('module', '?')}.py`", "", _rst_to_md(mod["about"]), ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    labels = (
        ("cpu_count", "CPUs"),
        ("cpu_model", "CPU model"),
        ("platform", "OS"),
        ("python", "Python"),
        ("qh3", "qh3"),
        ("aioquic", "aioquic"),
        ("cryptography", "cryptography"),
        ("openssh", "OpenSSH"),
        ("matplotlib", "matplotlib"),
        ("git", "Commit"),
        ("loadavg_at_start", "Load average at start (1/5/15 min)"),
    )
    for key, label in labels:
        if key in machine:
            value = machine[key]
            if isinstance(value, list):
                value = " / ".join(str(v) for v in value)
            lines.append(f"| {label} | {_cell(value if value is not None else '—')} |")
    lines.append("")
    return "\n".join(lines)


def _chart_label(row: Mapping[str, Any], limit: int = 70) -> str:
    module, name = str(row.get("module", "?")), str(row.get("name", "?"))
    text = name if name.lower().startswith(module.lower()) else f"{module}: {name}"
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


_LOG_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


def render_chart(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> int:
    """Draw a horizontal bar chart of every row's ratio to ``path`` (PNG, Agg backend).

    The x axis is logarithmic and every bar starts at parity (1.0): a bar to the right
    is ahead of its baseline, to the left behind it, and "half as fast" looks as big as
    "twice as fast" -- the ratios in this project span from ~0.01 (a figure against a
    raw ceiling) to ~20 (latency against ``ssh -R``), which a linear axis cannot show.
    Rows without a positive finite ratio are left out (they are in the table).  A row's
    ratio goal, if any, is drawn as a black tick across its bar.  Returns the bar count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
    from matplotlib.transforms import ScaledTranslation

    plotted = [
        r
        for r in rows
        if not r.get("error")
        and isinstance(r.get("ratio"), int | float)
        and not isinstance(r.get("ratio"), bool)
        and math.isfinite(float(r["ratio"]))
        and float(r["ratio"]) > 0
    ]
    height = max(2.5, 0.32 * len(plotted) + 1.6)
    fig, ax = plt.subplots(figsize=(10.0, height), dpi=100)
    try:
        if not plotted:
            ax.text(0.5, 0.5, "no figure with a baseline ratio", ha="center", va="center")
            ax.set_axis_off()
        else:
            ratios = [float(r["ratio"]) for r in plotted]
            colors = [
                "#2e7d32"
                if r.get("met") is True
                else "#c62828"
                if r.get("met") is False
                else "#9e9e9e"
                for r in plotted
            ]
            ys = list(range(len(plotted)))[::-1]
            ax.set_xscale("log")
            ax.barh(ys, [x - 1.0 for x in ratios], left=1.0, color=colors, height=0.6)
            extent = [*ratios, 1.0]
            for y, r, ratio in zip(ys, plotted, ratios, strict=True):
                check = ratio_goal(r)
                if check is not None and check.threshold > 0:
                    ax.plot([check.threshold] * 2, [y - 0.42, y + 0.42], color="black", lw=2)
                    extent.append(check.threshold)
                ahead = ratio >= 1.0
                ax.text(
                    ratio,
                    y,
                    f" {format_number(ratio)} " if ahead else f"{format_number(ratio)} ",
                    va="center",
                    ha="left" if ahead else "right",
                    fontsize=7,
                )
            ax.axvline(1.0, color="#555555", ls="--", lw=1)
            lo, hi = min(extent) / 2.5, max(extent) * 2.5
            ax.set_xlim(lo, hi)
            ticks = [t for t in _LOG_TICKS if lo <= t <= hi]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=8)
            ax.set_yticks(ys)
            ax.set_yticklabels([_chart_label(r) for r in plotted], fontsize=7)
            ax.set_ylim(-0.7, len(plotted) - 0.3)
            ax.grid(axis="x", color="#dddddd", lw=0.5)
            ax.set_axisbelow(True)
            ax.set_xlabel(
                "ratio to baseline in the same run (log scale; > 1 = ahead of the baseline "
                "as each goal defines it)",
                fontsize=8,
            )
            ax.legend(
                handles=[
                    Patch(color="#2e7d32", label="goal met"),
                    Patch(color="#c62828", label="goal missed"),
                    Patch(color="#9e9e9e", label="no checkable goal"),
                    Line2D([], [], color="black", lw=2, label="ratio goal"),
                    Line2D([], [], color="#555555", ls="--", lw=1, label="parity (1.0)"),
                ],
                fontsize=7,
                loc="upper center",
                bbox_to_anchor=(0.5, 0.0),
                # Below the axis label, at a fixed distance whatever the chart's height.
                bbox_transform=ax.transAxes + ScaledTranslation(0, -0.45, fig.dpi_scale_trans),
                ncol=5,
                frameon=False,
            )
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return len(plotted)


def write_report(
    result: Mapping[str, Any],
    *,
    json_path: Path | None,
    md_path: Path | None = None,
    png_path: Path | None = None,
) -> None:
    """Write the result document as JSON, and optionally the markdown page and the chart.

    Files are written to a temporary name and renamed into place, so an interrupted run
    never leaves a half-written result.
    """
    import json

    if json_path is not None:
        _atomic_write(
            json_path,
            json.dumps(sanitize_for_json(result), indent=2, allow_nan=False) + "\n",
        )
    chart_rel: str | None = None
    if png_path is not None:
        tmp = png_path.with_name(png_path.name + ".tmp")
        render_chart(
            list(result.get("rows", [])),
            tmp,
            title=f"quic-reverse benchmarks — {result.get('generated_utc', '')}",
        )
        os.replace(tmp, png_path)
        if md_path is not None:
            chart_rel = os.path.relpath(png_path, md_path.parent)
    if md_path is not None:
        _atomic_write(md_path, render_markdown(result, chart=chart_rel))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
