"""`raypt submit`: validate here, run `raypt train` on a Ray cluster through its Job API, follow it to the end."""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import time

from raypt import config, preflight

# The code and jobs travel with the job; environments, outputs and data do not (data lives on shared storage).
EXCLUDES = ["runs", "data", "benchmarks/results", "**/__pycache__", "*.egg-info"]  # Ray skips .git, .venv


def entrypoint(job: str, overrides: list[str], cfg: config.JobConfig) -> str:
    """The same job and overrides, with every local path of the job pinned absolute so the cluster sees the
    submitter's folders (a single-machine or shared-filesystem cluster; point them at s3:// for any other)."""
    pinned = [f"{key}={json.dumps(value)}" for key, value in preflight.locations(cfg) if "://" not in value]
    return shlex.join(["raypt", "train", job, *overrides, *pinned])


def uploaded(job: str) -> str:
    """The job file as the cluster finds it: inside this folder (uploaded as the job's working directory) by its
    relative path, elsewhere by its absolute path (a single-machine or shared-filesystem cluster)."""
    inside = os.path.relpath(os.path.abspath(job))
    return os.path.abspath(job) if inside.startswith(".." + os.sep) else inside


def submit(job: str, overrides: list[str], address: str | None, follow: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    preflight.ray_cluster(address, "--address")
    cfg = config.load(job, overrides)
    job = uploaded(job)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:  # something answers there, but not a Ray dashboard (its words)
        raise preflight.Unreachable(f"--address: {address}: {str(e).splitlines()[0]}") from None
    job_id = client.submit_job(
        entrypoint=entrypoint(job, overrides, cfg),
        submission_id=f"raypt-{cfg.run.name}-{int(time.time())}",
        runtime_env={"working_dir": ".", "excludes": EXCLUDES},
    )
    print(f"submitted {job_id}")
    if not follow:
        return 0

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
