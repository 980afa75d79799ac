"""`make test` leaves the work tree as it found it; an empty comparison still names its columns.

Intended writes, left out of the check: `.venv/` and `*.egg-info/` (`make install`),
`.cache/tmr-models/` (the tiny models, built once and shared with `make demo`), and Python's and
the tools' own caches (`__pycache__/`, `.pytest_cache/`, `.ruff_cache/`). Everything else a test
writes goes under its temporary folder: MLflow stores and artifacts (a sqlite store keeps its
experiments' artifacts beside it: `jobs._tracking.ensure_experiment`), job outputs, Ray storage.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

from jobs import compare_runs

REPO = Path(__file__).resolve().parents[1]
INTENDED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", os.path.join(".cache", "tmr-models")}


def work_tree_state(root: Path = REPO) -> dict[str, tuple[int, int]]:
    """Every untracked or ignored file under ``root`` outside the intended caches, with its mtime
    and size, and the untracked and ignored lines of ``git status --porcelain --ignored``.

    git shows an ignored folder that already exists once, not what changes inside it (a new run
    under an existing ``mlruns/``), so the files themselves are compared too. Tracked files are
    left to git's own review: jobs write new files, and source edits made meanwhile are not theirs.
    """
    tracked = set(subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split("\0"))
    state: dict[str, tuple[int, int]] = {}
    for folder, subfolders, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        subfolders[:] = [name for name in subfolders
                         if name not in INTENDED and os.path.normpath(os.path.join(relative, name)) not in INTENDED
                         and not name.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            if os.path.relpath(path, root) in tracked:
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:  # removed while walking: it is not there afterwards
                continue
            state[os.path.relpath(path, root)] = (stat.st_mtime_ns, stat.st_size)
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for line in status:
        top = line[3:].split("/")[0]
        if line[:2] in ("??", "!!") and top not in INTENDED and not top.endswith(".egg-info") and not line[3:].startswith(".cache/tmr-models"):
            state.setdefault("git status: " + line, (0, 0))
    return state


def changes(before: dict, after: dict) -> list[str]:
    return sorted([f"new {p}" for p in after.keys() - before.keys()] + [f"gone {p}" for p in before.keys() - after.keys()]
                  + [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]])


def run_compare_runs(tmp_path: Path, monkeypatch) -> int:
    """A job the tests start, run as they run it: from the repo root, into a fresh sqlite store."""
    monkeypatch.chdir(REPO)  # where `make test` runs; MLflow's default artifact root is relative to it
    return compare_runs.main(["--output", str(tmp_path / "comparison"),
                              "--tracking.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])


def test_a_job_the_tests_start_leaves_the_work_tree_as_it_was(tmp_path, monkeypatch):
    before = work_tree_state()
    assert run_compare_runs(tmp_path, monkeypatch) == 0
    assert changes(before, work_tree_state()) == []
    # the comparison run's artifacts (tables, plots) went beside its database, in tmp_path
    logged = list((tmp_path / "mlruns").rglob("comparison.md"))
    assert len(logged) == 1, sorted(str(p) for p in tmp_path.rglob("*"))


def test_an_empty_comparison_still_prints_and_writes_its_headers(tmp_path, capsys, monkeypatch):
    assert run_compare_runs(tmp_path, monkeypatch) == 0  # a fresh store: no run matches
    printed = capsys.readouterr().out
    assert "| task | ablation | seeds | valid F1 (best epoch) | test F1 |" in printed
    assert "| task | dataset | ablation | train fraction | runs | test F1 |" in printed
    assert "| MDE objective | runs | in domain F1 | out of domain F1 |" in printed
    assert printed.count("(no finished runs)") == 3
    for name in ("ablations", "low_resource", "mde_table3"):
        with open(tmp_path / "comparison" / f"{name}.csv", newline="") as handle:
            rows = list(csv.reader(handle))
        assert len(rows) == 1 and rows[0][0] in ("task", "loss"), (name, rows)


def test_the_empty_ablation_csv_has_the_columns_of_a_filled_one():
    def run(ablation: str, seed: str, f1: float) -> compare_runs.RunRecord:
        tags = {"tmr.task": "ner", "tmr.dataset": "synthetic", "tmr.ablation": ablation, "tmr.seed": seed}
        return compare_runs.RunRecord(f"{ablation}{seed}", "tmr-ner", tags, {"test_f1": f1, "best_valid_f1": f1})

    runs = [run("full", "0", 0.9), run("full", "1", 0.8), run("text_only", "0", 0.7), run("text_only", "1", 0.6)]
    rows = compare_runs.flatten_estimates(compare_runs.ablation_rows(runs, "test_f1", "test_ambiguous_f1"))
    assert list(rows[-1]) == compare_runs.ablation_csv_header("test_f1", "test_ambiguous_f1")
