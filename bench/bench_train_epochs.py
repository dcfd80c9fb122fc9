"""Images per second per core of whole ``cxrloc train`` epochs, of two (or more) versions side by side.

Each version is a source tree of cxrloc (a git worktree: ``git worktree add /tmp/speed_base 71069ac``)
with optional ``--set`` overrides. Every round trains every version once, in turn, in a fresh
subprocess with that tree first on ``PYTHONPATH`` and ``OMP_NUM_THREADS=1``, on the same prepared
folder, fold and seed: ``cxrloc.training.loop.train`` as ``cxrloc train`` calls it (data loader,
augmentation warp, sampler, training steps, validation, metrics and checkpoints), with ``workers=0``
so that the loader's work is in the measured process too. The subprocess times each epoch with
``time.process_time`` (its CPU time: with one thread, the time of one core, nearly unaffected by other
jobs that share the machine) from the start of one epoch to the start of the next (the last epoch
ends when ``train`` returns, after its checkpoint is written), and separately the training steps
alone (``train_one_epoch``). Epochs after the first are summed (the first pays for warm-up and for
any compilation; ``--first`` reports it too). Last, the FLOPs of a unary-stage step per image
(``torch.utils.flop_counter``) and what each version's steps reach in GFLOP/s.

``--stage crf`` or ``--stage joint`` times that stage of ``--stage all`` instead (the PAC-CRF in every
step): a unary run to start from is trained first, once, with the first version (one epoch of
``--max-steps`` steps), and every version's run starts from it (``init_from``).

Each row is the median over rounds of images/s per core; the ratio column is the median over rounds of
each round's ratio to the first version, so that a change of machine load between rounds cancels.

Example:
    git worktree add /tmp/speed_base 71069ac
    cxrloc prepare ../shared/data/nih --out /tmp/speed_prep128 --size 128
    python bench/bench_train_epochs.py /tmp/speed_prep128 --version base=/tmp/speed_base --version new=. \\
        --epochs 3 --max-steps 25 --rounds 3
    python bench/bench_train_epochs.py /tmp/speed_prep128 --version base=/tmp/speed_base \\
        --version "fp32=.:amp=off,channels_last=off" --version new=.
    python bench/bench_train_epochs.py /tmp/speed_prep128 --stage crf --version base=/tmp/speed_base --version new=.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _worker(args: argparse.Namespace) -> None:
    """Train once in this process (its cxrloc comes from PYTHONPATH) and print the epoch timings as JSON."""
    import torch

    import cxrloc
    from cxrloc.config import make_config
    from cxrloc.training import loop

    cfg = make_config(args.preset, [
        f"epochs={args.epochs}", f"max_steps_per_epoch={args.max_steps}", "workers=0", "device=cpu",
        *args.overrides,
    ])
    starts: list[float] = []
    steps_time: list[float] = []
    images: list[int] = []
    inner = loop.train_one_epoch

    def timed_epoch(tr: Any, loader: Any, epoch: int, *rest: Any, **kw: Any) -> dict[str, float]:
        t0 = time.process_time()
        starts.append(t0)
        count = [0]

        class Counted:  # counts the images the epoch really trained on
            def __iter__(self) -> Any:
                for batch in loader:
                    count[0] += len(batch["image"])
                    yield batch

        out = inner(tr, Counted(), epoch, *rest, **kw)
        steps_time.append(time.process_time() - t0)
        images.append(count[0])
        return out

    loop.train_one_epoch = timed_epoch  # type: ignore[assignment]
    loop.train(args.prepared, args.out, fold=args.fold, cfg=cfg, stage=args.stage, init_from=args.init_from,
               progress=False)
    end = time.process_time()
    epoch_time = [b - a for a, b in zip(starts, [*starts[1:], end], strict=True)]
    metrics = (Path(args.out) / f"fold_{args.fold}" / "metrics.csv").read_text().splitlines()
    print(json.dumps({
        "cxrloc": str(Path(cxrloc.__file__).parent.parent),
        "threads": torch.get_num_threads(),
        "epoch_s": epoch_time,
        "steps_s": steps_time,
        "images": images,
        "metrics": metrics,
    }))


def _run(
    label: str, tree: Path, sets: list[str], args: argparse.Namespace, out: Path, stage: str = "unary",
    init_from: Path | None = None,
) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable, str(Path(__file__).resolve()), str(args.prepared), "--worker", "--out", str(out),
        "--fold", str(args.fold), "--epochs", str(args.epochs), "--max-steps", str(args.max_steps),
        "--preset", args.preset, "--stage", stage,
    ]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    for s in [*args.overrides, *sets]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=tree)
    if proc.returncode != 0:
        sys.exit(f"version {label} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["cxrloc"]).resolve() != tree.resolve():
        sys.exit(f"version {label} imported cxrloc from {result['cxrloc']}, not {tree}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared", type=Path, help="a folder written by cxrloc prepare")
    ap.add_argument("--version", action="append", default=[], metavar="LABEL=TREE[:KEY=VALUE,...]",
                    help="a cxrloc source tree to train, with optional config overrides (repeatable; "
                         "the first is the reference of the ratios)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is left out)")
    ap.add_argument("--max-steps", type=int, default=25, help="max_steps_per_epoch of every run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every version (as cxrloc train --set)")
    ap.add_argument("--first", action="store_true", help="also report the first epoch")
    ap.add_argument("--stage", choices=["unary", "crf", "joint"], default="unary",
                    help="the training stage to time (crf / joint: from a unary run trained first)")
    ap.add_argument("--init-from", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if not args.version:
        ap.error("give at least one --version LABEL=TREE")
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (the first epoch is left out)")
    versions = []
    for spec in args.version:
        label, _, rest = spec.partition("=")
        tree, _, sets = rest.partition(":")
        versions.append((label, Path(tree).resolve(), [s for s in sets.split(",") if s]))

    rates: dict[str, dict[str, list[float]]] = {v[0]: {"epoch": [], "steps": [], "first": []} for v in versions}
    last: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_epochs_") as tmp:
        start = None
        if args.stage != "unary":
            start = Path(tmp) / "unary_start"
            label, tree, sets = versions[0]
            _run(label, tree, sets, argparse.Namespace(**{**vars(args), "epochs": 1}), start)
        for r in range(args.rounds):
            for i, (label, tree, sets) in enumerate(versions):
                res = _run(label, tree, sets, args, Path(tmp) / f"r{r}_{i}", args.stage, start)
                n = sum(res["images"][1:])
                rates[label]["epoch"].append(n / sum(res["epoch_s"][1:]))
                rates[label]["steps"].append(n / sum(res["steps_s"][1:]))
                rates[label]["first"].append(res["images"][0] / res["epoch_s"][0])
                last[label] = res
                print(f"round {r + 1} {label}: {rates[label]['epoch'][-1]:.2f} images/s per core "
                      f"(epochs 2..{args.epochs}), steps only {rates[label]['steps'][-1]:.2f}", flush=True)

    import torch

    from cxrloc.precision import cpu_has_native_bf16

    ref = versions[0][0]
    print(f"\n{time.strftime('%Y-%m-%d')} {_cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{'yes' if cpu_has_native_bf16() else 'no'}), torch {torch.__version__}, one thread, process time; "
          f"{args.prepared} "
          f"fold {args.fold}, preset {args.preset} {' '.join(args.overrides)}, stage {args.stage}, "
          f"{args.epochs} epochs of "
          f"{args.max_steps} steps, {args.rounds} rounds; medians")
    first = " first epoch |" if args.first else ""
    print(f"| version | images/s per core, epochs 2+ | x {ref} | training steps only | x {ref} |{first}")
    print(f"|---|---|---|---|---|{'---|' if args.first else ''}")
    for label, tree, sets in versions:
        row = rates[label]
        ratio = [a / b for a, b in zip(row["epoch"], rates[ref]["epoch"], strict=True)]
        ratio_s = [a / b for a, b in zip(row["steps"], rates[ref]["steps"], strict=True)]
        extra = f" {statistics.median(row['first']):.2f} |" if args.first else ""
        name = f"{label} ({tree.name}{': ' + ','.join(sets) if sets else ''})"
        print(f"| {name} | {statistics.median(row['epoch']):.2f} | {statistics.median(ratio):.2f} | "
              f"{statistics.median(row['steps']):.2f} | {statistics.median(ratio_s):.2f} |{extra}")
    for label, res in last.items():
        print(f"{label} last round, metrics.csv: {res['metrics'][-1]}")
    if args.stage != "unary":
        return
    gflop = _unary_step_gflop(args)
    print(f"unary-stage training step: {gflop:.2f} GFLOP per image (torch.utils.flop_counter, forward + backward); "
          + ", ".join(f"{label} {gflop * statistics.median(rates[label]['steps']):.0f} GFLOP/s in its steps"
                      for label, _, _ in versions))


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _unary_step_gflop(args: argparse.Namespace) -> float:
    """FLOPs per image of one unary-stage training step (no CRF forward), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cxrloc.config import make_config
    from cxrloc.model.net import build_model

    cfg = make_config(args.preset, args.overrides)
    model = build_model(cfg).train()
    model.use_crf = False
    x = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        z, unary = model(x)
        (z.sum() + unary.sum()).backward()
    return counter.get_total_flops() / 2 / 1e9


if __name__ == "__main__":
    main()
