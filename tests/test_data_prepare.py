"""`cxrloc prepare` end to end: the shared NIH folder, a hand-built NIH-format folder, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import NIH_DIR, REAL_FIXTURES, needs_shared
from PIL import Image

import cxrloc.data.identity as identity
import cxrloc.data.image_cache as cache_mod
import cxrloc.data.prepare as prep_mod
from cxrloc.classes import CLASS_INDEX, CLASSES
from cxrloc.data.prepare import prepare
from cxrloc.data.prepared import Prepared
from cxrloc.utils import CxrlocError

NIH = NIH_DIR
OUT_FILES = ("images.u8", "done.u8", "cache.json", "manifest.csv", "fingerprint.json", "splits.json")


def _same_files(a: Path, b: Path) -> None:
    """The same prepared files; fingerprint.json may differ only in the --out of its recorded command."""
    for name in OUT_FILES:
        if name == "fingerprint.json":
            fa, fb = (json.loads((d / name).read_text()) for d in (a, b))
            for fp, d in ((fa, a), (fb, b)):
                cmd = fp["parameters"]["command"]
                assert cmd[cmd.index("--out") + 1] == str(d)
                cmd[cmd.index("--out") + 1] = "OUT"
            assert fa == fb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _make_nih(root: Path, *, corrupt: bool = True) -> dict[str, object]:
    """A small NIH-format folder: 6 patients, 18 images over two image folders, quirky CSVs."""
    rng = np.random.default_rng(0)
    rows, boxes, truth = [], [], {}
    n = 0
    for patient in range(1, 7):
        for follow in range(3):
            name = f"{patient:08d}_{follow:03d}.png"
            sub = root / f"images_00{1 + n % 2}" / "images"
            sub.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
            if n == 4:  # an RGBA original, as five NIH images are
                Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA").save(sub / name)
            else:
                Image.fromarray(pixels).save(sub / name)
            truth[name] = pixels
            label = "Mass" if follow == 0 else ("Effusion|Nodule" if follow == 1 else "No Finding")
            rows.append(f"{name},{label},{follow},{patient},50,M,PA,2500,2048,0.14,0.14")
            if follow == 0:
                boxes.append(f"{name},Mass,{100 * patient},200,300,150")
                if patient == 2:
                    boxes.append(f"{name},Infiltrate,0,0,1024,512")
            n += 1
    rows.append("00000099_000.png,Hernia,0,99,50,F,AP,2500,2048,0.14,0.14")  # listed but not on disk
    if corrupt:
        bad = root / "images_002" / "images" / "00000006_002.png"
        bad.write_bytes(bad.read_bytes()[:60])  # truncated
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    header += "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    (root / "Data_Entry_2017.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "\n".join(boxes) + "\n")
    return truth


def test_prepare_synthetic_folder(tmp_path: Path) -> None:
    nih = tmp_path / "nih"
    truth = _make_nih(nih)
    out = prepare(nih, tmp_path / "p", size=32, folds=2, unannotated_fraction=0.5, seed=1, progress=False)
    p = Prepared.open(out)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["counts"]["listed"] == 19 and fp["counts"]["missing"] == 1
    assert fp["missing"]["images"] == ["00000099_000.png"]
    assert [s["image_id"] for s in fp["skipped"]] == ["00000006_002.png"]
    assert "00000006_002.png" in fp["skipped"][0]["reason"]
    assert "00000006_002.png" not in p.manifest.index and len(p.manifest) == 17
    annotated = [f"{i:08d}_000.png" for i in range(1, 7)]
    assert sorted(p.manifest.index[p.manifest["annotated"] == 1]) == annotated
    # The pool is sampled before decoding from the 12 unannotated files on disk: round(0.5 * 12) = 6; the
    # truncated file was among them (it was decoded, hence skipped), which leaves 5.
    pool = set().union(*(set(p.fold(k)["train_unannotated"]) for k in range(2)))
    assert len(pool) == 5 and all(not i.endswith("_000.png") for i in pool)
    # Pixels: independent 2x2 block mean of the written 64 px image.
    name = "00000002_000.png"
    block = truth[name].astype(np.float64).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(p.image(name).astype(np.float64) - block).max() <= 0.5 + 1e-9
    assert p.boxes("00000002_000.png") == [
        (CLASS_INDEX["Mass"], 200 / 1024, 200 / 1024, 500 / 1024, 350 / 1024),
        (CLASS_INDEX["Infiltration"], 0.0, 0.0, 1.0, 0.5),
    ]
    lab = p.labels("00000002_000.png")  # Mass from Data_Entry, Infiltration added from its box
    assert lab.dtype == np.float32 and {CLASSES[k] for k in np.flatnonzero(lab)} == {"Mass", "Infiltration"}
    assert fp["counts"]["labels_added_from_boxes"] == 1
    for k in range(2):
        f = p.fold(k)
        tp = {int(p.manifest.loc[i, "patient_id"]) for i in f["test"]}
        for key in ("train_annotated", "train_unannotated"):
            assert not tp & {int(p.manifest.loc[i, "patient_id"]) for i in f[key]}
    # Same inputs -> byte-identical outputs, also with 2 worker processes; splits.json reused.
    again = prepare(nih, tmp_path / "q", size=32, folds=2, unannotated_fraction=0.5, seed=1, workers=2, progress=False)
    _same_files(out, again)
    before = (out / "splits.json").read_bytes()
    prepare(nih, out, size=32, folds=2, unannotated_fraction=0.5, seed=1, progress=False)
    assert (out / "splits.json").read_bytes() == before
    with pytest.raises(CxrlocError, match="delete it"):
        prepare(nih, out, size=32, folds=3, unannotated_fraction=0.5, seed=1, progress=False)


def test_prepare_nothing_usable(tmp_path: Path) -> None:
    nih = tmp_path / "nih"
    _make_nih(nih)
    for png in nih.rglob("*.png"):
        png.unlink()
    with pytest.raises(CxrlocError, match="none of the 19 images"):
        prepare(nih, tmp_path / "p", size=32, folds=2, progress=False)
    from typer.testing import CliRunner

    from cxrloc.cli import app

    result = CliRunner().invoke(app, ["prepare", str(nih), "--out", str(tmp_path / "p2"), "--size", "32"])
    assert result.exit_code != 0 and isinstance(result.exception, CxrlocError)


def test_interrupted_then_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nih = tmp_path / "nih"
    truth = _make_nih(nih, corrupt=False)
    kwargs = dict(size=32, folds=2, unannotated_fraction=1.0, seed=0, progress=False)
    full = prepare(nih, tmp_path / "full", **kwargs)
    n = Prepared.open(full).images.shape[0]
    assert n == 18
    rgba = "00000002_001.png"  # written as RGBA with R = G = B
    block = truth[rgba].astype(np.float64).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(Prepared.open(full).image(rgba).astype(np.float64) - block).max() <= 0.5 + 1e-9

    real = cache_mod.read_image_u8
    calls: list[str] = []

    def dying(path: str, size: int) -> np.ndarray:
        if len(calls) == 7:
            raise KeyboardInterrupt  # the user pressing Ctrl-C
        calls.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(cache_mod, "read_image_u8", dying)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare(nih, out, **kwargs)
    done = np.fromfile(out / "done.u8", dtype=np.uint8)
    assert int(done.sum()) == 7 and not (out / "manifest.csv").exists()
    with pytest.raises(CxrlocError, match="unfinished"):
        Prepared.open(out)

    second: list[str] = []

    def counting(path: str, size: int) -> np.ndarray:
        second.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(cache_mod, "read_image_u8", counting)
    prepare(nih, out, **kwargs)
    assert len(second) == n - 7 and not set(second) & set(calls)
    _same_files(full, out)


@pytest.mark.slow
def test_prepare_shared_nih(tmp_path: Path) -> None:
    needs_shared(NIH / "Data_Entry_2017.csv")
    out = prepare(NIH, tmp_path / "p", size=64, progress=False)
    p = Prepared.open(out)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["counts"]["found"] == 704 and fp["counts"]["missing"] == 112_120 - 704
    assert len(fp["missing"]["images"]) == 112_120 - 704 and fp["counts"]["boxes"] == 781
    assert p.images.shape == (704, 64, 64) and p.num_folds == 5
    name = "00013118_008.png"
    raw = np.asarray(Image.open(NIH / "images" / name).convert("L"), dtype=np.float64)  # 512 px file
    block = raw.reshape(64, 8, 64, 8).mean(axis=(1, 3))
    assert np.abs(p.image(name).astype(np.float64) - block).max() <= 0.5 + 1e-9
    k, x0, y0, x1, y1 = p.boxes(name)[0]
    assert k == CLASS_INDEX["Atelectasis"] and abs(x0 - 225.084745762712 / 1024) < 1e-12
    tests = [i for k in range(5) for i in p.fold(k)["test"]]
    assert sorted(tests) == sorted(p.manifest.index) and len(set(tests)) == 704


SHARED = NIH.parent
UNBOXED = SHARED / "nih-unboxed"


def _patients_disjoint(p: Prepared) -> None:
    """No fold trains (annotated or not) on an image of one of its test patients."""
    for k in range(p.num_folds):
        f = p.fold(k)
        test_patients = {int(p.manifest.loc[i, "patient_id"]) for i in f["test"]}
        for key in ("train_annotated", "train_unannotated"):
            assert not test_patients & {int(p.manifest.loc[i, "patient_id"]) for i in f[key]}, (k, key)


def test_find_images_by_stem_in_several_folders_with_links(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "sub", tmp_path / "b"
    a.mkdir(parents=True)
    b.mkdir()
    px = np.zeros((8, 8), dtype=np.uint8)
    Image.fromarray(px).save(a / "x_000.png")
    Image.fromarray(px).save(b / "x_000.JPG")  # a converted copy of the same image: exact name wins
    Image.fromarray(px).save(b / "y_000.jpeg")
    (b / "z_000.dcm").write_bytes(b"")  # found by stem; decoding is prepare's business
    (b / "notes.txt").write_text("not an image")
    (b / "other_001.png").write_bytes(b"")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")  # a link loop must not hang the walk
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "linked").symlink_to(b, target_is_directory=True)
    wanted = {"x_000.png", "y_000.png", "z_000.png", "w_000.png"}
    found, unlisted, dups = prep_mod.find_images([tmp_path / "a", tmp_path / "c"], wanted)
    assert found == {"x_000.png": a / "x_000.png", "y_000.png": tmp_path / "c" / "linked" / "y_000.jpeg",
                     "z_000.png": tmp_path / "c" / "linked" / "z_000.dcm"}
    assert dups == ["x_000.png"] and unlisted == 1
    # The same folder given twice (or reached through a link and directly) is walked once.
    found2, _, dups2 = prep_mod.find_images([b, tmp_path / "c"], wanted)
    assert dups2 == [] and found2["x_000.png"] == b / "x_000.JPG"
    assert set(found2) == {"x_000.png", "y_000.png", "z_000.png"}


@pytest.mark.slow
def test_prepare_real_images_in_two_folders_any_extension(tmp_path: Path) -> None:
    """The shared NIH images split over two folders (one of them reached through a symbolic link),
    some re-encoded as JPEG and one stored as a real DICOM file, all under their NIH stems."""
    needs_shared(NIH / "Data_Entry_2017.csv")
    names = sorted(p.name for p in (NIH / "images").glob("*.png"))
    first, second = tmp_path / "first", tmp_path / "elsewhere" / "second"
    first.mkdir()
    second.mkdir(parents=True)
    jpeg, dicom = set(names[1:40:2]), names[3]
    for n, name in enumerate(names):
        target = (first if n % 2 == 0 else second) / name
        if name in jpeg:
            Image.open(NIH / "images" / name).convert("L").save(target.with_suffix(".jpg"), quality=95)
        elif name == dicom:
            (second / name).with_suffix(".dcm").write_bytes(
                (REAL_FIXTURES / "cr_monochrome2_jpeg.dcm").read_bytes()
            )
        else:
            target.symlink_to(NIH / "images" / name)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    out = prepare(
        first,
        tmp_path / "p",
        images=[tmp_path / "link"],
        data_entry=NIH / "Data_Entry_2017.csv",
        bbox_list=NIH / "BBox_List_2017.csv",
        size=32,
        progress=False,
    )
    p = Prepared.open(out)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["counts"]["found"] == 704 and fp["counts"]["annotated"] == 704 and fp["counts"]["skipped"] == 0
    assert sorted(p.manifest.index) == names  # NIH names, whatever the stored extension
    # A JPEG copy decodes to (nearly) the same pixels as the PNG it came from.
    ref = prepare(NIH, tmp_path / "ref", size=32, progress=False)
    jp = sorted(jpeg)[0]
    diff = np.abs(p.image(jp).astype(int) - Prepared.open(ref).image(jp).astype(int))
    assert diff.mean() < 2.0
    # Patients with images in both folders exist, and folds still group them.
    patient = p.manifest["patient_id"]
    where = {i: n % 2 for n, i in enumerate(names)}
    both = {pt for pt in set(patient) if len({where[i] for i in patient.index[patient == pt]}) == 2}
    assert both
    _patients_disjoint(p)


@pytest.mark.slow
def test_prepare_unboxed_pool_real(tmp_path: Path) -> None:
    """The 1,475 unboxed NIH images as a second image folder: with fraction 1 they all join the pool."""
    needs_shared(UNBOXED)
    needs_shared(NIH / "Data_Entry_2017.csv")
    n_unboxed = sum(1 for _ in UNBOXED.rglob("*.png")) + sum(1 for _ in UNBOXED.rglob("*.jp*g"))
    out = prepare(NIH, tmp_path / "p", images=[UNBOXED], size=16, unannotated_fraction=1.0, workers=2, progress=False)
    p = Prepared.open(out)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["counts"]["annotated"] == 704
    assert fp["counts"]["unannotated_pool"] == n_unboxed == 1475
    _patients_disjoint(p)


def _damaged_nih_copy(root: Path) -> dict[str, object]:
    """A copy of 30 annotated images of the shared NIH folder with the damage of issue 11.

    The images folder is a symbolic link to a folder elsewhere (prepare follows it). Returns the
    damaged image names and the box-list line of each damaged row.
    """
    rows = (NIH / "BBox_List_2017.csv").read_text().splitlines()[1:]
    by_image: dict[str, list[str]] = {}
    for row in rows:
        by_image.setdefault(row.split(",")[0], []).append(row)
    single = sorted(i for i, r in by_image.items() if len(r) == 1)
    chosen = single[:30]
    truncated, deleted, unlisted, neg_width, non_numeric, extra, dup, unknown, past_edge = chosen[:9]
    store = root / "store" / "images"
    store.mkdir(parents=True)
    for name in chosen:
        if name == deleted:
            continue
        data = (NIH / "images" / name).read_bytes()
        (store / name).write_bytes(data[: len(data) // 3] if name == truncated else data)
    nih = root / "nih"
    nih.mkdir()
    (nih / "images").symlink_to(store, target_is_directory=True)
    entry_lines = (NIH / "Data_Entry_2017.csv").read_text().splitlines()
    wanted = set(chosen) - {unlisted}
    (nih / "Data_Entry_2017.csv").write_text(
        "\n".join([entry_lines[0]] + [r for r in entry_lines[1:] if r.split(",")[0] in wanted]) + "\n"
    )
    out_rows: list[str] = []
    lines: dict[str, int] = {}

    def add(key: str, row: str) -> None:
        out_rows.append(row)
        lines[key] = len(out_rows) + 1  # line 1 is the header

    for name in chosen:
        row = by_image[name][0]
        fields = row.split(",")
        if name == neg_width:
            add("no_area", ",".join(fields[:4] + ["-" + fields[4]] + fields[5:]))
        elif name == non_numeric:
            add("non_numeric", ",".join(fields[:2] + ["12O.5"] + fields[3:]))
        else:
            add(name, row)
        if name == extra:
            add("extra_columns", ",".join(fields[:6] + ["0.5"]))
        if name == dup:
            add("duplicate", row)
        if name == unknown:
            add("unknown_label", ",".join([name, "Lung Opacity"] + fields[2:6]))
        if name == past_edge:
            add("clipped", f"{name},Mass,1000,200,100,100")
    header = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    (nih / "BBox_List_2017.csv").write_text("\n".join([header, *out_rows]) + "\n")
    return {
        "names": dict(truncated=truncated, deleted=deleted, unlisted=unlisted, neg_width=neg_width,
                      non_numeric=non_numeric, extra=extra, dup=dup, unknown=unknown, past_edge=past_edge),
        "lines": lines,
        "chosen": chosen,
    }


def test_prepare_reports_every_loss_on_damaged_nih_copy(tmp_path: Path) -> None:
    from conftest import one_line, run_cli

    needs_shared(NIH / "BBox_List_2017.csv")
    info = _damaged_nih_copy(tmp_path)
    n, lines = info["names"], info["lines"]
    nih, out = tmp_path / "nih", tmp_path / "p"

    # --strict: one message, exit 2, nothing written (the folder is not even created).
    code, text = run_cli("prepare", nih, "--out", out, "--size", "16", "--folds", "2", "--strict",
                         env={"COLUMNS": "200"})
    assert code == 2 and "Traceback" not in text, text
    assert "--strict" in one_line(text) and "nothing was written" in one_line(text)
    assert not out.exists()

    code, text = run_cli("prepare", nih, "--out", out, "--size", "16", "--folds", "2", env={"COLUMNS": "200"})
    assert code == 0, text
    flat = one_line(text)
    assert "UserWarning" not in text and "Traceback" not in text
    expected = {
        "annotated_unreadable": (n["truncated"], 0),
        "annotated_missing": (n["deleted"], 0),
        "not_in_data_entry": (n["unlisted"], lines[n["unlisted"]]),
        "no_area": (n["neg_width"], lines["no_area"]),
        "non_numeric": (n["non_numeric"], lines["non_numeric"]),
        "extra_columns": (n["extra"], lines["extra_columns"]),
        "duplicate": (n["dup"], lines["duplicate"]),
        "unknown_label": (n["unknown"], lines["unknown_label"]),
        "clipped": (n["past_edge"], lines["clipped"]),
    }
    for kind, (image, line) in expected.items():
        assert prep_mod.PROBLEM_KINDS[kind] in flat, kind
        assert f"{prep_mod.PROBLEM_KINDS[kind]} 1 {image}" + (f" {line}" if line else "") in flat, kind
    fp = json.loads((out / "fingerprint.json").read_text())
    got = {(p["kind"], p["image"], p["line"]) for p in fp["problems"]}
    for kind, (image, line) in expected.items():
        assert (kind, image, line) in got, kind
    # The two images whose only box row was bad stay, without boxes, and are named.
    assert {(p["kind"], p["image"]) for p in fp["problems"] if p["kind"] == "no_box_left"} == {
        ("no_box_left", n["neg_width"]), ("no_box_left", n["non_numeric"])}
    assert len(fp["problems"]) == len(expected) + 2
    p = Prepared.open(out)
    assert len(p.boxes(n["dup"])) == 1  # the duplicate row was dropped, not kept twice
    assert p.boxes(n["neg_width"]) == [] and p.boxes(n["non_numeric"]) == []
    assert n["truncated"] not in p.manifest.index and n["deleted"] not in p.manifest.index
    assert max(b[3] for b in p.boxes(n["past_edge"])) == 1.0  # clipped to the right edge
    assert len(p.manifest) == 30 - 3  # deleted, truncated, and the image missing from Data_Entry

    # --strict on the existing folder: exit 2 and every file unchanged.
    before = {f: (out / f).read_bytes() for f in OUT_FILES}
    code, text = run_cli("prepare", nih, "--out", out, "--size", "16", "--folds", "2", "--strict")
    assert code == 2 and "Traceback" not in text
    assert {f: (out / f).read_bytes() for f in OUT_FILES} == before


def test_prepare_strict_after_decoding_leaves_nothing(tmp_path: Path) -> None:
    """The only problem is an unreadable image: --strict fails after decoding and removes the new folder."""
    from conftest import one_line, run_cli

    nih = tmp_path / "nih"
    _make_nih(nih)  # one truncated unannotated image, no box-list problem
    out = tmp_path / "p"
    code, text = run_cli("prepare", nih, "--out", out, "--size", "32", "--folds", "2",
                         "--unannotated-fraction", "1", "--strict")
    assert code == 2 and "Traceback" not in text, text
    assert "00000006_002.png" in one_line(text) and "was removed again" in one_line(text)
    assert not out.exists()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody has reaped yet)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find worker processes")
def test_workers_die_with_a_killed_prepare(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    nih = tmp_path / "nih"
    _make_nih(nih, corrupt=False)
    args = ["prepare", str(nih), "--out", str(tmp_path / "p"), "--size", "32", "--folds", "2",
            "--unannotated-fraction", "1", "--workers", "2"]
    # Decoding is slowed down so that prepare is surely still running when it is killed.
    script = (
        "import time\nimport cxrloc.data.image_cache as p\nreal = p.read_image_u8\n"
        "def slow(path, size):\n    time.sleep(0.5)\n    return real(path, size)\n"
        f"p.read_image_u8 = slow\nfrom cxrloc.cli import main\nmain({args!r})\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        cmdline = None
        deadline = time.time() + 300  # generous: on a loaded machine importing torch alone can take a minute
        while time.time() < deadline and proc.poll() is None:
            cmdline = cmdline or (Path("/proc") / str(proc.pid) / "cmdline").read_bytes()
            # Forked workers share the parent's command line (unlike multiprocessing's helpers).
            workers = [k for k in _children(proc.pid) if (Path("/proc") / str(k) / "cmdline").read_bytes() == cmdline]
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        assert len(workers) == 2, "prepare did not start its 2 workers in time"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(w) for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if _running(w)]
        assert not alive, f"worker processes {alive} outlived the killed prepare"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # a failing run must not leave the workers it started behind
            if _running(w):
                os.kill(w, signal.SIGKILL)


def test_summary_counts_the_classes_boxed_here_and_the_labels_added_from_boxes(tmp_path: Path) -> None:
    """On real NIH images whose boxes cover 3 classes, with a table that lacks two boxed findings:
    the summary says 3 classes with boxes (not NIH's 8), the labels added per class, and
    --no-labels-from-boxes keeps the table's labels."""
    import csv
    import shlex

    from conftest import nih_subset, one_line, run_cli

    needs_shared(NIH / "BBox_List_2017.csv")
    with open(NIH / "BBox_List_2017.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    by_image: dict[str, set[str]] = {}
    for r in rows:
        by_image.setdefault(r[0], set()).add(r[1])
    wanted = ("Cardiomegaly", "Effusion", "Mass")
    names = sorted(i for i, cs in by_image.items() if cs <= set(wanted))[:12]
    data = nih_subset(tmp_path / "nih", names)
    boxes_here = {c: sum(1 for r in rows if r[0] in names and r[1] == c) for c in wanted}
    assert all(boxes_here.values())  # the 12 images hold boxes of all three classes
    # The table forgets the findings of two boxed images (as a site's table may).
    forgotten = names[:2]
    lines = (data / "Data_Entry_2017.csv").read_text().splitlines()
    edited = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        if cells[0] in forgotten:
            cells[1] = "No Finding"
        edited.append(",".join(cells))
    (data / "Data_Entry_2017.csv").write_text("\n".join(edited) + "\n")
    added: dict[str, int] = {}
    for name in forgotten:
        for c in by_image[name]:
            added[c] = added.get(c, 0) + 1

    out = tmp_path / "p"
    code, text = run_cli("prepare", data, "--out", out, "--size", "16", "--folds", "2")
    assert code == 0, text
    flat = one_line(text)
    assert "14 classes (3 with boxes)" in flat and "8 with boxes" not in flat
    assert "boxes per class " + ", ".join(f"{c} {boxes_here[c]}" for c in wanted) in flat
    per_class = ", ".join(f"{c} {n}" for c, n in sorted(added.items(), key=lambda kv: CLASSES.index(kv[0])))
    assert f"Labels added from boxes (the table lacked them): {sum(added.values())} image labels, {per_class}" in flat
    p = Prepared.open(out)
    for name in forgotten:
        assert {CLASSES[k] for k in np.flatnonzero(p.labels(name))} == by_image[name]

    kept = tmp_path / "kept"
    code, text = run_cli("prepare", data, "--out", kept, "--size", "16", "--folds", "2", "--no-labels-from-boxes")
    assert code == 0, text
    assert f"kept unlabelled (--no-labels-from-boxes): {sum(added.values())} image labels" in one_line(text)
    q = Prepared.open(kept)
    for name in forgotten:
        assert not q.labels(name).any()
    assert not q.labels(forgotten[0]).any() and q.boxes(forgotten[0])

    # The recorded command makes the folder again, byte for byte (it carries --size and --out).
    fp = json.loads((kept / "fingerprint.json").read_text())
    command = fp["parameters"]["command"]
    assert command[command.index("--size") + 1] == "16" and command[command.index("--out") + 1] == str(kept)
    kept.rename(tmp_path / "kept_before")
    code, text = run_cli(*command[1:])
    assert code == 0, text
    for name in OUT_FILES:  # the same --out: every file byte for byte, fingerprint.json included
        assert (tmp_path / "kept_before" / name).read_bytes() == (kept / name).read_bytes(), name
    # prepare_command (the advice of evaluate --data) replaces them.
    again = shlex.split(identity.prepare_command(kept, size=32, out=tmp_path / "k32"))
    assert again.count("--size") == 1 and again[again.index("--size") + 1] == "32"
    assert again.count("--out") == 1 and again[again.index("--out") + 1] == str(tmp_path / "k32")
