"""Shared helpers: failed writes become one clear message, and nothing existing is changed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import cxrloc.utils as utils
from cxrloc.utils import (
    OutputError,
    atomic_path,
    check_writable_dir,
    check_writable_file,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
    write_texts_atomic,
)

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_during_a_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old\n")
    with pytest.raises(OutputError) as info, atomic_path(target, "results") as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    message = str(info.value)
    assert "disk full" in message and str(target) in message and "results" in message
    assert "\n" not in message
    assert target.read_text() == "old\n"
    _no_temporaries(tmp_path)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.ENAMETOOLONG, "too long"),
        (errno.EDQUOT, "quota"),
    ],
)
def test_each_errno_has_its_words(tmp_path: Path, code: int, words: str) -> None:
    with pytest.raises(OutputError, match=words), atomic_path(tmp_path / "x.txt"):
        raise OSError(code, os.strerror(code))


def test_output_path_of_the_wrong_kind(tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "inside.txt").write_text("keep")
    with pytest.raises(OutputError, match="a folder of that name exists"):
        write_text_atomic(folder, "x")
    assert (folder / "inside.txt").read_text() == "keep"
    a_file = tmp_path / "plain"
    a_file.write_text("keep")
    with pytest.raises(OutputError, match="a file of that name exists where a folder is needed"):
        write_json_atomic(a_file / "x.json", {})
    with pytest.raises(OutputError, match="is a file, not a folder"):
        write_json_atomic(a_file / "sub" / "x.json", {})
    assert a_file.read_text() == "keep"
    _no_temporaries(tmp_path)


def test_long_names(tmp_path: Path) -> None:
    # 250 bytes fits the usual 255-byte limit: the temporary name must not push it over.
    fits = tmp_path / ("n" * 245 + ".json")
    write_json_atomic(fits, {"a": 1})
    assert fits.read_text() == '{\n  "a": 1\n}\n'
    too_long = tmp_path / ("n" * 300 + ".json")
    with pytest.raises(OutputError, match="too long"):
        write_json_atomic(too_long, {})
    _no_temporaries(tmp_path)
    with pytest.raises(OutputError, match="too long"):
        check_writable_dir(tmp_path / ("d" * 300), "--out")
    with pytest.raises(OutputError, match="too long"):
        check_writable_file(too_long, "--json")


def test_check_writable_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "new" / "deeper"
    assert check_writable_dir(target, "--out") == target
    assert not (tmp_path / "new").exists()  # a check creates nothing
    assert list(tmp_path.iterdir()) == []
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="--out .*is a file, not a folder"):
        check_writable_dir(a_file, "--out")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable_dir(a_file / "sub", "--out")
    with pytest.raises(OutputError, match="disk full"):
        check_writable_dir(target, "--out", need_bytes=1 << 62)
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_writable_file(tmp_path, "--json")

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(utils.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="--out .*read-only"):
        check_writable_dir(target, "--out")


@pytest.mark.skipif(ROOT, reason="running as root: file permissions do not block root's writes")
def test_read_only_folder_by_permissions(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            check_writable_dir(locked / "out", "--out")
        with pytest.raises(OutputError, match="permission denied"):
            write_text_atomic(locked / "x.txt", "x")
    finally:
        locked.chmod(0o755)


def test_remove_stale_temporaries_only_removes_atomic_leftovers(tmp_path: Path) -> None:
    keep = ["last.pt", ".last.pt", "other.tmp", ".best.pt.abc.tmp.keep", ".lastXpt.abc.tmp"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    stale = [".last.pt.k2j3h4.tmp", ".best.pt.zz.tmp"]
    for name in stale:
        (tmp_path / name).write_text("junk")
    removed = remove_stale_temporaries(tmp_path, ["last.pt", "best.pt"])
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_set_of_files_is_replaced_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["results.json", "results.csv", "per_image.csv"]
    for n in names:
        (tmp_path / n).write_text(f"old {n}\n")
    real_write = Path.write_text

    def disk_fills_on_the_third(self: Path, text: str, *a, **k) -> int:
        if self.name.startswith(".per_image.csv."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", disk_fills_on_the_third)
    with pytest.raises(OutputError, match="disk full"):
        write_texts_atomic({tmp_path / n: f"new {n}\n" for n in names}, what="evaluation report")
    monkeypatch.undo()
    assert [(tmp_path / n).read_text() for n in names] == [f"old {n}\n" for n in names]  # none replaced
    _no_temporaries(tmp_path)
    out = write_texts_atomic({tmp_path / n: f"new {n}\n" for n in names})
    assert out == [tmp_path / n for n in names] and all((tmp_path / n).read_text() == f"new {n}\n" for n in names)
    _no_temporaries(tmp_path)
