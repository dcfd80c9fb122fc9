"""What a prepared folder holds (its size and inputs), recorded by a run and checked by every reader.

``prepare`` writes the image size and the image list into ``cache.json`` and the tables it read
(name, SHA-256, rows) into ``fingerprint.json``. :func:`prepared_identity` condenses them; ``train``
records it in each fold's ``run.json`` (``"prepared"``), and ``train --resume``, ``evaluate``,
``fit-thresholds`` and ``calibrate`` compare it with the folder as it is now
(:func:`check_prepared_identity`): a folder prepared again at another size or from other tables
since the run was trained is refused with the command that fixes it, instead of giving numbers on
other pixels. Runs made before this record existed are not checked.

``prepare`` itself refuses to prepare over a finished folder with other parameters
(:func:`check_reprepare`) unless told ``--rebuild``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any

from cxrloc.utils import CxrlocError, read_json


def _tables(inputs: Any) -> dict[str, Any]:
    """The tables of a fingerprint's ``inputs`` without their paths (a path depends on the cwd)."""
    if not isinstance(inputs, dict):
        return {}
    return {k: v for k, v in inputs.items() if k != "image_folders"}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepared_identity(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size", "count", "ids_sha256", "tables_sha256"}`` of a prepared folder (what is known of it)."""
    root = Path(root)
    out: dict[str, Any] = {}
    for name, keys in (("cache.json", ("size", "count", "ids_sha256")), ("fingerprint.json", ())):
        try:
            data = json.loads((root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key in keys:
            if key in data:
                out[key] = data[key]
        if name == "fingerprint.json" and "inputs" in data:
            out["tables_sha256"] = _digest(_tables(data["inputs"]))
    return out


def check_prepared_identity(
    prepared_root: str | os.PathLike[str], recorded: Any, run_path: str | os.PathLike[str]
) -> None:
    """Refuse a prepared folder that changed since the run at ``run_path`` was trained on it.

    Args:
        prepared_root: the folder named by the run's ``run.json``.
        recorded: the run's ``"prepared"`` record (``None`` for a run made before it existed: not checked).
        run_path: the fold folder, for the message.

    Raises:
        CxrlocError: the size, the image list or the tables differ; the message gives the
            ``cxrloc prepare`` command that restores the folder the run was trained on.
    """
    if not isinstance(recorded, dict):
        return
    now = prepared_identity(prepared_root)
    if "size" in recorded and "size" in now and int(recorded["size"]) != int(now["size"]):
        command = prepare_command(prepared_root, size=int(recorded["size"]), out=prepared_root) + " --rebuild"
        raise CxrlocError(
            f"{run_path} was trained on {prepared_root} at {recorded['size']} px, but that folder now caches its "
            f"images at {now['size']} px (prepared again since); its numbers would be on other pixels. Prepare it "
            f"again at the run's size: {command} (or prepare the new size into another folder)"
        )
    for key, what in (("ids_sha256", "image list"), ("tables_sha256", "set of tables")):
        if key in recorded and key in now and recorded[key] != now[key]:
            raise CxrlocError(
                f"{run_path} was trained on {prepared_root}, but that folder was prepared again since from another "
                f"{what}; prepare the data the run was trained on again (the command is under 'parameters' in its "
                "fingerprint.json, with --rebuild), or train a new run on it"
            )


def check_reprepare(out: Path, *, size: int, tables: dict[str, Any], folds: int, seed: int, fraction: float,
                    rebuild: bool) -> bool:
    """Refuse to prepare over the finished folder ``out`` with other parameters, unless ``rebuild``.

    Returns:
        True when ``out`` is a finished folder made with other parameters and ``rebuild`` is set:
        the caller then removes its files before preparing.

    Raises:
        CxrlocError: ``out`` holds a finished prepared folder (``fingerprint.json``) made at
            another size or from other tables, or, when its ``splits.json`` is gone, with other folds /
            seed / unannotated fraction (an existing ``splits.json`` is checked by ``prepare`` itself,
            which reuses a hand-made one whatever the options say).
    """
    path = out / "fingerprint.json"
    if not path.is_file():
        return False
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
        params = fp["parameters"]
        old = {"--size": int(params["size"]), "--folds": int(params["folds"]), "--seed": int(params["seed"]),
               "--unannotated-fraction": float(params["unannotated_fraction"])}
        old_tables = _tables(fp.get("inputs"))
    except (OSError, ValueError, KeyError, TypeError):
        return bool(rebuild)
    new = {"--size": size, "--folds": folds, "--seed": seed, "--unannotated-fraction": float(fraction)}
    if (out / "splits.json").is_file():
        # The folds are the folder's splits.json, which prepare reuses and checks against the options
        # itself (a hand-made one whatever they say): only what changes the pixels is compared here.
        new = {"--size": size}
    changed = [f"{k} {old[k]:g} -> {new[k]:g}" for k in new if old[k] != new[k]]
    if _digest(old_tables) != _digest(_tables(tables)):
        changed.append("other tables")
    if not changed:
        return False
    if rebuild:
        return True
    raise CxrlocError(
        f"{out} is a finished prepared folder made with other parameters ({', '.join(changed)}); runs trained on it "
        "would silently use the new pixels. Write to another --out, delete it, or pass --rebuild to replace it (runs "
        "trained on the old folder will then refuse it)"
    )


def check_prepared_for_run(prepared: Any, cfg: Any, fold_dir: Any = None) -> None:
    """``train``'s checks of its prepared folder against the run (before anything is written).

    Args:
        prepared: the opened :class:`cxrloc.data.prepared.Prepared`.
        cfg: the run's configuration (its ``image_size``).
        fold_dir: the :class:`cxrloc.rundir.FoldDir` being resumed (its ``run.json`` is compared
            with the folder), or None for a new run.

    Raises:
        CxrlocError: the cache is smaller than the network's input (its pixels would be enlarged:
            a blurred copy, not the data), or the folder changed since the resumed run was trained.
    """
    if prepared.size < cfg.image_size:
        target = Path(prepared.root).parent / f"{Path(prepared.root).name}_{cfg.image_size}px"
        raise CxrlocError(
            f"{prepared.root} caches its images at {prepared.size} px, smaller than the network's input "
            f"(image_size={cfg.image_size}): training would enlarge blurred pixels. Prepare the data at that size: "
            f"{prepare_command(prepared.root, size=cfg.image_size, out=target)}, or train at the cache's size with "
            f"--set image_size={prepared.size}"
        )
    if fold_dir is not None and fold_dir.run_json.is_file():
        run = fold_dir.read_run()
        check_prepared_identity(prepared.root, run.get("prepared"), fold_dir.path)


_OWN_OPTIONS: tuple[str, ...] = ("--size", "--out", "-o")
"""Options of a recorded command that :func:`prepare_command` replaces."""


def prepare_command(prepared: str | os.PathLike[str], *, size: int, out: str | os.PathLike[str]) -> str:
    """The shell command that prepares the data of the folder ``prepared`` again at ``size`` into ``out``.

    Made from the arguments recorded in its ``fingerprint.json`` (paths as they were given when it
    was prepared); a folder prepared before they were recorded gets its image folders and NIH's
    default tables.
    """
    try:
        fp = read_json(Path(prepared) / "fingerprint.json", "fingerprint")
    except CxrlocError:
        fp = {}
    params = fp.get("parameters") if isinstance(fp, dict) else None
    args = params.get("command") if isinstance(params, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        inputs = fp.get("inputs") if isinstance(fp, dict) else None
        folders = inputs.get("image_folders") if isinstance(inputs, dict) else None
        folders = [str(f) for f in folders] if isinstance(folders, list) and folders else ["DATA_DIR"]
        args = ["cxrloc", "prepare", folders[0], *[a for f in folders[1:] for a in ("--images", f)]]
    kept: list[str] = []
    skip = False
    for a in args:  # a command recorded since 0.x carries its own --size and --out
        if skip:
            skip = False
        elif a in _OWN_OPTIONS:
            skip = True
        else:
            kept.append(a)
    return shlex.join([*kept, "--size", str(size), "--out", str(out)])
