"""One embedded Ray cluster and one tiny prepared dataset for the whole suite."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Token authentication on, as Ray 2.60 heads started with `ray start` require; read once when ray is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # fits end ~2 s sooner
warnings.filterwarnings("ignore", category=DeprecationWarning)

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "data.prepare.max_bytes=400000", "data.prepare.vocab_size=512", "data.prepare.seq_len=32",
    "data.prepare.rows_per_group=64", "train.global_batch=8", "train.micro_batch=2", "train.eval_every=4",
    "train.eval_batches=2", "train.lr=3e-3", "checkpoint.every=3", "deepspeed.zero_stage=2", "scaling.workers=2",
]


# Test modules that start Ray nodes of their own.
RAY_MODULES = {"test_elastic", "test_job_submit"}


def pytest_collection_modifyitems(items):
    """Everything that needs Ray is marked `ray`; the rest (config, schedules, data order, the gloo-tier engine
    and checkpoint matrix) is `make test-fast`, which CI runs first."""
    for item in items:
        if "ray_cluster" in item.fixturenames or item.module.__name__ in RAY_MODULES:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True, scope="module")
def no_stale_cluster_marker(request):
    """Nodes started with `ray start` or ray.cluster_utils can leave /tmp/ray/ray_current_cluster behind once
    stopped. Every State API client of the suite's own cluster then resolves that dead address: Ray Train's
    placement-group cleaner crashed on it and the placement groups of trials Tune stopped were never released,
    so later trials waited forever. After a module that starts nodes of its own, none is left."""
    yield
    marker = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if request.module.__name__ in RAY_MODULES and os.path.exists(marker):
        os.remove(marker)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, reached through the standard AWS environment, which the
    embedded cluster's workers inherit because this runs before it starts."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):  # bounded wait for the server to accept connections
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="raypt-test-key",
                      AWS_SECRET_ACCESS_KEY="raypt-test-secret", AWS_DEFAULT_REGION="us-east-1")
    yield url
    server.terminate()
    server.wait()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    from raypt.driver import init_ray

    init_ray()
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    from raypt import config
    from raypt.data.prepare import prepare

    path = str(tmp_path_factory.mktemp("data") / "stdlib")
    cfg = config.load(None, TINY + [f"data.path={path}"], check_data=False)
    prepare(cfg.data.path, cfg.data.prepare)
    return path


@pytest.fixture(scope="session")
def make_job(tiny_data, tmp_path_factory):
    """Build a validated tiny job: make_job('train.steps=6', ...); runs go to one session folder."""
    from raypt import config

    storage = tmp_path_factory.mktemp("runs")

    def make(*overrides: str):
        return config.load(None, TINY + [f"data.path={tiny_data}", f"run.storage={storage}", *overrides])

    return make
