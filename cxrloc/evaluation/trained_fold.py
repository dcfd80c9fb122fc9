"""A trained fold opened for threshold fitting or evaluation: run.json, prepared data, model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrloc.checkpoint import load_model
from cxrloc.config import Config
from cxrloc.data.identity import check_prepared_identity
from cxrloc.data.prepared import Prepared
from cxrloc.rundir import FoldDir


@dataclass
class TrainedFold:
    """What ``fit-thresholds`` and ``evaluate`` need of one ``RUN_DIR/fold_K``."""

    fold_dir: FoldDir
    run: dict[str, Any]
    """``run.json`` (checked)."""
    prepared: Prepared
    model: torch.nn.Module
    meta: dict[str, Any]
    cfg: Config
    checkpoint: Path

    @classmethod
    def open(cls, fold_dir: FoldDir | str | Path, *, device: str = "cpu", which: str = "best") -> TrainedFold:
        fd = fold_dir if isinstance(fold_dir, FoldDir) else FoldDir(Path(fold_dir))
        run = fd.read_run()
        prepared = Prepared.open(run["prepared_dir"])
        check_prepared_identity(prepared.root, run.get("prepared"), fd.path)
        ckpt = fd.existing_checkpoint(which)
        model, meta, cfg = load_model(ckpt, device=device)
        return cls(fd, run, prepared, model, meta, cfg, ckpt)

    @property
    def fold(self) -> Any:
        return self.run.get("fold", self.fold_dir.name.split("_", 1)[-1])

    def ids(self, key: str) -> list[str]:
        """``train_ids``, ``val_ids`` or ``test_ids`` of ``run.json`` as strings (``[]`` when absent)."""
        return [str(i) for i in self.run.get(key, [])]
