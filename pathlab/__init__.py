"""The path lab: two network namespaces joined by an emulated path.

``Lab`` makes two namespaces, ``relay_ns`` (address 10.99.0.1) and ``edge_ns``
(10.99.0.2), and joins them either by

* a **delay line** (default): ``pathlab-line`` (C, ``pathlab-line.c`` beside this file,
  compiled on first use into ``~/.cache/quic-reverse/pathlab-<sha>/``) bridges one TUN
  device in each namespace and applies, per direction, a fixed delay plus optional
  jitter, seeded random loss (Bernoulli or Gilbert-Elliott bursts), a token-bucket rate
  limit, a path MTU (bigger packets dropped silently, no ICMP) and a partition switch
  that drops everything (also what is queued); or
* a **veth pair** (``emulate=False``): the kernel's link, no emulation; a partition sets
  both ends down (senders see "network unreachable", not silence).

The kernel of these machines has no ``sch_netem``, hence the user-space line. Everything
the lab creates is deleted on exit, also after an exception; the namespace names carry
the pid and a random suffix, so parallel runs never collide, and namespaces left by a
killed run (dead pid) are removed by the next :class:`Lab`.

Example::

    with Lab(delay_ms=25, loss=0.01, mtu=1500, seed=1) as lab:
        server = lab.popen(lab.edge_ns, ["python3", "-m", "http.server", "8000"])
        lab.run(lab.relay_ns, ["curl", "-s", f"http://{lab.edge_ns.address}:8000/"])
        lab.partition()
        lab.heal()
        lab.set(loss=0.05, direction="to_edge")

Root (CAP_NET_ADMIN and CAP_SYS_ADMIN) is required; :func:`available` says whether
this process can build a lab, and why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypedDict, Unpack

__all__ = [
    "EDGE_ADDRESS",
    "RELAY_ADDRESS",
    "Direction",
    "Lab",
    "LabError",
    "LinkSettings",
    "Namespace",
    "Settings",
    "available",
    "build_line",
    "cleanup_stale",
    "lab_namespaces",
]

#: Address of the relay side (inside ``Lab.relay_ns``).
RELAY_ADDRESS = "10.99.0.1"
#: Address of the edge side (inside ``Lab.edge_ns``).
EDGE_ADDRESS = "10.99.0.2"

#: ``to_edge``: packets from relay_ns to edge_ns; ``to_relay``: the other way.
Direction = Literal["both", "to_edge", "to_relay"]

_SOURCE = Path(__file__).with_name("pathlab-line.c")
_CFLAGS = ("-O2", "-Wall", "-pthread")
_NETNS_DIR = Path("/run/netns")
_PREFIX = "pathlab-"
_NAME_RE = re.compile(r"^pathlab-(\d+)-[0-9a-f]+-(relay|edge)$")
_CLONE_NEWNET = 0x40000000
_IFACE = {"relay": "plr", "edge": "ple"}
#: Bound for one control command or one ``ip`` call (seconds).
_COMMAND_TIMEOUT = 10.0


class LabError(RuntimeError):
    """The lab cannot be built or used (not root, ``ip`` failed, the line died...)."""


@dataclass(frozen=True)
class Namespace:
    """One side of the lab: the namespace name, its address and its interface."""

    name: str
    address: str
    ifname: str

    @property
    def path(self) -> str:
        """The namespace file, for ``setns``/``nsenter``."""
        return str(_NETNS_DIR / self.name)


@dataclass(frozen=True)
class LinkSettings:
    """What the delay line does to packets in one direction.

    ``delay_ms`` fixed one-way delay; ``jitter_ms`` extra delay uniform in
    ``[0, jitter_ms]`` (never reorders); ``loss`` Bernoulli loss probability;
    ``ge_p``/``ge_r`` Gilbert-Elliott transition probabilities per packet (good->bad,
    bad->good; when ``ge_p > 0`` this model replaces ``loss``) with loss probabilities
    ``ge_bad_loss``/``ge_good_loss`` in each state; ``rate_mbit`` token-bucket limit
    (0: none) with depth ``burst_bytes`` (0: 1 ms at the rate, at least 64 KiB);
    ``path_mtu`` IP packets longer than this are dropped silently (0: none);
    ``limit`` queue length in packets (tail drop).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    ge_p: float = 0.0
    ge_r: float = 0.0
    ge_bad_loss: float = 1.0
    ge_good_loss: float = 0.0
    rate_mbit: float = 0.0
    burst_bytes: int = 0
    path_mtu: int = 0
    limit: int = 10000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name}: expected a number >= 0, got {value!r}")
        for name in ("loss", "ge_p", "ge_r", "ge_bad_loss", "ge_good_loss"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}: a probability must be in [0, 1]")
        if self.limit < 1:
            raise ValueError("limit: at least one packet")

    def line_items(self, prefix: str = "") -> list[str]:
        """The settings as ``pathlab-line`` ``KEY=VALUE`` items."""
        out = []
        for f in dataclasses.fields(self):
            key = "mtu" if f.name == "path_mtu" else f.name
            out.append(f"{prefix}{key}={getattr(self, f.name)!r}")
        return out


