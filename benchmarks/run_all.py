"""`make bench`: every benchmark, one after another, each printing its ratios and writing JSON.

    python -m benchmarks.run_all                 # full runs (~15 minutes on 2 CPU cores)
    python -m benchmarks.run_all --smoke-test    # one row / a few steps each: checks the code paths
"""

from __future__ import annotations

import sys

from benchmarks import bench_back_translation, bench_predict, bench_serve, bench_train

BENCHMARKS = {"back_translation": bench_back_translation, "train": bench_train, "serve": bench_serve,
              "predict": bench_predict}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    failed = []
    for name, module in BENCHMARKS.items():
        print(f"\n##### benchmark: {name}", flush=True)
        code = module.main(list(argv))
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
