"""Property-based fuzzing (hypothesis) of every input cxrloc parses, with a small example budget.

The only outcomes allowed: success, or one clear CxrlocError line; never another exception (a
traceback), never a partial output (``tests/fuzzing.py`` says what each target does).
``bench/fuzz_long.py`` runs the same targets for thousands of cases (docs/bad_input.md).
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="the fuzzer needs hypothesis (pip install -e '.[dev]')")

import fuzzing  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SMALL = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
"""25 cases per target, the same ones every run (derandomize): the suite stays fast and repeatable."""


@SMALL
@given(entry=fuzzing.data_entry(), boxes=fuzzing.bbox_list())
def test_fuzz_nih_tables(entry: bytes, boxes: bytes) -> None:
    fuzzing.run_nih(entry, boxes)


@SMALL
@given(labels=fuzzing.labels_table(), boxes=fuzzing.box_table())
def test_fuzz_box_tables(labels: bytes, boxes: bytes) -> None:
    fuzzing.run_table(labels, boxes)


@SMALL
@given(coco=fuzzing.coco_file())
def test_fuzz_coco_files(coco: bytes) -> None:
    fuzzing.run_coco(coco)


@settings(SMALL, max_examples=40)
@given(case=fuzzing.image_file())
def test_fuzz_image_headers(case: tuple[str, bytes]) -> None:
    fuzzing.run_image(*case)


@settings(SMALL, max_examples=40)
@given(items=st.lists(fuzzing.set_item(), min_size=1, max_size=3))
def test_fuzz_set_values(items: list[str]) -> None:
    fuzzing.run_set(items)


def test_the_seeds_are_valid_inputs() -> None:
    """The unmutated seeds succeed, so the fuzzer explores near valid files, not only garbage."""
    for kind, suffix in (("png", ".png"), ("jpeg", ".jpg"), ("dicom", ".dcm")):
        assert fuzzing.run_image(suffix, fuzzing._seed(kind)) == "ok"
    assert fuzzing.run_set(["lr=0.01", "epochs=2"]) == "ok"
    entry = ("Image Index,Finding Labels,Follow-up #,Patient ID\n"
             + "".join(f"{n},Mass,0,{n[7]}\n" for n in fuzzing.IMAGE_NAMES)).encode()
    boxes = ("Image Index,Finding Label,x,y,w,h\n"
             + "".join(f"{n},Mass,100,100,300,300\n" for n in fuzzing.IMAGE_NAMES)).encode()
    assert fuzzing.run_nih(entry, boxes) == "ok"


def test_what_the_long_run_found_stays_fixed() -> None:
    """bench/fuzz_long.py found two messages of two lines: pandas' parser error (it ends in a
    newline) and a --set item holding a newline echoed as it was."""
    assert fuzzing.run_set(["\n"]) == "refused" and fuzzing.run_set(["a\nb=1"]) == "refused"
    ragged = b"Image Index,Finding Labels,Follow-up #,Patient ID\n00000001_000.png,Mass,0,1\n" + b"a,b,c,d,e,f,g\n" * 3
    assert fuzzing.run_nih(ragged, b"") == "refused"
