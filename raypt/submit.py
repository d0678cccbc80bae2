"""`raypt submit`: validate here, run `raypt train` on a Ray cluster through its Job API, follow it to the end."""
from __future__ import annotations

import asyncio
import os
import shlex
import time

from raypt import config

# The code and jobs travel with the job; environments, outputs and data do not (data lives on shared storage).
EXCLUDES = ["runs", "data", "benchmarks/results", "**/__pycache__", "*.egg-info"]  # Ray skips .git, .venv


def entrypoint(job: str, overrides: list[str], cfg: config.JobConfig) -> str:
    """The same job and overrides, with local paths made absolute so the cluster sees the submitter's folders
    (a single-machine or shared-filesystem cluster; point them at s3:// for any other)."""
    pinned = [f"data.path={cfg.data.path}", f"run.storage={cfg.run.storage}"]
    return shlex.join(["raypt", "train", job, *overrides, *pinned])


def submit(job: str, overrides: list[str], address: str | None, follow: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = config.load(job, overrides)
    client = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
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