class Settings(TypedDict, total=False):
    """The :class:`LinkSettings` fields as keyword arguments of :class:`Lab` and
    :meth:`Lab.set`."""

    delay_ms: float
    jitter_ms: float
    loss: float
    ge_p: float
    ge_r: float
    ge_bad_loss: float
    ge_good_loss: float
    rate_mbit: float
    burst_bytes: int
    path_mtu: int
    limit: int


def available() -> str | None:
    """``None`` if this process can build a lab, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the path lab needs root (network namespaces, TUN devices)"
    for tool in ("ip", "gcc"):
        if shutil.which(tool) is None:
            return f"the path lab needs {tool!r} on PATH"
    if not os.path.exists("/dev/net/tun"):
        return "the path lab needs /dev/net/tun"
    return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quic-reverse"


def build_line() -> Path:
    """Compile ``pathlab-line.c`` (once per source version) and return the binary.

    The binary lives in ``~/.cache/quic-reverse/pathlab-<sha256 of source+flags>/``,
    outside the checkout; a changed source gets a new directory. Concurrent builds are
    safe (each compiles to a temporary name, then renames).
    """
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_CFLAGS).encode()).hexdigest()[:16]
    target = _cache_root() / f"pathlab-{digest}" / "pathlab-line"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-")
    os.close(fd)
    try:
        done = subprocess.run(
            ["gcc", *_CFLAGS, "-o", tmp, str(_SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"cannot compile {_SOURCE.name}:\n{done.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _delete_namespace(name: str) -> None:
    """Kill what runs in namespace ``name`` (bounded), then delete it."""
    if not (_NETNS_DIR / name).exists():
        return
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + _COMMAND_TIMEOUT
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if p.isdigit() and _pid_alive(int(p))]
        if pids:
            time.sleep(0.01)
    _ip("netns", "del", name, check=False)


def cleanup_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone; return their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(_NETNS_DIR)):
            m = _NAME_RE.match(entry)
            if m and not _pid_alive(int(m.group(1))):
                _delete_namespace(entry)
                removed.append(entry)
    return removed


def lab_namespaces() -> list[str]:
    """Names of every lab namespace that exists now (of any process)."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(_NETNS_DIR) if n.startswith(_PREFIX))
    return []


_libc = ctypes.CDLL(None, use_errno=True)


