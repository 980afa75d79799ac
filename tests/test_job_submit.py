"""`ray job submit` works against a real Ray head, exactly as on a cluster.

A head is started with `ray start --head --block` in its own process group, on free loopback ports
and a private temp dir, and is only spoken to over the job-submission HTTP API, so it is independent
of any `ray.init` cluster in the same pytest process. A tiny job is shipped with
``runtime_env={"working_dir": <repo>}`` (the iterate-on-code mode of cluster/README.md), must reach
SUCCEEDED, and must have written its outputs.

Teardown stops only this head: SIGTERM to its `ray start --block` process, which shuts its own Ray
processes down, then SIGKILL to its process group if anything is left. `ray stop` is deliberately
not used: it kills every Ray process on the machine, including other tests' clusters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 60  # generous: 2 shared cores can be slow; a healthy start takes ~10 s
JOB_TIMEOUT_S = 90  # a healthy run takes ~10 s (upload, runtime env, 4 s of work)
# Upload only the code and configs; the working dir must stay small and free of local state.
EXCLUDES = [
    ".venv",
    ".cache",
    ".git",
    ".pytest_cache",
    ".ruff_cache",
    "outputs",
    "mlruns",
    "*.db",
    "runs",
    "artifacts",
    "screenshots",
]
PORT_FLAGS = [
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def head_environment() -> dict[str, str]:
    """The head's environment: the job's `python` must be this venv's (ENVIRONMENT.md)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never join a cluster someone else pointed us at
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a test head has nothing to drain
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def stop_head(proc: subprocess.Popen, grace_s: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()  # `ray start --block` kills the Ray processes it started, then exits
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers in the group this test created
    except ProcessLookupError:
        pass
    proc.wait(5)


def wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path) -> JobSubmissionClient:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            return client
        except Exception as exc:  # not up yet: connection refused, 5xx while starting
            if time.monotonic() > deadline:
                pytest.fail(
                    f"dashboard at {address} not up after {HEAD_START_TIMEOUT_S}s ({exc}):\n"
                    f"{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)


@pytest.fixture
def job_client():
    """A JobSubmissionClient for a fresh local head; the head is stopped afterwards, always."""
    temp_dir = Path(tempfile.mkdtemp(prefix="tmrjob", dir="/tmp"))  # short: Unix socket paths ≤ 107 chars
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            env=head_environment(),
            cwd=temp_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield wait_for_dashboard(f"http://127.0.0.1:{ports['--dashboard-port']}", proc, log)
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(client: JobSubmissionClient, timeout_s: float = 20, **job) -> str:
    """Submit under a fixed id, retrying while the head's job agent is still coming up.

    A fresh head can answer list_jobs before its job agent accepts submissions (an HTTP 5xx);
    the fixed id makes a retry after a half-failed request safe.
    """
    job_id = f"tmr-submit-test-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(submission_id=job_id, **job)
        except RuntimeError as exc:
            try:
                client.get_job_status(job_id)
                return job_id  # the request did create the job
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"could not submit the job for {timeout_s}s: {exc}") from exc
            time.sleep(1)


def wait_until_finished(client: JobSubmissionClient, job_id: str, timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return status
        time.sleep(0.5)
    return status


def test_ray_job_submit_runs_a_job_from_the_working_dir(job_client, tmp_path):
    out = tmp_path / "benchmark"
    job_id = submit(
        job_client,
        entrypoint=(
            "python -m jobs.make_synthetic_benchmark "
            f"--config configs/make_synthetic_benchmark.tiny.yaml --out {out}"
        ),
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
    )
    status = wait_until_finished(job_client, job_id, JOB_TIMEOUT_S)
    logs = job_client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-4000:]}"
    # It ran the uploaded copy of the repo, not this checkout in place.
    info = job_client.get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith("gcs://"), info.runtime_env
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.yaml", "ner/train.txt", "ner/valid.txt", "ner/test.txt"} <= written, sorted(written)[:20]
    assert any(name.startswith("images/") and name.endswith(".png") for name in written), sorted(written)[:20]
    assert (out / "ner" / "train.txt").stat().st_size > 0
    # The saved config is the one the job resolved: the command-line override reached it.
    assert yaml.safe_load((out / "config.yaml").read_text())["out"] == str(out)
