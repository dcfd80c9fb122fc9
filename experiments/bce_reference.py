"""A plain image-level classifier as the AUROC reference of issue 19 (part 1).

Same backbone as a preset (``cpu`` by default: narrow anti-aliased ResNet-18, output stride 16,
128 px), same images (a fold's training images of a prepared folder, annotated and unannotated,
minus the same validation carve-out as ``cxrloc train`` with the same ``val_seed``), same
augmentation, same optimiser settings; the network is the backbone + global average pooling + one
linear layer, trained with plain BCE on the image-level labels. It prints the validation AUROC of
each epoch (mean over the 8 boxed classes and over all classes with a positive), and
``--score-run RUN`` prints the same AUROC for a trained cxrloc run's image score ``1'z`` on the same
validation images, so the two can be compared directly.

The backbone of the best epoch (by mean validation AUROC of the boxed classes) is written to
``OUT/backbone.pt`` (a state dict ``cxrloc train --set init=OUT/backbone.pt`` starts from): the
supervised step of ``cxrloc pretrain`` tried on validation images.

Usage:
    python experiments/bce_reference.py PREPARED --fold 0 --out runs/x/bce_f0 [--epochs 16] [--init W]
    python experiments/bce_reference.py PREPARED --fold 0 --score-run runs/x/m_u100_s0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrloc.checkpoint import load_model
from cxrloc.classes import BOXED_CLASSES
from cxrloc.config import make_config
from cxrloc.data.dataset import LocalizationDataset, split_train_val, warp_batch
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.metrics import auroc_per_class
from cxrloc.inference.batch import predict_prepared
from cxrloc.model.backbone import create_backbone


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, channels: int, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean(dim=(2, 3)))


def summary(aucs: np.ndarray, classes: list[str]) -> dict[str, float]:
    boxed = [classes.index(c) for c in BOXED_CLASSES if c in classes]
    return {
        "auroc_boxed": float(np.nanmean(aucs[boxed])),
        "auroc_all": float(np.nanmean(aucs)),
        **{c: float(aucs[i]) for i, c in enumerate(classes)},
    }


def val_labels(prepared: Prepared, ids: list[str]) -> np.ndarray:
    return np.stack([prepared.labels(i) for i in ids]).astype(np.float32)


def score_run(prepared: Prepared, run: Path, fold: int, val_seed: int, val_fraction: float) -> dict[str, float]:
    model, _, cfg = load_model(run / f"fold_{fold}", device="cpu", which="best")
    _, val = split_train_val(prepared, fold, val_fraction, val_seed)
    z = predict_prepared(model, prepared, val, image_size=cfg.image_size, progress=False)
    scores = z.reshape(z.shape[0], z.shape[1], -1).sum(-1)
    return summary(auroc_per_class(scores, val_labels(prepared, val)), list(prepared.classes))


def evaluate(model: Classifier, data: LocalizationDataset, labels: np.ndarray) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(data), 32):
            x = torch.stack([data[i]["image"] for i in range(s, min(s + 32, len(data)))])
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().numpy())
    return auroc_per_class(np.concatenate(out), labels)


def train(args: argparse.Namespace, prepared: Prepared) -> None:
    cfg = make_config(args.preset, [f"seed={args.seed}", f"init={args.init}"] + args.set)
    train_ids, val_ids = split_train_val(prepared, args.fold, cfg.val_fraction, args.val_seed)
    classes = list(prepared.classes)
    backbone, channels = create_backbone(cfg.arch, cfg.width, cfg.antialias, cfg.blur_size, cfg.init,
                                         cfg.output_stride)
    model = Classifier(backbone, channels, len(classes)).to(memory_format=torch.channels_last)
    train_set = LocalizationDataset(prepared, train_ids, cfg, augment=True)
    val_set = LocalizationDataset(prepared, val_ids, cfg, augment=False)
    y_val = val_labels(prepared, val_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, cfg.lr_decay)
    bce = nn.BCEWithLogitsLoss()
    args.out.mkdir(parents=True, exist_ok=True)
    best, log = -1.0, []
    print(f"{len(train_ids)} training, {len(val_ids)} validation images; {args.epochs} epochs", flush=True)
    for epoch in range(args.epochs):
        model.train()
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(len(train_set))
        t0, losses = time.process_time(), []
        for s in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            items = [train_set[(int(i), epoch)] for i in order[s:s + cfg.batch_size]]
            x = torch.stack([it["image"] for it in items])
            x = warp_batch(x, torch.stack([it["theta"] for it in items])).contiguous(
                memory_format=torch.channels_last)
            y = torch.stack([it["labels"] for it in items])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = bce(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        res = summary(evaluate(model, val_set, y_val), classes)
        res.update(epoch=epoch + 1, loss=float(np.mean(losses)), cpu_s=time.process_time() - t0)
        log.append(res)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()
                          if k in ("epoch", "loss", "auroc_boxed", "auroc_all", "cpu_s")}), flush=True)
        if res["auroc_boxed"] > best:
            best = res["auroc_boxed"]
            torch.save(model.backbone.state_dict(), args.out / "backbone.tmp")
            (args.out / "backbone.tmp").replace(args.out / "backbone.pt")
        (args.out / "log.json").write_text(json.dumps(log, indent=1))
    print(f"best validation AUROC (8 boxed classes) {best:.4f}; backbone in {args.out / 'backbone.pt'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--init", default="scratch")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with native bf16)")
    ap.add_argument("--score-run", type=Path, help="print the validation AUROC of a cxrloc run's 1'z instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prepared = Prepared.open(args.prepared)
    if args.score_run:
        print(json.dumps(score_run(prepared, args.score_run, args.fold, args.val_seed, 0.1), indent=1))
        return
    if args.out is None:
        ap.error("--out is required to train")
    torch.manual_seed(args.seed)
    train(args, prepared)


if __name__ == "__main__":
    main()
