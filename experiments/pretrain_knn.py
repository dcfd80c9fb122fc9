"""k-NN check of backbone weights (e.g. from ``cxrloc pretrain``) on a prepared folder's image labels.

For each weights file (or ``scratch``), the backbone of ``--preset`` (with ``--set``) embeds every
image of one fold (global average pool of its feature map, L2-normalised); each test image gets, per
class, the share of its ``--k`` most similar training images (cosine) that carry the label; the
script prints the AUROC of these scores per boxed class and their mean. No training: a quick way to
see whether pretrained features tell findings apart before spending a ``train`` run on them, and to
compare two pretraining runs. Training images = the fold's ``train_annotated`` + ``train_unannotated``.

Example:
    OMP_NUM_THREADS=1 python experiments/pretrain_knn.py p128_u100 --weights scratch runs/backbone.pt --fold 0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from cxrloc.config import make_config
from cxrloc.data.prepared import Prepared, to_network_range
from cxrloc.evaluation.metrics import auroc_per_class
from cxrloc.model.backbone import create_backbone


@torch.no_grad()
def embed(net: torch.nn.Module, prepared: Prepared, ids: list[str], batch: int = 64) -> torch.Tensor:
    """L2-normalised pooled features ``(N, C)`` of the images ``ids``."""
    out = []
    for i in range(0, len(ids), batch):
        x = np.stack([to_network_range(prepared.image(j)) for j in ids[i : i + batch]])[:, None]
        out.append(net(torch.from_numpy(x)).mean(dim=(2, 3)))
    return F.normalize(torch.cat(out), dim=1)


def knn_scores(train: torch.Tensor, labels: np.ndarray, test: torch.Tensor, k: int) -> np.ndarray:
    """Per test image and class, the share of its ``k`` nearest training images with the label."""
    nearest = (test @ train.t()).topk(min(k, train.shape[0]), dim=1).indices.numpy()
    return labels[nearest].mean(axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared")
    p.add_argument("--weights", nargs="+", default=["scratch"], help="weights files, or 'scratch'")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    prepared = Prepared.open(args.prepared)
    fold = prepared.fold(args.fold)
    train_ids = list(fold["train_annotated"]) + list(fold["train_unannotated"])
    test_ids = list(fold["test"])
    classes = list(prepared.classes)
    boxed = list(prepared.class_list.boxed)
    columns = [classes.index(c) for c in boxed]
    y_train = prepared.label_matrix(train_ids).astype(np.float64)
    y_test = prepared.label_matrix(test_ids)
    print(f"fold {args.fold}: {len(train_ids)} training, {len(test_ids)} test images; k = {args.k}")
    print("weights".ljust(40) + "".join(c[:8].rjust(9) for c in boxed) + "     mean")
    for weights in args.weights:
        cfg = make_config(args.preset, [*args.sets, f"init={weights}"])
        torch.manual_seed(cfg.seed)
        net, _ = create_backbone(cfg.arch, cfg.width, cfg.antialias, cfg.blur_size, cfg.init, cfg.output_stride)
        net.eval()
        scores = knn_scores(embed(net, prepared, train_ids), y_train, embed(net, prepared, test_ids), args.k)
        aucs = auroc_per_class(scores, y_test)[columns]
        print(weights[-40:].ljust(40) + "".join(f"{a:9.3f}" for a in aucs) + f"{np.nanmean(aucs):9.3f}")


if __name__ == "__main__":
    main()
