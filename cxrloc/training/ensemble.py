"""``cxrloc ensemble``: combine runs of the same recipe (e.g. several training seeds) into one run.

For every fold, the members' ``best.pt`` (or ``last.pt``) go into one checkpoint
``OUT/fold_K/checkpoints/best.pt`` that :func:`cxrloc.checkpoint.load_model` turns into an
:class:`~cxrloc.model.ensemble.EnsembleNet`; ``run.json`` is the members' (they must have been
trained on the same fold with the same training, validation and test images: give runs of several
seeds the same ``--set val_seed``). The result is a run folder like any other: ``evaluate``,
``fit-thresholds``, ``predict`` and ``export`` use it unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cxrloc.checkpoint import load_checkpoint, save_checkpoint
from cxrloc.config import Config
from cxrloc.rundir import FoldDir, RunDir, thresholds_for_checkpoint
from cxrloc.thresholds import Thresholds
from cxrloc.utils import CxrlocError

SHARED_RUN_KEYS: tuple[str, ...] = ("prepared_dir", "fold", "train_ids", "val_ids", "test_ids")
"""``run.json`` entries every member of a fold must share."""

SHARED_CONFIG_KEYS: tuple[str, ...] = ("classes", "image_size", "patch_grid")
"""Config fields every member must share (the class list, the input and the output grid)."""


def make_ensemble(
    runs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    fold: int | str | None = None,
    which: str = "best",
) -> list[Path]:
    """Write the ensemble of ``runs`` into ``out_dir`` for one or every fold; return the fold folders.

    Raises:
        CxrlocError: fewer than two runs, a fold missing from a member, members trained on
            different images or with a different input size / patch grid, or an existing ``out_dir``
            fold.
    """
    from cxrloc.paths import OutputGuard

    if len(runs) < 2:
        raise CxrlocError("An ensemble needs at least two runs.")
    OutputGuard(runs).folder(out_dir, "--out")
    first = RunDir(Path(runs[0])).folds(fold)
    written = []
    for fd in first:
        k = fd.read_run().get("fold")
        members = [fd] + [_member_fold(Path(r), int(k), fd) for r in runs[1:]]
        _check_distinct(members)
        written.append(_ensemble_fold(members, FoldDir.of(out_dir, int(k)), which))
    return written


def _member_fold(path: Path, k: int, first: FoldDir) -> FoldDir:
    """Fold ``k`` of the run folder ``path``, or ``path`` itself when it is a fold folder of fold ``k``."""
    if (path / "run.json").is_file():  # a fold folder, like the first member may be
        got = FoldDir(path).read_run().get("fold")
        if got != k:
            raise CxrlocError(
                f"{path} is fold {got}, but {first.path} is fold {k}: give fold folders of the same fold, or run "
                "folders"
            )
        return FoldDir(path)
    fd = RunDir(path).fold(k)
    if not fd.run_json.is_file():
        raise CxrlocError(f"{path} has no trained fold {k} ({fd.run_json} not found), which {first.path} has")
    return fd


def _check_distinct(members: list[FoldDir]) -> None:
    """Refuse a member listed twice (``ensemble run run``: the mean of one model with itself)."""
    from cxrloc.paths import same_file

    for i, a in enumerate(members):
        for b in members[:i]:
            if same_file(a.path, b.path):
                raise CxrlocError(
                    f"{a.path} is given twice: an ensemble of a run with itself is that run; list distinct runs"
                )


def _ensemble_fold(members: list[FoldDir], out: FoldDir, which: str) -> Path:
    if out.checkpoint("best").exists():
        raise CxrlocError(f"{out.path} already holds a run; choose another --out.")
    runs = [m.read_run() for m in members]
    for key in SHARED_RUN_KEYS:
        if any(r.get(key) != runs[0].get(key) for r in runs[1:]):
            raise CxrlocError(
                f"The runs differ in run.json '{key}' ({members[0].path} vs the others): ensemble runs trained on "
                "the same fold with the same images (for several seeds, give them the same --set val_seed)."
            )
    states, ckpts = [], []
    for m in members:
        ckpt = m.existing_checkpoint(which)
        state = load_checkpoint(ckpt)
        if "ensemble" in state:
            raise CxrlocError(f"{ckpt} is already an ensemble; list its member runs instead.")
        states.append(state)
        ckpts.append(ckpt)
    configs = [Config.from_dict(s["config"]) for s in states]
    for key in SHARED_CONFIG_KEYS:
        if any(getattr(c, key) != getattr(configs[0], key) for c in configs[1:]):
            raise CxrlocError(f"The runs differ in {key}; an ensemble's members must share it.")
    fitted = thresholds_for_checkpoint(ckpts[0])
    thresholds = Thresholds.load(fitted).to_json() if fitted is not None else states[0]["meta"].get("thresholds")
    meta = dict(states[0]["meta"])
    meta["thresholds"] = thresholds
    meta["ensemble"] = {"members": [str(c.resolve()) for c in ckpts], "combination": "mean of z"}
    save_checkpoint(
        out.checkpoint("best"),
        {
            "config": states[0]["config"],
            "meta": meta,
            "ensemble": [{"config": s["config"], "model": s["model"]} for s in states],
        },
    )
    out.write_run({**runs[0], "stage": "ensemble", "members": [str(m.path.resolve()) for m in members],
                   "init_from": None, "thresholds": str(fitted) if fitted else "member 0 checkpoint"})
    return out.path
