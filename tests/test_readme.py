"""The README tells the truth: its code runs, its commands exist, its tables match the code.

* Every ``python`` block compiles; the ``server.py``/``client.py`` pair is extracted and
  run as real subprocesses over QUIC on 127.0.0.1 (on a free port).
* The quick start is exactly ``make demo`` and ``make test``; ``make demo`` runs
  ``examples/demo.py`` (run for real in ``tests/examples``); CI (``.ci/run``) runs
  ``make test``.
* The configuration table lists every ``Config`` field with its real default.
* The tunnel commands are the ones ``docs/TUNNEL.md`` documents.
* Every relative link points to a file that exists.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quic_reverse import Config

from .examples._proc import free_udp_port, start_process

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme() -> str:
    """The README's text."""
    return README.read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    return [body for lang, body in FENCE.findall(readme()) if lang == language]


def section(title: str) -> str:
    """The text of the README section ``## title`` (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme(), re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def snippet(first_line_prefix: str) -> str:
    """The python block whose first line starts with ``first_line_prefix``."""
    found = [b for b in blocks("python") if b.startswith(first_line_prefix)]
    assert len(found) == 1, f"expected one python block starting with {first_line_prefix!r}"
    return found[0]


def test_python_blocks_compile() -> None:
    """Every python block is valid Python (fragments may use top-level ``await``)."""
    python = blocks("python")
    assert len(python) >= 4
    for index, body in enumerate(python):
        compile(body, f"README.md python block {index}", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_server_and_client_snippets_run(tmp_path: Path) -> None:
    """The README's server.py and client.py, copied verbatim, print HELLO WORLD."""
    port = free_udp_port()
    sources = {}
    for name in ("server.py", "client.py"):
        body = snippet(f"# {name}:")
        assert body.count("PORT = 4433\n") == 1
        sources[name] = body.replace("PORT = 4433\n", f"PORT = {port}\n")
        (tmp_path / name).write_text(sources[name], encoding="utf-8")

    server = start_process([sys.executable, "server.py"], cwd=tmp_path)
    try:
        assert server.port == port
        client = subprocess.run(
            [sys.executable, "client.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout == "HELLO WORLD\n"
        status, _, err = server.stop()  # Ctrl-C: the snippet exits quietly
        assert status == 0, err
    finally:
        server.kill()


def make_dry_run(target: str) -> list[str]:
    """The commands ``make <target>`` would run, without running them (``make -n``)."""
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def test_quick_start_is_make_demo_and_make_test() -> None:
    """The two quick-start commands, what they run, and that CI runs the test command."""
    quick = section("Quick start")
    commands = [
        line.split("#")[0].strip()
        for body in FENCE.findall(quick)
        if body[0] == "sh"
        for line in body[1].splitlines()
    ]
    assert commands[:2] == ["make demo", "make test"]

    # What make would run (dry run: nothing is executed, the venv is never touched).
    # The last commands are the targets' own; any before them set up .venv/.
    demo = make_dry_run("demo")
    assert demo[-1] == ".venv/bin/python examples/demo.py"  # run for real in tests/examples
    test = make_dry_run("test")
    assert [line.split()[-1] for line in test[-4:]] == ["bench", "bench", "mypy", "pytest"]
    assert "-m ruff check" in test[-4] and "-m ruff format --check" in test[-3]

    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
    assert (ROOT / "examples" / "demo.py").is_file()


def test_configuration_table_matches_config() -> None:
    """Every Config field is in the table, with its actual default."""
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section("Configuration"), re.MULTILINE)
    table = dict(rows)
    defaults = Config()
    fields = [f.name for f in dataclasses.fields(Config)]
    assert sorted(table) == sorted(fields)
    for name in fields:
        actual = getattr(defaults, name)
        text = table[name]
        if name == "features":
            assert text == f"Features({int(actual)})"
        else:
            assert ast.literal_eval(text) == actual, name


def shell_commands(text: str) -> list[str]:
    """The ``quic-reverse ...`` commands in ``text``'s sh blocks, continuations joined."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang != "sh":
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = " ".join(line.split("#")[0].split())
            if line.startswith("quic-reverse "):
                commands.append(line)
    return commands


def test_tunnel_commands_match_tunnel_doc() -> None:
    """The README's tunnel commands are exactly commands that docs/TUNNEL.md documents."""
    documented = shell_commands((ROOT / "docs" / "TUNNEL.md").read_text(encoding="utf-8"))
    commands = shell_commands(section("The tunnel tool"))
    assert any(c.startswith("quic-reverse relay ") for c in commands), commands
    assert any(c.startswith("quic-reverse edge ") for c in commands), commands
    for command in commands:
        assert command in documented, f"README tunnel command not in docs/TUNNEL.md: {command}"


@pytest.mark.parametrize("doc", ["README.md", "examples/README.md", "docs/ARCHITECTURE.md"])
def test_relative_links_exist(doc: str) -> None:
    """Every relative link in the document points to an existing file."""
    path = ROOT / doc
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    relative = [target for target in links if not re.match(r"^[a-z]+://", target)]
    assert relative, f"{doc}: no relative links found (is the pattern still right?)"
    for target in relative:
        assert (path.parent / target).exists(), f"{doc} links to missing {target}"
