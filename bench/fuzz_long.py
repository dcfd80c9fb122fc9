"""The long run of the property-based fuzzer (tests/fuzzing.py): many cases per target, figures printed.

The property: success, or one clear CxrlocError line; never a traceback, never a partial output.
Prints, per target, the cases tried, how many succeeded and how many were refused, and the first
falsifying example of a target that broke the property (hypothesis shrinks it first). Exit 1 when
one did.

    python bench/fuzz_long.py                    # 2,000 cases per target (--examples), about 15-25 min on 2 cores
    python bench/fuzz_long.py --examples 200 --target image --target set
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fuzzing  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TARGETS = {
    "nih": (st.tuples(fuzzing.data_entry(), fuzzing.bbox_list()), lambda c: fuzzing.run_nih(*c)),
    "table": (st.tuples(fuzzing.labels_table(), fuzzing.box_table()), lambda c: fuzzing.run_table(*c)),
    "coco": (fuzzing.coco_file(), fuzzing.run_coco),
    "image": (fuzzing.image_file(), lambda c: fuzzing.run_image(*c)),
    "set": (st.lists(fuzzing.set_item(), min_size=1, max_size=3), fuzzing.run_set),
}


def _property(strategy: st.SearchStrategy, run: Any, examples: int) -> tuple[Any, list[int]]:
    tried = [0]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(case=strategy)
    def prop(case: object) -> None:
        tried[0] += 1
        run(case)

    return prop, tried


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="cases per target")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="targets (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # a library warning is not a failure here; the tests see them
    print(f"# fuzz_long: {args.examples} cases per target, seed {args.seed}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    broken = 0
    for name in args.target or list(TARGETS):
        strategy, run = TARGETS[name]
        prop, tried = _property(strategy, run, args.examples)

        before = dict(fuzzing.OUTCOMES)
        t0 = time.perf_counter()
        failure = ""
        try:
            seed(args.seed)(prop)()
        except Exception as exc:  # the property broke: report the shrunk example
            failure = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
            traceback.print_exc()
            broken += 1
        ok = fuzzing.OUTCOMES[f"{name} ok"] - before.get(f"{name} ok", 0)
        refused = fuzzing.OUTCOMES[f"{name} refused"] - before.get(f"{name} refused", 0)
        print(f"{name:6s} cases {tried[0]:6d}  ok {ok:6d}  refused {refused:6d}  "
              f"{time.perf_counter() - t0:7.1f} s  {'BROKEN: ' + failure if failure else 'property held'}",
              flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
