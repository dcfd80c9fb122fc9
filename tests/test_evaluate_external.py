"""``cxrloc evaluate RUN --data PREPARED_DIR``: a trained run scored on another prepared folder.

Two runs: the hand-written run of ``conftest.write_hand_run`` (z known exactly: Atelectasis and
Mass cover the whole image, every other class nothing), scored on a table dataset the test writes
with boxes whose IoU with the whole image and with the prior's regions is worked by hand, and
with a class list that only partly matches the run's; and a tiny run trained on some of the real
NIH images, scored on a second NIH folder prepared from other real images.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HAND_SIZE, NIH_DIR, needs_shared, nih_subset, one_line, run_cli, write_hand_run
from PIL import Image

from cxrloc.classes import BOXED_CLASSES, CLASSES, LABEL_ALIASES
from cxrloc.data.prepare import prepare
from cxrloc.evaluation.evaluate import evaluate
from cxrloc.utils import CxrlocError

NIH = NIH_DIR

# The external test set: (image, labels, boxes as (label, x, y, w, h) in pixels of a 64 px image).
S = HAND_SIZE
EXTERNAL = [
    ("x1.png", "Atelectasis", [("Atelectasis", 0, 0, S // 2, S // 2)]),  # the prior's own region
    ("x2.png", "Atelectasis", [("Atelectasis", S // 2, S // 2, S // 2, S // 2)]),  # disjoint from it
    ("x3.png", "Mass|Lesion", [("Mass", S // 2, S // 2, S // 4, S // 4), ("Lesion", 0, 0, S, S)]),
    ("x4.png", "Mass", []),  # no box: not scored
    ("x5.png", "", []),
    ("x6.png", "Lesion", [("Lesion", 8, 8, 16, 16)]),
]
EXTERNAL_CLASSES = "Mass,Atelectasis,Lesion"  # Mass and Atelectasis are the run's; Lesion is not


def _write_external(root: Path, size: int = S) -> Path:
    """The external test set as a plain table dataset, prepared by ``cxrloc prepare`` at ``size`` px."""
    images = root / "ext_images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, _, _ in EXTERNAL:
        Image.fromarray(rng.integers(0, 256, size=(S, S), dtype=np.uint8)).save(images / name)
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{n},{lab}\n" for n, lab, _ in EXTERNAL))
    (root / "boxes.csv").write_text("image,label,x,y,w,h\n" + "".join(
        f"{n},{','.join(map(str, b))}\n" for n, _, bs in EXTERNAL for b in bs))
    out = root / "ext"
    code, text = run_cli("prepare", images, "--format", "table", "--labels", root / "labels.csv", "--boxes",
                         root / "boxes.csv", "--classes", EXTERNAL_CLASSES, "--out", out, "--size", size,
                         "--folds", "2")
    assert code == 0, text
    return out


def test_hand_run_on_an_external_table_dataset_by_hand(tmp_path: Path) -> None:
    run = write_hand_run(tmp_path)
    ext = _write_external(tmp_path)
    result = evaluate(run, ts=(0.1, 0.3, 0.5), data=ext, progress=False)
    out = Path(result["out_dir"])
    assert out == run / "eval_on_ext" and (out / "results.json").is_file()
    assert not (run / "eval").exists()  # never over the run's own evaluation

    assert result["classes"] == [*CLASSES, "Lesion"]  # the run's, then the data's the run does not know
    assert result["not_in_run"] == ["Lesion"]
    assert result["not_in_data"] == [c for c in CLASSES if c not in ("Mass", "Atelectasis")]
    assert "paper_table1" not in result  # not NIH data
    for f in result["per_fold"]:  # both folds' models are the same; every boxed image: x1, x2, x3, x6
        assert f["test_images"] == 4
        assert f["boxes"]["Atelectasis"] == 2 and f["boxes"]["Mass"] == 1 and f["boxes"]["Lesion"] == 2
        # Whole-image region: IoU = box area. Atelectasis boxes of area 1/4 and 1/4.
        assert f["model"]["iou"]["Atelectasis"] == pytest.approx([1, 0, 0])
        # Mass: one box of area 1/16 < 0.1 (IoR = intersection / region = 1/16 as well).
        assert f["model"]["iou"]["Mass"] == pytest.approx([0, 0, 0])
        assert f["model"]["ior"]["Mass"] == pytest.approx([0, 0, 0])
        # The prior fitted on the run's own training boxes: Atelectasis [0, .5]^2, Mass [.5, .75]^2.
        assert f["prior"]["iou"]["Atelectasis"] == pytest.approx([0.5, 0.5, 0.5])  # x1 exact, x2 disjoint
        assert f["prior"]["iou"]["Mass"] == pytest.approx([1, 1, 1])
        # A class the run does not know, and the run's classes without a box in the data: n/a.
        assert f["model"]["iou"]["Lesion"] == [None, None, None]
        assert f["prior"]["iou"]["Lesion"] == [None, None, None]
        assert f["model"]["iou"]["Cardiomegaly"] == [None, None, None]
        assert f["auroc"]["Lesion"] is None and f["auroc"]["Cardiomegaly"] is None
    s = result["summary"]
    # Both folds scored the same four images: boxes and positives are counted once, not per fold.
    assert s["boxes"]["Atelectasis"] == 2 and s["boxes"]["Lesion"] == 2 and s["boxes"]["Mass"] == 1
    assert s["classification"]["positives"]["Lesion"] == 2 and s["classification"]["positives"]["Mass"] == 1
    assert s["model"]["iou"]["boxed_mean"] == pytest.approx([0.5, 0, 0])  # mean of Atelectasis and Mass
    assert s["prior"]["iou"]["boxed_mean"] == pytest.approx([0.75, 0.75, 0.75])
    # The prior is the one of the run's own evaluation (same training boxes), not one of the test data.
    own = evaluate(run, ts=(0.1, 0.3, 0.5), progress=False)
    assert [f["prior_fit"] for f in result["per_fold"]] == [f["prior_fit"] for f in own["per_fold"]]

    # One row per box of a class the run knows (a Lesion box has no region to compare with).
    per_image = pd.read_csv(out / "per_image.csv")
    assert sorted(per_image["image_id"]) == ["x1.png", "x1.png", "x2.png", "x2.png", "x3.png", "x3.png"]
    assert set(per_image["class"]) == {"Atelectasis", "Mass"}
    md = (out / "results.md").read_text()
    assert "Not known to the run (n/a): Lesion" in one_line(md)
    assert "known to the run: Atelectasis, Mass." in one_line(md)
    # The IoU table of results.md: the Lesion and Cardiomegaly columns are n/a, the mean is (1 + 0) / 2.
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    model = next(line for line in lines if line.startswith("| model | 0.1"))
    cells = dict(zip(header.strip("|").split("|"), model.strip("|").split("|"), strict=True))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells["Lesion"] == "n/a" and cells["Card"] == "n/a"
    assert cells["Atel"].startswith("1.000") and cells["mean"].startswith("0.500")


def test_external_fold_and_cli(tmp_path: Path) -> None:
    """An external set is all test: --fold N picks fold N's model, never a subset of the images, and
    the numbers of fold N's model are the same whatever --fold says (issue 25)."""
    run = write_hand_run(tmp_path)
    ext = _write_external(tmp_path)
    code, text = run_cli("evaluate", run, "--data", ext, "--t", "0.1")
    assert code == 0, text
    every = json.loads((run / "eval_on_ext" / "results.json").read_text())
    code, text = run_cli("evaluate", run, "--data", ext, "--fold", "1", "--t", "0.1")
    assert code == 0, text
    assert f"Results saved to {run / 'eval_on_ext_fold1'}" in one_line(text)  # its own folder
    assert "n/a" in text and "Lesion" in text
    result = json.loads((run / "eval_on_ext_fold1" / "results.json").read_text())
    assert result["folds"] == [1] and "data_fold" not in result
    # Every boxed image of the external set (4 of 6: x4 and x5 have no box), whatever its folds.
    boxed = sorted(n for n, _, bs in EXTERNAL if bs)
    assert result["per_fold"][0]["test_images"] == len(boxed) == 4
    known = sorted(n for n, _, bs in EXTERNAL if any(b[0] != "Lesion" for b in bs))
    assert sorted(set(pd.read_csv(run / "eval_on_ext_fold1" / "per_image.csv")["image_id"])) == known
    # Fold 1's model: the same numbers as in the evaluation of every fold's model.
    assert result["per_fold"][0]["model"] == every["per_fold"][1]["model"]
    assert result["per_fold"][0]["grid"] == every["per_fold"][1]["grid"]
    # The evaluation of every fold was not replaced; another T into the same folder is refused.
    assert json.loads((run / "eval_on_ext" / "results.json").read_text()) == every
    code, text = run_cli("evaluate", run, "--data", ext, "--t", "0.3")
    assert code == 2 and "holds an evaluation made with other options" in one_line(text)
    assert "ts [0.1] -> [0.3]" in one_line(text) and "--out" in one_line(text)
    assert json.loads((run / "eval_on_ext" / "results.json").read_text()) == every
    code, text = run_cli("evaluate", run, "--data", ext, "--t", "0.3", "--out", tmp_path / "t03")
    assert code == 0, text
    # The same options again refresh the folder.
    code, text = run_cli("evaluate", run, "--data", ext, "--t", "0.1")
    assert code == 0, text

    code, text = run_cli("evaluate", run, "--data", ext, "--split", "val")
    assert code == 2 and "use one or the other" in one_line(text)
    code, text = run_cli("evaluate", run, "--data", tmp_path / "nowhere")
    assert code == 2 and "prepared folder not found" in one_line(text)


