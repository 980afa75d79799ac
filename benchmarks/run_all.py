"""`make bench`: every benchmark, one after another, each printing its ratios and writing JSON.

    python -m benchmarks.run_all                 # paper-size models (real FLOPs; builds them once, 5.9 GB)
    python -m benchmarks.run_all --size tiny     # the tiny models (~15 minutes on 2 CPU cores)
    python -m benchmarks.run_all --smoke-test    # tiny, one row / a few steps each: checks the code paths
    python -m benchmarks.run_all --table outputs/bench/gpu   # one table of the ratios in a folder of JSON reports

``--size`` goes to every benchmark (bench_predict runs on the tiny models either way and says so);
every other argument is passed through unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import bench_back_translation, bench_predict, bench_serve, bench_train

BENCHMARKS = {"back_translation": bench_back_translation, "train": bench_train, "serve": bench_serve,
              "predict": bench_predict}


def split_args(argv: list[str]) -> tuple[str, list[str]]:
    """``--size`` (default paper, tiny with --smoke-test) and the arguments every benchmark gets."""
    parser = argparse.ArgumentParser(prog="benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "paper"), default=None)
    known, rest = parser.parse_known_args(argv)
    size = known.size or ("tiny" if "--smoke-test" in rest else "paper")
    return size, ["--size", size, *rest]


def flat_numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """Every number in a report, nested keys joined with dots."""
    numbers: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            numbers.update(flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = float(value)
    return numbers


def table(folder: str | Path) -> str:
    """A Markdown table of every ratio (a key holding ``ratio``) in the folder's ``*.json`` reports;
    each report's first row also lists its goals (keys holding ``goal``) and its load average at
    start and end."""
    lines = ["| benchmark | ratio | value | goals | load start -> end |", "|---|---|---:|---|---|"]
    for path in sorted(Path(folder).glob("*.json")):
        report = json.loads(path.read_text())
        numbers = flat_numbers(report)
        goals = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in numbers.items() if "goal" in k)
        load = " -> ".join(f"{report[k]['load_avg'][0]:.2f}" for k in ("machine_before", "machine_after")
                           if isinstance(report.get(k), dict) and report[k].get("load_avg"))
        ratios = [(k, v) for k, v in numbers.items() if "ratio" in k and "goal" not in k]
        for i, (key, value) in enumerate(ratios or [("(no ratio)", float("nan"))]):
            lines.append(f"| {path.stem} | {key} | {value:.3f} | {goals if i == 0 else ''} | {load if i == 0 else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--table"]:
        if len(argv) != 2:
            print("usage: python -m benchmarks.run_all --table FOLDER (a folder of the benchmarks' JSON reports)",
                  file=sys.stderr)
            return 2
        print(table(argv[1]))
        return 0
    size, args = split_args(argv)
    failed = []
    for name, module in BENCHMARKS.items():
        print(f"\n##### benchmark: {name} (size {size})", flush=True)
        code = module.main(list(args))
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
