"""The continual pre-training pipeline, short, on the shared Ray cluster: pre-train on Python (2 workers, ZeRO-3,
the infinite schedule); continue on C/C++ headers through `raypt tune` (two 1-worker ZeRO-1 trials: from the
checkpoint with Adam's state kept, and from the Hugging Face export); branch an anneal off the pre-training run;
then extend that run, which carries on at its constant phase from its own, pre-anneal checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from raypt import config
from raypt.checkpoint import list_checkpoints
from raypt.metrics.sink import read_metrics

PRE = ("run.name=cpt-pre", "train.steps=6", "checkpoint.every=6", "train.eval_every=6", "deepspeed.zero_stage=3",
       "train.schedule.name=infinite", "train.schedule.warmup=0.2", "train.schedule.cooldown=0.3")


@pytest.fixture(scope="module")
def cpp_data(tiny_data, tmp_path_factory) -> str:
    """C/C++ headers in the tiny Python dataset's vocabulary."""
    from raypt.data.prepare import prepare

    path = str(tmp_path_factory.mktemp("data") / "cpp")
    cfg = config.load(None, [f"data.path={path}", "data.prepare.source=cpp-headers", "data.prepare.seq_len=32",
                             f"data.prepare.tokenizer={tiny_data}", "data.prepare.max_bytes=300000",
                             "data.prepare.rows_per_group=64"], check_data=False)
    prepare(cfg.data.path, cfg.data.prepare)
    return path


@pytest.fixture(scope="module")
def pretrained(ray_cluster, make_job) -> tuple[config.JobConfig, str]:
    from raypt.driver import train

    cfg = make_job(*PRE)
    return cfg, train(cfg)


def test_continued_trials_start_at_the_source_models_loss(pretrained, cpp_data, tiny_data, make_job, tmp_path):
    from raypt.tune.run import run_sweep
    from raypt.tune.sweep import load_sweep

    cfg, folder = pretrained
    final = [r for r in read_metrics(folder) if "val_loss" in r][-1]
    assert final["step"] == 6
    job = config.to_dict(make_job("train.steps=3", "train.eval_every=3", "checkpoint.every=3", "scaling.workers=1",
                                  "deepspeed.zero_stage=1", "train.schedule.name=rewarm"))
    job["data"]["sources"] = [{"name": "cpp", "path": cpp_data}, {"name": "python", "path": tiny_data, "weight": 0}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "cpt", "base": str(tmp_path / "job.yaml"), "storage": str(tmp_path / "sweeps"), "search": {},
        "metric": "val_loss/cpp", "concurrency": 1, "variants": {
            "checkpoint": [f"run.init_from={{path: {folder}/step000006, optimizer: keep}}"],
            "export": [f"run.init_from={folder}/export"]}}))
    sweep_folder = run_sweep(*load_sweep(str(sweep_file)))
    trials = sorted(d for d in os.listdir(sweep_folder) if d.startswith("trial-"))
    seen = set()
    for trial in trials:
        variant = json.load(open(os.path.join(sweep_folder, trial, "values.json")))["variant"]
        records = read_metrics(os.path.join(sweep_folder, trial))
        first = records[0]
        assert first["step"] == 0 and first["tokens_seen"] == 0  # a new run: counters from 0
        # The same Python validation batches as the pre-training's last evaluation, at another world size and stage.
        assert abs(first["val_loss/python"] - final["val_loss"]) <= 1e-4, (variant, first, final)
        assert first["val_loss"] == first["val_loss/cpp"] > first["val_loss/python"]  # weight 0: outside the mix
        assert records[-1]["step"] == 3 and "val_loss/cpp" in records[-1]
        seen.add(variant)
    assert seen == {"checkpoint", "export"}
    table = open(os.path.join(sweep_folder, "results.md")).read()
    assert "| variant |" in table.replace("| trial | variant |", "| variant |")


def test_anneal_branch_then_the_main_run_extends_at_its_constant(pretrained):
    from raypt.continual import anneal_branch, train_plan
    from raypt.driver import train

    cfg, folder = pretrained
    per_step = train_plan(cfg).tokens_before(1)
    branch = anneal_branch(folder, 2 * per_step)
    branch_folder = train(branch)
    lrs = {r["step"]: r["lr"] for r in read_metrics(branch_folder) if "lr" in r}
    peak, s = cfg.train.lr, cfg.train.schedule
    assert lrs[7] == pytest.approx(s.const_lr_ratio * peak * (s.min_lr_ratio / s.const_lr_ratio) ** 0.5)
    assert lrs[8] == pytest.approx(s.min_lr_ratio * peak)
    assert [c.rsplit("/", 1)[-1] for c in list_checkpoints(branch_folder)][-1] == "step000008"
    assert [c.rsplit("/", 1)[-1] for c in list_checkpoints(folder)] == ["step000006"]  # the main run untouched

    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 8})})
    records = read_metrics(train(longer))
    resumed = [r for r in records if r.get("resumed_from") == 6]
    assert resumed and resumed[0]["step"] == 7  # from its own step-6 checkpoint, not the branch's
    assert [r["lr"] for r in records if r["step"] in (7, 8) and "lr" in r] == [s.const_lr_ratio * peak] * 2
