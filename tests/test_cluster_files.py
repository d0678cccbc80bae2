"""cluster/: the launch files pass Ray's and KubeRay's checks, and every raypt command in them fits its cluster."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raypt import config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def raypt_jobs(text: str) -> list[config.JobConfig]:
    """Each `raypt train|submit JOB override...` in the text (comment markers and line continuations undone),
    loaded by raypt itself."""
    text = re.sub(r"\\\n", " ", "\n".join(re.sub(r"^\s*#", "", line) for line in text.splitlines()))
    jobs = []
    for job, rest in re.findall(r"raypt (?:train|submit) (jobs/\S+\.yaml)(.*)", text):
        overrides = [a for a in shlex.split(rest, comments=True) if re.match(r"[a-z_]+(\.[a-z_]+)+=", a)]
        jobs.append(config.load(ROOT / job, overrides, check_data=False))
    return jobs


def kuberay_spec(name: str) -> dict:
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[name]
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def gpu_groups(spec: dict) -> list[tuple[int, int, int, dict]]:
    """(minReplicas, maxReplicas, GPUs per pod, pod spec) of each worker group that requests GPUs."""
    out = []
    for g in spec["workerGroupSpecs"]:
        gpus = int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        if gpus:
            out.append((g["minReplicas"], g["maxReplicas"], gpus, g["template"]["spec"]))
    return out


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_file_passes_rays_own_validation(name):
    """`ray up` fills defaults (prepare_config) and checks ray-schema.json (validate_config) before any cloud call."""
    validate_config(prepare_config(load(name)))


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(gpu_nodes=4),
    lambda c: c.update(max_workers="four"),
    lambda c: c["available_node_types"]["gpu_spot"].pop("node_config"),
    lambda c: c["available_node_types"]["gpu_spot"].update(min_workers=9),
], ids=["unknown-top-level-key", "wrong-type", "required-field-missing", "min-workers-over-max-workers"])
def test_validation_rejects_a_broken_launcher_file(break_it):
    """The validation above has teeth: a broken file fails it."""
    cfg = load("aws.yaml")
    break_it(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_has_what_kuberay_requires(name):
    """Head and worker groups with rayStartParams (strings only), containers with an image, an autoscaler, GPUs."""
    spec = kuberay_spec(name)
    assert spec["enableInTreeAutoscaling"] is True
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["template"]["spec"]["containers"][0]["image"]
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    assert gpu_groups(spec), "no worker group requests nvidia.com/gpu"


def test_rayjob_entrypoint_is_one_plain_command():
    """KubeRay pastes the entrypoint into the submitter's shell line: `&&`, `;` or `|` would run outside the job."""
    job = load("kuberay-rayjob.yaml")["spec"]
    assert not re.search(r"&&|;|\|", job["entrypoint"]) and job["shutdownAfterJobFinishes"] is True
    assert len(raypt_jobs(job["entrypoint"])) == 1


@pytest.mark.parametrize("name", [*LAUNCHER, *KUBERAY])
def test_raypt_workers_range_fits_the_cluster(name):
    """The autoscaler's GPU range covers each job's scaling.workers range; GPUs forced on; shared storage; and on
    Kubernetes a grace period longer than failure.sigterm_grace_s."""
    if name in LAUNCHER:
        cfg = load(name)
        gpu_types = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
        low = sum(t.get("min_workers", 0) * t["resources"]["GPU"] for t in gpu_types)
        high = sum(min(t["max_workers"], cfg["max_workers"]) * t["resources"]["GPU"] for t in gpu_types)
        graces = []
    else:
        groups = gpu_groups(kuberay_spec(name))
        low, high = sum(lo * g for lo, _, g, _ in groups), sum(hi * g for _, hi, g, _ in groups)
        graces = [pod.get("terminationGracePeriodSeconds", 30) for *_, pod in groups]
    text = load(name)["spec"]["entrypoint"] if KUBERAY.get(name) == "RayJob" else (CLUSTER / name).read_text()
    jobs = raypt_jobs(text)
    assert jobs, f"{name} names no raypt job it is meant to serve"
    for job in jobs:
        w = job.scaling.workers
        w_min, w_max = (w, w) if isinstance(w, int) else (w.min, w.max)
        assert low <= w_min <= w_max <= high, f"{name}: cluster GPUs {low}..{high}, raypt workers {w_min}..{w_max}"
        assert job.scaling.use_gpu is True
        assert "://" in job.run.storage and "://" in job.data.path
        assert all(g > job.failure.sigterm_grace_s for g in graces), f"{name}: grace {graces} s, raypt needs more"


def test_readme_commands_are_valid_jobs_that_fit():
    """The README's shell blocks are raypt jobs raypt accepts, sized for the 2..4-GPU clusters beside it."""
    blocks = "\n".join(re.findall(r"```sh\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S))
    jobs = raypt_jobs(blocks)
    assert len(jobs) == 3
    assert all((j.scaling.workers.min, j.scaling.workers.max) == (2, 4) and j.scaling.use_gpu is True for j in jobs)


def test_files_pin_the_ray_version_raypt_runs_on():
    """Images and rayVersion name the installed Ray (raypt pins ray 2.60.x): a mismatched head and client fail."""
    for path in CLUSTER.iterdir():
        text = path.read_text()
        for version in re.findall(r"rayproject/ray:([\d.]+)", text) + re.findall(r'rayVersion: "([^"]+)"', text):
            assert version == ray.__version__, f"{path.name}: Ray {version}"
