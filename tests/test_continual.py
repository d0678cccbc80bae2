"""Continued runs without Ray: run.init_from (a 2-rank ZeRO-3 checkpoint into 1 rank under ZeRO-1, and a Hugging
Face folder) in the gloo tier, its preflight errors, train.steps raised under budget-bound and budget-free
schedules, and the anneal branch's job."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from gloo import build, global_batch, job, run_group, train
from raypt import config
from raypt.config import ConfigError


def pretrain_zero3(rank: int, world: int, out_dir: str) -> dict:
    from raypt.checkpoint import TrainState, save_checkpoint

    cfg = job(3)
    task, engine = build(cfg, world, rank)
    train(task, engine, range(1, 4))
    save_checkpoint(engine, os.path.join(out_dir, "zero3"), TrainState(step=3, tokens_seen=999, world_size=world),
                    {}, cfg.model_dump(mode="json"), cfg.trajectory())
    return {}


def continue_zero1(rank: int, world: int, out_dir: str) -> dict:
    """Start ZeRO-1 runs from the checkpoint (keep and reset) and from the HF folder: each one's loss on a batch
    before any step, its Adam state and counters."""
    from raypt.checkpoint.init import initial
    from raypt.engines.base import MOMENTS

    out = {}
    for name, folder, optimizer in (("keep", "zero3", "keep"), ("reset", "zero3", "reset"), ("hf", "hf", "reset")):
        source = initial(os.path.join(out_dir, folder), folder, optimizer)
        task, engine = build(job(1), world, rank, source)
        loss = engine.eval_step({"input_ids": global_batch(7)}, task.loss)[0].item()
        adam = engine._base().state.values()  # before any step a fresh Adam holds nothing
        moments = sum(float(s[k].abs().sum()) for s in adam for k in MOMENTS if k in s)
        out[name] = {"loss": loss, "moments": moments, "adam_steps": engine.optimizer_steps(),
                     "state": [source.state.step, source.state.tokens_seen], "hooks": source.hooks}
    return out


@pytest.fixture(scope="module")
def continued(tmp_path_factory) -> tuple[dict, float]:
    """(what each continued run saw, the source model's own loss on the same batch)."""
    from raypt.checkpoint import load_weights
    from raypt.tasks import get_task

    out = str(tmp_path_factory.mktemp("continual"))
    run_group(2, pretrain_zero3, out)
    task = get_task("clm")(job(0), {"text": {"vocab_size": 64, "seq_len": 16, "eos_id": 0}})
    model = task.build_model(seed=1)  # other initial weights: what is loaded must replace all of them
    load_weights(model, os.path.join(out, "zero3"))
    model.save_pretrained(os.path.join(out, "hf"), safe_serialization=True)
    with torch.no_grad():
        reference = task.loss(model.eval(), {"input_ids": global_batch(7)})[0].item()
    return run_group(1, continue_zero1, out)[0], reference


@pytest.mark.slow  # the gloo groups take ~17 s; the fast tier stays under two minutes
@pytest.mark.parametrize("name", ["keep", "reset", "hf"])
def test_init_from_starts_at_the_source_models_loss(continued, name):
    got, reference = continued
    assert abs(got[name]["loss"] - reference) <= 1e-4, (got[name]["loss"], reference)
    assert got[name]["state"] == [0, 0] and got[name]["hooks"] == {}  # a new run: counters at 0, no hook state


@pytest.mark.slow
def test_init_from_keeps_adam_or_starts_it_afresh(continued):
    got, _ = continued
    assert got["keep"]["adam_steps"] == 3 and got["keep"]["moments"] > 0
    assert got["reset"]["adam_steps"] == 0 and got["reset"]["moments"] == 0
    assert got["hf"]["adam_steps"] == 0 and got["hf"]["moments"] == 0


def export_like(folder, make_job) -> str:
    """A Hugging Face folder of the tiny job's model, as `raypt export` writes one."""
    from raypt.data.manifest import read_manifest
    from raypt.tasks import by_modality, get_task

    cfg = make_job()
    get_task("clm")(cfg, by_modality([read_manifest(cfg.data.path)])).build_model(0).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("overrides,expected", [
    (["model.hidden_size=64"], ["run.init_from", "model.embed_tokens.weight: the job's model has [512, 64]",
                                "has [512, 32]"]),
    (["model.num_layers=1"], ["run.init_from", "tensors the model has no parameter for", "model.layers.1."]),
    (["run.init_from.optimizer=keep"], ["run.init_from", "optimizer: keep", "holds no optimizer state",
                                        "optimizer: reset"]),
])
def test_init_from_that_does_not_fit_is_refused_before_any_cluster_work(make_job, tmp_path, overrides, expected):
    hf = export_like(tmp_path / "hf", make_job)
    with pytest.raises(ConfigError) as err:
        make_job(f"run.init_from.path={hf}", f"run.name=misfit-{len(overrides[0])}", *overrides)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_init_from_names_what_it_expected(make_job, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a raypt checkpoint .* nor a Hugging Face folder"):
        make_job(f"run.init_from={tmp_path}/empty")
    with pytest.raises(ConfigError, match="run.init_from.path: .* is not a folder"):
        make_job(f"run.init_from={tmp_path}/gone")
    assert make_job(f"run.init_from={export_like(tmp_path / 'hf', make_job)}").run.init_from.optimizer == "reset"


def fake_run(make_job, tmp_path, name: str, step: int, *overrides: str) -> config.JobConfig:
    """A run folder with its config.yaml and one committed (empty) checkpoint at `step`, as the driver reads them."""
    from raypt.continual import train_plan

    cfg = make_job(f"run.name={name}", f"run.storage={tmp_path}", *overrides)
    folder = tmp_path / name
    (folder / f"step{step:06d}").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    body = {"format": 2, "files": {}, "tensors": {}, "step": step, "tokens_seen": train_plan(cfg).tokens_before(step),
            "config": cfg.model_dump(mode="json"), "trajectory": cfg.trajectory()}
    (folder / f"step{step:06d}" / "raypt_state.json").write_text(json.dumps(body))
    return cfg


@pytest.mark.parametrize("schedule,step,steps,refused", [
    ("cosine", 20, 40, True),  # finished: the LR would jump from its minimum back up the cosine
    ("cosine", 10, 40, True),  # mid-run: the rest of the cosine is stretched, its next value moves
    ("wsd", 20, 40, True),  # finished, at the end of its decay
    ("wsd", 8, 40, False),  # still at the peak: WSD's point is that the stable phase extends
    ("constant", 20, 40, False),
    ("infinite", 20, 40, False),  # in its constant phase
])
def test_more_steps_refused_where_the_schedule_would_jump(make_job, tmp_path, schedule, step, steps, refused):
    from raypt.driver import check_resumable

    cfg = fake_run(make_job, tmp_path, f"ext-{schedule}-{step}", step, "train.steps=20",
                   f"train.schedule.name={schedule}")
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
    if not refused:
        assert check_resumable(longer).endswith(f"step{step:06d}")
        return
    with pytest.raises(ConfigError) as err:
        check_resumable(longer)
    for part in ("train.steps: 40", "a run of 20 steps", f"'{schedule}'", f"at step {step + 1}",
                 f"run.init_from={tmp_path}/ext-{schedule}-{step}/step{step:06d}"):
        assert part in str(err.value), part


def test_anneal_branch_forks_the_constant_phase_into_its_own_run(make_job, tmp_path):
    from raypt.continual import anneal_branch, train_plan

    main = fake_run(make_job, tmp_path, "inf", 30, "train.steps=30", "train.schedule.name=infinite",
                    "train.schedule.warmup=0.1", "train.schedule.cooldown=0.2")
    plan, per_step = train_plan(main), train_plan(main).tokens_before(1)
    branch = anneal_branch(str(tmp_path / "inf"), 5 * per_step)
    s = branch.train.schedule
    assert branch.run.name == "inf-anneal-30" and branch.run.resume_from == str(tmp_path / "inf" / "step000030")
    assert branch.train.steps == 35 and branch.run.storage == main.run.storage
    assert (s.warmup_tokens, s.cooldown_tokens) == (3 * per_step, 6 * per_step)  # pinned: steps moved, phases not
    assert (s.anneal_start_tokens, s.anneal_tokens) == (30 * per_step, 5 * per_step)
    total, main_total = plan.tokens_before(35), plan.tokens_before(30)
    for step in range(1, 31):  # the main run's curve up to the fork
        tokens = plan.tokens_before(step)
        assert s.value(tokens, total, 1.0) == main.train.schedule.value(tokens, main_total, 1.0)
    assert s.value(plan.tokens_before(35), total, 1.0) == pytest.approx(main.train.schedule.min_lr_ratio)
    assert anneal_branch(str(tmp_path / "inf"), per_step, name="cool", overrides=["scaling.workers=1"]
                         ).run.name == "cool"


def test_anneal_branch_is_refused_off_the_constant_phase(make_job, tmp_path):
    from raypt.continual import anneal_branch

    fake_run(make_job, tmp_path, "early", 4, "train.steps=30", "train.schedule.name=infinite")
    with pytest.raises(ConfigError, match="before the constant phase"):
        anneal_branch(str(tmp_path / "early"), 100)
    fake_run(make_job, tmp_path, "cos", 4, "train.steps=30")
    with pytest.raises(ConfigError, match="'cosine'.*main run on the infinite schedule"):
        anneal_branch(str(tmp_path / "cos"), 100)