def _in_namespace(ns: Namespace, make: Any) -> Any:
    """Run ``make()`` in a fresh thread that has entered ``ns`` (sockets made there stay
    in ``ns``); the calling thread's namespace is never touched."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns.name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"setns {ns.name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class Lab:
    """Two namespaces joined by an emulated path; a context manager.

    Keyword arguments are the :class:`LinkSettings` for both directions (``delay_ms``,
    ``loss``...), plus ``mtu`` (the interfaces' MTU, default 1500), ``seed`` (loss
    generators), ``emulate`` (``False``: a plain veth pair, no line) and
    ``tcp_buffer_max`` (bytes: raise the namespaces' ``tcp_rmem``/``tcp_wmem`` maximum,
    so one TCP connection can fill a long fat path; default: the kernel's, here a 4 MiB
    send buffer).
    """

    def __init__(
        self,
        *,
        mtu: int = 1500,
        seed: int = 1,
        emulate: bool = True,
        tcp_buffer_max: int | None = None,
        **settings: Unpack[Settings],
    ) -> None:
        if not 576 <= mtu <= 65535:
            raise ValueError(f"mtu: expected 576..65535, got {mtu!r}")
        if not emulate and any(v for v in settings.values()):
            raise ValueError("a veth lab (emulate=False) takes no delay/loss settings")
        self.mtu = mtu
        self.seed = seed
        self.emulate = emulate
        self.tcp_buffer_max = tcp_buffer_max
        self.settings = LinkSettings(**settings)
        tag = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.relay_ns = Namespace(f"{tag}-relay", RELAY_ADDRESS, _IFACE["relay"])
        self.edge_ns = Namespace(f"{tag}-edge", EDGE_ADDRESS, _IFACE["edge"])
        self._line: subprocess.Popen[bytes] | None = None
        self._line_err: IO[bytes] | None = None
        self._buffer = b""
        self._control = threading.Lock()
        self._procs: list[subprocess.Popen[Any]] = []
        self._partitioned = False
        self._entered = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        reason = available()
        if reason is not None:
            raise LabError(reason)
        cleanup_stale()
        self._entered = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.relay_ns, self.edge_ns):
            _ip("netns", "add", ns.name)
            _ip("-n", ns.name, "link", "set", "lo", "up")
            if self.tcp_buffer_max is not None:
                n = int(self.tcp_buffer_max)
                rmem = f"net.ipv4.tcp_rmem=4096 131072 {n}"
                wmem = f"net.ipv4.tcp_wmem=4096 16384 {n}"
                _ip("netns", "exec", ns.name, "sysctl", "-q", "-w", rmem, wmem)
        if self.emulate:
            binary = build_line()
            self._line_err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
            self._line = subprocess.Popen(
                [
                    str(binary),
                    self.relay_ns.path,
                    self.relay_ns.ifname,
                    self.edge_ns.path,
                    self.edge_ns.ifname,
                    f"seed={self.seed}",
                    f"max_packet={self.mtu}",
                    *self.settings.line_items(),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._line_err,
            )
            self._expect("ready")
        else:
            _ip(
                "-n", self.relay_ns.name, "link", "add", "name", self.relay_ns.ifname,
                "type", "veth", "peer", "name", self.edge_ns.ifname, "netns", self.edge_ns.name,
            )  # fmt: skip
        for ns, peer in ((self.relay_ns, self.edge_ns), (self.edge_ns, self.relay_ns)):
            if self.emulate:
                _ip("-n", ns.name, "addr", "add", f"{ns.address}/32", "peer",
                    f"{peer.address}/32", "dev", ns.ifname)  # fmt: skip
            else:
                _ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", ns.ifname)
            # No IPv6 on the lab link: no router/neighbour chatter consuming the seeded
            # loss sequence, so a seed gives the same pattern for the same traffic.
            _ip("netns", "exec", ns.name, "sysctl", "-q", "-w",
                f"net.ipv6.conf.{ns.ifname}.disable_ipv6=1")  # fmt: skip
            _ip("-n", ns.name, "link", "set", ns.ifname, "mtu", str(self.mtu),
                "txqueuelen", "10000", "up")  # fmt: skip

    def close(self) -> None:
        """Stop every process the lab started, the line, and delete the namespaces.
        Idempotent; also called by ``__exit__``."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its group, if it leads one
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_COMMAND_TIMEOUT)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self._procs.clear()
        if self._line is not None:
            line, self._line = self._line, None
            with contextlib.suppress(OSError):
                assert line.stdin is not None
                line.stdin.close()
            try:
                line.wait(_COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                line.kill()
                line.wait(_COMMAND_TIMEOUT)
            if line.stdout is not None:
                line.stdout.close()
        if self._line_err is not None:
            self._line_err.close()
            self._line_err = None
        if self._entered:
            for ns in (self.relay_ns, self.edge_ns):
                _delete_namespace(ns.name)
            self._entered = False

    # ------------------------------------------------------------------ processes

    def command(self, ns: Namespace, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``ns`` (``ip netns exec NAME ...``)."""
        return ["ip", "netns", "exec", ns.name, *argv]

    def run(
        self, ns: Namespace, argv: Sequence[str], *, timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``ns`` to completion (``subprocess.run`` keywords pass on;
        killed after ``timeout`` seconds)."""
        return subprocess.run(self.command(ns, argv), timeout=timeout, check=False, **kwargs)

    def popen(self, ns: Namespace, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns`` (in its own process group); the lab kills it on
        exit if it is still running."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(ns, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def socket(
        self,
        ns: Namespace,
        family: socket.AddressFamily = socket.AF_INET,
        kind: socket.SocketKind = socket.SOCK_STREAM,
        *,
        count: int = 1,
    ) -> list[socket.socket]:
        """``count`` sockets created inside ``ns`` (for clients in this process:
        ``connect`` them to addresses of that namespace). The caller closes them."""

        def make() -> list[socket.socket]:
            out: list[socket.socket] = []
            try:
                for _ in range(count):
                    out.append(socket.socket(family, kind))
            except BaseException:
                for s in out:
                    s.close()
                raise
            return out

        made: list[socket.socket] = _in_namespace(ns, make)
        return made

    # ------------------------------------------------------------------ the path

    def partition(self) -> None:
        """Drop every packet both ways (silently with the line: also what is queued;
        with veth: both ends set down). Returns once it is in effect."""
        if self.emulate:
            self._send("partition on")
        else:
            for ns in (self.relay_ns, self.edge_ns):
                _ip("-n", ns.name, "link", "set", ns.ifname, "down")
        self._partitioned = True

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        if self.emulate:
            self._send("partition off")
        else:
            for ns in (self.relay_ns, self.edge_ns):
                _ip("-n", ns.name, "link", "set", ns.ifname, "up")
        self._partitioned = False

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def set(self, *, direction: Direction = "both", **changes: Unpack[Settings]) -> None:
        """Change :class:`LinkSettings` fields at run time, for one direction or both
        (``lab.set(loss=0.05)``, ``lab.set(delay_ms=100, direction="to_relay")``)."""
        if not self.emulate:
            raise LabError("a veth lab has no delay line to configure")
        if direction not in ("both", "to_edge", "to_relay"):
            raise ValueError(f"direction: expected both, to_edge or to_relay, got {direction!r}")
        if changes.get("limit", 0) > self.settings.limit:
            raise ValueError(f"limit: at most the initial {self.settings.limit} packets")
        checked = dataclasses.replace(self.settings, **changes)  # validates
        prefix = {"both": "", "to_edge": "a2b.", "to_relay": "b2a."}[direction]
        items = [
            f"{prefix}{'mtu' if key == 'path_mtu' else key}={getattr(checked, key)!r}"
            for key in changes
        ]
        if direction == "both":
            self.settings = checked
        if items:
            self._send("set " + " ".join(items))

    def stats(self) -> dict[str, dict[str, int]]:
        """Packet counters per direction (``to_edge``/``to_relay``): ``rx``, ``tx``,
        ``bytes`` delivered, and drops by cause ``loss``, ``partition``, ``mtu``,
        ``queue``."""
        if not self.emulate:
            raise LabError("a veth lab has no delay line")
        reply = self._send("stats", expect="stats ")
        out: dict[str, dict[str, int]] = {}
        current: dict[str, int] = {}
        for token in reply.split()[1:]:
            if "=" not in token:
                current = out.setdefault({"a2b": "to_edge", "b2a": "to_relay"}[token], {})
            else:
                key, value = token.split("=", 1)
                current[key] = int(value)
        return out

    @property
    def line_pid(self) -> int | None:
        """Pid of the delay line (SIGUSR1 partitions, SIGUSR2 heals), if any."""
        return self._line.pid if self._line is not None else None

    # ------------------------------------------------------------------ line control

    def _send(self, command: str, *, expect: str = "ok") -> str:
        with self._control:
            line = self._line
            if line is None or line.stdin is None:
                raise LabError("the delay line is not running")
            try:
                line.stdin.write(command.encode() + b"\n")
                line.stdin.flush()
            except OSError as exc:
                raise LabError(f"the delay line is gone: {exc}; {self._line_stderr()}") from exc
            reply = self._expect(expect)
            return reply

    def _expect(self, prefix: str) -> str:
        reply = self._readline()
        if not reply.startswith(prefix):
            raise LabError(f"delay line: expected {prefix!r}, got {reply!r}")
        return reply

    def _readline(self) -> str:
        line = self._line
        assert line is not None and line.stdout is not None
        fd = line.stdout.fileno()
        deadline = time.monotonic() + _COMMAND_TIMEOUT
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(f"delay line: no answer within {_COMMAND_TIMEOUT:.0f}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise LabError(f"delay line exited: {self._line_stderr()}")
                self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\n")
        return text.decode(errors="replace")

    def _line_stderr(self) -> str:
        if self._line_err is None:
            return ""
        self._line_err.seek(0)
        return self._line_err.read().decode(errors="replace").strip()
