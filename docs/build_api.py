"""Build the API reference (HTML) from the docstrings: ``make docs``.

::

    python -W error docs/build_api.py [OUTPUT_DIR]     # default: build/api

Uses pdoc (the ``docs`` extra). The docstrings are written for Sphinx-style reading
(``:class:`~quic_reverse.Stream```, ``Raises:`` sections); before pdoc renders them,
the cross-reference roles become backticked dotted names, which pdoc turns into links.
Run with ``-W error`` (as ``make docs`` does) so that any warning pdoc raises (a
module that fails to import, an annotation it cannot resolve) fails the build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pdoc
import pdoc.docstrings
import pdoc.render

#: The public modules, in the order of the index page.
MODULES = [
    "quic_reverse",
    "quic_reverse.session",
    "quic_reverse.stream",
    "quic_reverse.errors",
    "quic_reverse.config",
    "quic_reverse.events",
    "quic_reverse.adapters",
    "quic_reverse.reconnect",
    "quic_reverse.transport.quic",
    "quic_reverse.transport.base",
    "quic_reverse.transport.memory",
    "quic_reverse.transport.tls",
    "quic_reverse.tunnel.api",
    "quic_reverse.tunnel.config",
    "quic_reverse.wire",
]

# :class:`~a.b.C`, :meth:`text <a.b.C.m>`, :mod:`a.b` ... -> `a.b.C` (pdoc links it).
_ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj):`(?:[^`<]*<)?~?([^`>]+)>?`")


def _roles_to_links(docstring: str) -> str:
    return _ROLE.sub(r"`\1`", docstring)


def main(argv: list[str]) -> int:
    output = Path(argv[1]) if len(argv) > 1 else Path("build/api")
    convert = pdoc.docstrings.convert

    def convert_with_roles(docstring: str, docformat: str, source_file: Path | None) -> str:
        return convert(_roles_to_links(docstring), docformat, source_file)

    pdoc.docstrings.convert = convert_with_roles  # type: ignore[assignment]
    pdoc.render.configure(docformat="google", show_source=False, search=True)
    pdoc.pdoc(*MODULES, output_directory=output)
    pages = sorted(output.rglob("*.html"))
    print(f"API reference: {len(pages)} pages in {output}/ (open {output / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
