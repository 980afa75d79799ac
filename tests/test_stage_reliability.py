"""Generation under failure: a killed actor, a rerun, a node added or removed mid-job.

Each scenario runs ``jobs.generate_back_translations`` in a thread while the main thread disturbs
the cluster, then checks every row came out exactly once and every image file is whole.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.test_stage_jobs import TINY_GENERATION, read_table, stage_models  # noqa: F401  (fixture)
from tmr_core.schema import base_schema

WORDS = "Taylor Swift wins the award at a music show in New York with her band tonight".split()
ACTOR_CLASS = "GenerateBackTranslations"


def write_input(folder: Path, n: int) -> Path:
    """A one-split NER table of ``n`` distinct sentences."""
    rows = []
    for i in range(n):
        tokens = [WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 4)] + [f"#{i}"]
        rows.append({"id": f"s{i:03d}", "split": "test", "task": "ner", "tokens": tokens, "tags": ["O"] * len(tokens),
                     "image_id": f"s{i:03d}", "image_uri": None})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=base_schema("ner")), folder / "test.parquet")
    return folder


class JobThread(threading.Thread):
    """Runs a job's ``main(argv)`` in the background and keeps its return value or exception."""

    def __init__(self, main, argv):
        super().__init__(daemon=True)
        self.main, self.argv, self.result, self.error = main, argv, None, None

    def run(self):
        try:
            self.result = self.main(self.argv)
        except BaseException as exc:  # re-raised in the test thread by finish()
            self.error = exc

    def finish(self, timeout: float) -> int:
        self.join(timeout)
        assert not self.is_alive(), f"job still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(condition, timeout: float, what: str, job: JobThread | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job is None or job.is_alive() or job.error is None, f"job failed while waiting for {what}: {job.error}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def pngs(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.png"))


def generation_argv(model: str, inp: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--input", str(inp), "--output", str(out), "--cache_uri", str(cache), "--generation.model", model,
            *TINY_GENERATION, *extra]


def assert_every_row_once_and_images_whole(out: Path, cache: Path, n: int) -> pa.Table:
    table = read_table(out / "test")
    ids = table.column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    assert table.column("back_translation_error").null_count == n
    uris = table.column("back_translation_uri").to_pylist()
    assert len(set(uris)) == n and sorted(Path(u) for u in uris) == pngs(cache)
    for uri in uris:
        with Image.open(uri) as image:
            image.load()  # raises on a truncated file
    assert not list(cache.rglob("*.tmp-*")), "a half-written image was left behind"
    return table


def generation_actor_pids() -> list[int]:
    """Pids of the generation actors of *this* test session's cluster: Ray titles a worker process
    ``ray::<actor class>``, and our raylet's workers descend from this process (the state API would
    need the dashboard, and other Ray instances may run on the machine). Linux /proc."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # the process ended while we looked

    def descends_from_us(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, title in titles.items() if ACTOR_CLASS in title and descends_from_us(pid)]


# --------------------------------------------------------------------------- kill and rerun


@pytest.fixture(scope="module")
def killed_run(stage_models, tmp_path_factory):  # noqa: F811
    """A generation job of 24 rows whose actor process is SIGKILLed after its first batch."""
    from jobs import generate_back_translations
    from tests.fixtures.ray_cluster import ensure_local_ray

    ensure_local_ray()
    root = tmp_path_factory.mktemp("killed")
    inp, out, cache, n = write_input(root / "in", 24), root / "out", root / "cache", 24
    argv = generation_argv(stage_models["text_to_image"], inp, out, cache, "--compute.batch_size", "2")
    job = JobThread(generate_back_translations.main, argv)
    job.start()
    wait_for(lambda: len(pngs(cache)) >= 2, 120, "the first batch", job)
    pids = generation_actor_pids()
    assert pids, "no generation actor found"
    os.kill(pids[0], signal.SIGKILL)
    killed_with = len(pngs(cache))
    assert job.finish(240) == 0
    return {"input": inp, "output": out, "cache": cache, "n": n, "argv": argv, "killed_with": killed_with}


def test_killed_actor_job_finishes_with_every_row_exactly_once(killed_run):
    assert killed_run["killed_with"] < killed_run["n"], "the job ended before the kill"
    assert_every_row_once_and_images_whole(killed_run["output"], killed_run["cache"], killed_run["n"])
    marker = json.loads((killed_run["output"] / "_SUCCESS.json").read_text())
    assert marker["rows"] == {"test": killed_run["n"]}
    summary = marker["summary"]
    # the killed batch was retried on the restarted actor; images it had written are cache hits
    assert summary["generated"] + summary["cached"] == killed_run["n"] and summary["failed"] == 0


def test_rerun_writes_nothing_new_and_yields_the_same_table(killed_run, capsys):
    from jobs import generate_back_translations

    before = {p: p.stat().st_mtime_ns for p in pngs(killed_run["cache"])}
    first = read_table(killed_run["output"] / "test")
    # up to date: nothing runs
    assert generate_back_translations.main(killed_run["argv"]) == 0
    assert "up to date" in capsys.readouterr().out
    # forced: the job runs, every image is a cache hit, and no generation actor starts
    assert generate_back_translations.main([*killed_run["argv"], "--force", "true"]) == 0
    out = capsys.readouterr().out
    assert f"generated 0 | cached {killed_run['n']} | failed 0" in out
    assert f"0 of {killed_run['n']} rows need an image" in out
    summary = json.loads((killed_run["output"] / "_SUCCESS.json").read_text())["summary"]
    assert summary["to_generate"] == 0 and "rows_per_node" not in summary  # only actors report a node
    assert {p: p.stat().st_mtime_ns for p in pngs(killed_run["cache"])} == before
    assert read_table(killed_run["output"] / "test").equals(first)


# --------------------------------------------------------------------------- elasticity


def _elastic_argv(model: str, root: Path, n: int) -> list[str]:
    return generation_argv(model, write_input(root / "in", n), root / "out", root / "cache",
                           "--compute.batch_size", "2", "--compute.min_actors", "1", "--compute.max_actors", "2",
                           "--compute.num_cpus", "0.5", "--compute.num_gpus", "1",
                           "--compute.accelerator_resource", "fake_gpu")


def test_pool_grows_onto_a_node_added_mid_job(ray_multinode, stage_models, tmp_path):  # noqa: F811
    from jobs import generate_back_translations

    cluster, n, batch = ray_multinode, 24, 2
    first = cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})
    job = JobThread(generate_back_translations.main, _elastic_argv(stage_models["text_to_image"], tmp_path, n))
    job.start()
    # An actor runs one batch at a time: once the second batch's first image exists, the first
    # batch has come back from the first node's actor, so that node holds rows whatever follows.
    wait_for(lambda: len(pngs(tmp_path / "cache")) > batch, 120, "the first batch", job)
    frozen = generation_actor_pids()
    assert len(frozen) == 1, f"expected one actor before the node is added, found {frozen}"
    # Freeze it (a slow GPU) before the node exists: its queued batches keep the pool's
    # utilisation high, and only an actor on the added node can make progress from here on.
    os.kill(frozen[0], signal.SIGSTOP)
    try:
        done = len(pngs(tmp_path / "cache"))
        second = cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})
        wait_for(lambda: len(pngs(tmp_path / "cache")) >= done + batch, 180, "a batch from the added node", job)
        grown = set(generation_actor_pids()) - set(frozen)
    finally:
        os.kill(frozen[0], signal.SIGCONT)
    assert grown, "new images appeared but no second actor process did"
    assert job.finish(240) == 0
    assert_every_row_once_and_images_whole(tmp_path / "out", tmp_path / "cache", n)
    per_node = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["summary"]["rows_per_node"]
    assert set(per_node) == {first.node_id, second.node_id}, per_node
    assert sum(per_node.values()) == n and per_node[first.node_id] >= batch and per_node[second.node_id] >= batch


def test_every_row_once_when_a_node_is_removed_mid_job(ray_multinode, stage_models, tmp_path):  # noqa: F811
    from jobs import generate_back_translations

    cluster, n = ray_multinode, 24
    cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})
    doomed = cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})
    job = JobThread(generate_back_translations.main, _elastic_argv(stage_models["text_to_image"], tmp_path, n))
    job.start()
    wait_for(lambda: len(pngs(tmp_path / "cache")) >= 4, 120, "the first batches", job)
    cluster.remove_node(doomed)  # a preempted spot node: its actor dies with it
    assert job.finish(240) == 0
    assert_every_row_once_and_images_whole(tmp_path / "out", tmp_path / "cache", n)