def test_external_cache_of_another_size_is_refused_with_the_command_that_fixes_it(tmp_path: Path) -> None:
    run = write_hand_run(tmp_path)
    ext = _write_external(tmp_path, size=32)
    code, text = run_cli("evaluate", run, "--data", ext)
    assert code == 2
    flat = one_line(text)
    assert "caches its images at 32 px" in flat and f"trained on a {S} px cache" in flat
    assert not (run / "eval_on_ext").exists()
    # The command in the message makes a matching cache, and the evaluation then runs.
    command = flat[flat.index("cxrloc prepare"):]
    args = shlex.split(command)
    assert args[args.index("--size") + 1] == str(S)
    code, text = run_cli(*args[1:])
    assert code == 0, text
    target = Path(args[args.index("--out") + 1])
    result = evaluate(run, ts=(0.1,), data=target, progress=False)
    assert result["per_fold"][0]["model"]["iou"]["Atelectasis"] == pytest.approx([1])


def test_nih_run_on_a_second_prepared_nih_folder(tmp_path: Path) -> None:
    with open(needs_shared(NIH / "BBox_List_2017.csv"), newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    names = sorted({r[0] for r in rows})
    own_names, other_names = names[:30], names[30:50]
    own = prepare(nih_subset(tmp_path / "nih_a", own_names), tmp_path / "prep_a", size=64, folds=2, progress=False)
    other = prepare(nih_subset(tmp_path / "nih_b", other_names), tmp_path / "prep_b", size=64, folds=2,
                    progress=False)
    run = tmp_path / "run"
    code, text = run_cli("train", own, "--out", run, "--fold", "0", "--preset", "tiny", "--epochs", "1",
                         "--set", "device=cpu", "--set", "workers=0", "--set", "batch_size=4", "--quiet")
    assert code == 0, text
    own_eval = evaluate(run, ts=(0.1, 0.5), progress=False)
    own_bytes = (run / "eval" / "results.json").read_bytes()

    code, text = run_cli("evaluate", run, "--data", other, "--t", "0.1", "--t", "0.5")
    assert code == 0, text
    assert "paper" in text  # NIH results keep the paper's Table 1 beside them
    result = json.loads((run / "eval_on_prep_b" / "results.json").read_text())
    assert (run / "eval" / "results.json").read_bytes() == own_bytes  # the run's own evaluation untouched
    assert result["classes"] == list(CLASSES) and result["boxed_classes"] == list(BOXED_CLASSES)
    assert result["paper_table1"] and result["not_in_run"] == [] and result["not_in_data"] == []
    # Every boxed image of the other folder, and its boxes per class, counted from the CSV rows.
    other_rows = [r for r in rows if r[0] in set(other_names)]
    assert result["per_fold"][0]["test_images"] == len(other_names)
    want = {c: 0 for c in CLASSES}
    for r in other_rows:
        want[LABEL_ALIASES.get(r[1], r[1])] += 1
    assert result["summary"]["boxes"] == want
    # The prior beside it is the run's own (fitted on the run's training boxes).
    assert result["per_fold"][0]["prior_fit"] == own_eval["per_fold"][0]["prior_fit"]

    # The run has one fold: --fold 0 is the evaluation of every fold, the same folder and numbers.
    again = evaluate(run, ts=(0.1, 0.5), data=other, fold=0, progress=False)
    assert Path(again["out_dir"]) == run / "eval_on_prep_b"
    assert again["per_fold"][0]["test_images"] == len(other_names)
    for geometry in ("exact", "grid"):
        for method in ("model", "prior", "prior_t"):
            s1 = result["summary"] if geometry == "exact" else result["summary"]["grid"]
            s2 = again["summary"] if geometry == "exact" else again["summary"]["grid"]
            assert s1[method] == s2[method]
    # The run's own folder as external data: every boxed image of it (train images included), not fold 0's test.
    whole = evaluate(run, ts=(0.1, 0.5), data=own, fold=0, progress=False)
    assert whole["per_fold"][0]["test_images"] == len(own_names) > own_eval["per_fold"][0]["test_images"]


def test_external_data_without_a_boxed_image_is_one_message(tmp_path: Path) -> None:
    run = write_hand_run(tmp_path)
    ext = _write_external(tmp_path)
    # Drop every box from the manifest (as a dataset with labels only would be).
    manifest = pd.read_csv(ext / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["boxes"], manifest["annotated"] = "[]", "0"
    manifest.to_csv(ext / "manifest.csv", index=False)
    with pytest.raises(CxrlocError, match="holds no image with a box"):
        evaluate(run, data=ext, progress=False)


def test_external_data_with_no_class_in_common_is_refused(tmp_path: Path) -> None:
    # Issue 22, defect 7: every class n/a used to exit 0 with an empty report.
    run = write_hand_run(tmp_path)
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(S, S), dtype=np.uint8)).save(images / f"y{i}.png")
    (tmp_path / "labels.csv").write_text("image,labels\n" + "".join(f"y{i}.png,Lesion\n" for i in range(4)))
    (tmp_path / "boxes.csv").write_text("image,label,x,y,w,h\n" + "".join(f"y{i}.png,Lesion,4,4,20,20\n"
                                                                          for i in range(4)))
    code, text = run_cli("prepare", images, "--format", "table", "--labels", tmp_path / "labels.csv", "--boxes",
                         tmp_path / "boxes.csv", "--out", tmp_path / "ext", "--size", S, "--folds", "2")
    assert code == 0, text
    code, text = run_cli("evaluate", run, "--data", tmp_path / "ext")
    flat = one_line(text)
    assert code == 2 and "no class in common" in flat and "Lesion" in flat and "Atelectasis" in flat, text
    assert not list(run.glob("eval_on_*"))
