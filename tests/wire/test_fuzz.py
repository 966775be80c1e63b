"""A short run of the wire fuzzer (the million-input campaign is ``make fuzz``)."""

from __future__ import annotations

import random

from tests import fuzz_wire


def test_short_fuzz_run_keeps_the_contract() -> None:
    report = fuzz_wire.run(5000, seed=7)
    assert report.failures == []
    assert report.inputs == 5000
    # The mutations reach both outcomes of every decoder, not only early rejections.
    assert report.decoded > 100 and report.decode_rejected > 1000
    assert report.frames > 100 and report.frame_rejected > 100
    assert report.binds > 0 and report.bind_rejected > 0


def test_fuzzer_flags_foreign_exceptions() -> None:
    report = fuzz_wire.Report()

    def broken() -> object:
        raise ValueError("leaked")

    fuzz_wire._guard(report, "decode", b"\x01", broken)
    assert len(report.failures) == 1 and "ValueError" in report.failures[0]


def test_mutations_are_deterministic_and_varied() -> None:
    corpus = fuzz_wire.seed_corpus()
    first = [fuzz_wire.mutate(random.Random(3), c, corpus) for c in corpus[:50]]
    again = [fuzz_wire.mutate(random.Random(3), c, corpus) for c in corpus[:50]]
    assert first == again
    assert sum(a != b for a, b in zip(first, corpus[:50], strict=True)) > 40


def test_main_exit_code() -> None:
    assert fuzz_wire.main(["--count", "200", "--seed", "3"]) == 0
