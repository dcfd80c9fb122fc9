"""Patient-grouped folds on the real NIH tables, checked by independent set computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import NIH_DIR, needs_shared

from cxrloc.data.nih import read_bbox_list, read_data_entry
from cxrloc.data.splits import check_splits, dumps_splits, make_splits, sample_unannotated
from cxrloc.utils import CxrlocError

NIH = NIH_DIR


@pytest.fixture(scope="module")
def real_tables() -> tuple[dict[str, int], dict[str, int]]:
    needs_shared(NIH / "Data_Entry_2017.csv")
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


def _boxed_names(n: int) -> list[str]:
    needs_shared(NIH / "BBox_List_2017.csv")
    return sorted(read_bbox_list(NIH / "BBox_List_2017.csv").boxes)[:n]


def test_hand_made_split_train_on_a_test_on_b(tmp_path: Path) -> None:
    """A user rewrites splits.json as one fold, train on patients A, test on patients B: prepare's
    advice works step by step, and prepare and train accept it through the same check."""
    from conftest import nih_subset, one_line, run_cli

    from cxrloc.data.dataset import split_train_val
    from cxrloc.data.prepare import prepare
    from cxrloc.data.prepared import Prepared

    names = _boxed_names(16)  # a 64 px cache: train refuses one smaller than the tiny preset's input
    data = nih_subset(tmp_path / "nih", names)
    out = prepare(data, tmp_path / "p", size=64, folds=2, progress=False)
    p = Prepared.open(out)
    patient = {i: int(p.manifest.loc[i, "patient_id"]) for i in p.ids}
    patients = sorted(set(patient.values()))
    b_patients = set(patients[: len(patients) // 3])
    a = sorted(i for i in p.ids if patient[i] not in b_patients)
    b = sorted(i for i in p.ids if patient[i] in b_patients)
    splits = json.loads((out / "splits.json").read_text())
    splits["folds"] = [{"fold": 0, "test": b, "train_annotated": a, "train_unannotated": []}]
    (out / "splits.json").write_text(json.dumps(splits))

    # 1. The options of the folds prepare made: the message says which options reuse the file...
    with pytest.raises(CxrlocError, match=r"pass --folds 1 --seed 0 --unannotated-fraction 0 to reuse it") as e1:
        prepare(data, out, size=64, folds=2, progress=False)
    assert '"seed": null' in str(e1.value)
    # ... and they are accepted (--folds 1 with an existing file); the file is no cross-validation
    # (A is in no test set), and the message says how to keep it as a hand-made split.
    with pytest.raises(CxrlocError, match=r'in no test set.*"seed": null') as e2:
        prepare(data, out, size=64, folds=1, progress=False)
    assert "at least 2" not in str(e2.value)
    # 2. Marked hand-made: reused whatever the options say, recorded in the fingerprint.
    splits["seed"] = None
    (out / "splits.json").write_text(json.dumps(splits))
    prepare(data, out, size=64, folds=5, seed=3, progress=False)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["parameters"]["splits_hand_made"] is True and fp["parameters"]["folds"] == 1
    p = Prepared.open(out)
    assert p.fold(0)["test"] == b and p.num_folds == 1
    train, val = split_train_val(p, 0, 0.0, 0)
    assert sorted(train) == a and val == []

    # 3. The rules of every split hold for a hand-made one too, in prepare and in train: a test
    # patient's image in training is refused by both with the same message.
    leak = json.loads(json.dumps(splits))
    leak["folds"][0]["train_annotated"] = a + [b[0]]
    (out / "splits.json").write_text(json.dumps(leak))
    with pytest.raises(CxrlocError, match="both test and train|test patient"):
        prepare(data, out, size=64, folds=1, progress=False)
    code, text = run_cli("train", out, "--out", tmp_path / "run", "--fold", "0", "--preset", "tiny", "--epochs", "1",
                         "--set", "device=cpu", "--set", "workers=0", "--quiet")
    assert code != 0 and "Traceback" not in text
    assert "test patient" in one_line(text) or "both test and train" in one_line(text)


def test_folds_below_two_still_refused_when_computing(tmp_path: Path) -> None:
    from conftest import nih_subset

    from cxrloc.data.prepare import prepare

    data = nih_subset(tmp_path / "nih", _boxed_names(6))
    with pytest.raises(CxrlocError, match=r'at least 2.*"seed": null'):
        prepare(data, tmp_path / "p", size=16, folds=1, progress=False)
