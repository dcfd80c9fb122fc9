"""Patient-grouped folds on the real NIH tables, checked by independent set computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrloc.data.nih import read_bbox_list, read_data_entry
from cxrloc.data.splits import check_splits, dumps_splits, make_splits, sample_unannotated
from cxrloc.utils import CxrlocError

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih"


@pytest.fixture(scope="module")
def real_tables() -> tuple[dict[str, int], dict[str, int]]:
    if not (NIH / "Data_Entry_2017.csv").exists():
        pytest.skip("shared data ../shared/data/nih not present")
    df = read_data_entry(NIH / "Data_Entry_2017.csv")
    boxed = set(read_bbox_list(NIH / "BBox_List_2017.csv").boxes)
    patient = dict(zip(df["image_id"], df["patient_id"].astype(int), strict=True))
    annotated = {i: p for i, p in patient.items() if i in boxed}
    # Every other listed image plays the unannotated pool (real patient structure, 111k images).
    unannotated = {i: p for i, p in patient.items() if i not in boxed}
    return annotated, unannotated


def _splits(tables: tuple[dict[str, int], dict[str, int]], seed: int, fraction: float) -> dict:
    annotated, unannotated = tables
    pool_ids = sample_unannotated(unannotated, fraction, seed)
    return make_splits(
        annotated, {i: unannotated[i] for i in pool_ids}, folds=5, seed=seed, unannotated_fraction=fraction
    )


def test_real_folds_partition_and_patients(real_tables: tuple[dict[str, int], dict[str, int]]) -> None:
    annotated, unannotated = real_tables
    assert len(annotated) == 704
    s = _splits(real_tables, 0, 0.1)
    patient = {**annotated, **unannotated}
    tests = [f["test"] for f in s["folds"]]
    flat = [i for t in tests for i in t]
    assert len(flat) == len(set(flat)) == 704 and set(flat) == set(annotated)
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= max(sum(1 for p in annotated.values() if p == q) for q in annotated.values())
    pool = set().union(*(f["train_unannotated"] for f in s["folds"]))
    assert len(pool) == round(0.1 * len(unannotated)) and pool <= set(unannotated)
    for f in s["folds"]:
        test_patients = {patient[i] for i in f["test"]}
        assert set(f["train_annotated"]) == set(annotated) - set(f["test"])
        assert not test_patients & {patient[i] for i in f["train_annotated"]}
        assert not test_patients & {patient[i] for i in f["train_unannotated"]}
        # Only pool images of test patients are held out.
        assert set(f["train_unannotated"]) == {i for i in pool if patient[i] not in test_patients}
    assert s["group_by"] == "patient" and s["seed"] == 0 and s["unannotated_fraction"] == 0.1
    check_splits(s, annotated, unannotated)


def test_real_folds_deterministic(real_tables: tuple[dict[str, int], dict[str, int]]) -> None:
    a = dumps_splits(_splits(real_tables, 3, 0.05))
    b = dumps_splits(_splits(real_tables, 3, 0.05))
    c = dumps_splits(_splits(real_tables, 4, 0.05))
    assert a == b and a != c
    # Input order does not matter.
    annotated, unannotated = real_tables
    rev = make_splits(
        dict(reversed(list(annotated.items()))),
        {i: unannotated[i] for i in reversed(sample_unannotated(list(reversed(unannotated)), 0.05, 3))},
        folds=5,
        seed=3,
        unannotated_fraction=0.05,
    )
    assert dumps_splits(rev) == a
    assert json.loads(a)["folds"][0]["fold"] == 0


def test_check_splits_catches_edits(real_tables: tuple[dict[str, int], dict[str, int]]) -> None:
    annotated, unannotated = real_tables
    s = _splits(real_tables, 0, 0.02)
    moved = json.loads(dumps_splits(s))
    victim = moved["folds"][0]["test"].pop()
    with pytest.raises(CxrlocError, match="no test set"):
        check_splits(moved, annotated, unannotated)
    leak = json.loads(dumps_splits(s))
    f0 = leak["folds"][0]
    same_patient = [i for i, p in unannotated.items() if p == annotated[f0["test"][0]]]
    assert same_patient  # NIH patients have many images
    f0["train_unannotated"].append(same_patient[0])
    with pytest.raises(CxrlocError, match="test patient"):
        check_splits(leak, annotated, unannotated)
    twice = json.loads(dumps_splits(s))
    twice["folds"][1]["test"].append(twice["folds"][0]["test"][0])
    with pytest.raises(CxrlocError, match="test sets of folds"):
        check_splits(twice, annotated, unannotated)
    assert victim


def test_bad_options() -> None:
    with pytest.raises(CxrlocError, match="at least 2"):
        make_splits({"a.png": 1, "b.png": 2}, {}, folds=1, seed=0, unannotated_fraction=0)
    with pytest.raises(CxrlocError, match="patient"):
        make_splits({"a.png": 1, "b.png": 1}, {}, folds=2, seed=0, unannotated_fraction=0)
    with pytest.raises(CxrlocError, match=r"\[0, 1\]"):
        sample_unannotated(["a"], 1.5, 0)
