"""Fault tests run only where a path lab can be built (root, ``ip``, gcc, /dev/net/tun);
elsewhere they are skipped with the reason (CI runs them as root)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pathlab
import pytest
from pathlab import Lab, lab_namespaces

from ._world import World, make_world

_REASON = pathlab.available()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _REASON is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=f"path lab unavailable: {_REASON}"))


@contextmanager
def lab_world(tmp: Path, names: tuple[str, ...] = ("edgeA",), **lab: Any) -> Iterator[World]:
    """A lab plus the local services; every process and namespace is gone afterwards."""
    with Lab(**lab) as the_lab:
        names_made = (the_lab.relay_ns.name, the_lab.edge_ns.name)
        world = make_world(the_lab, tmp, names)
        try:
            yield world
        finally:
            world.close()
    left = [n for n in names_made if n in lab_namespaces()]
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A lab joined by the delay line with no delay or loss (partitions drop silently)."""
    with lab_world(tmp_path) as w:
        yield w
