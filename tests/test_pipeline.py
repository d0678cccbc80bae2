"""The pipeline engine in the gloo tier: DeepSpeed's pipeline engine over a tiny Llama against ZeRO-0 data
parallelism of the same model, seed and data (2 stages on 2 ranks, 2 stages x 2 replicas on 4), with and without
tied embeddings; and every pipeline job the engine cannot run, refused with the field named before any cluster
work."""
from __future__ import annotations

import os

import pytest

from gloo import TEXT, build, global_batch, job, run_group, train

STEPS = 4


def losses(rank: int, world: int, out_dir: str, stages: int, tie: bool) -> list[float]:
    cfg = job(0, steps=STEPS, stages=stages, workers=world, tie_embeddings=tie)
    task, engine = build(cfg, world, rank)
    return train(task, engine, range(1, STEPS + 1))


@pytest.mark.parametrize("world, stages, tie", [(2, 2, False), (4, 2, True), (3, 3, False)])
def test_pipeline_trains_as_data_parallel(tmp_path, world, stages, tie):
    """2 stages on 2 ranks, 2 x 2 on 4 (tied embeddings on the first and last stage), 3 stages on 3 (the middle
    one reads no data) against as many data-parallel ranks."""
    runs = {}
    for s in (1, stages):
        os.makedirs(out := str(tmp_path / f"stages{s}"))
        runs[s] = run_group(world, losses, out, stages=s, tie=tie)
    assert all(r == runs[stages][0] for r in runs[stages]), "every rank reports the step's loss"
    assert runs[stages][0][0] > runs[stages][0][-1], "it learns"
    for step, (dp, pipe) in enumerate(zip(runs[1][0], runs[stages][0]), 1):
        assert abs(dp - pipe) <= 1e-4, (step, dp, pipe)


def test_pipeline_ranges_in_whole_replicas_are_accepted():
    from raypt.config import JobConfig

    cfg = JobConfig.model_validate({"model": {"task": "clm", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
                                    "deepspeed": {"zero_stage": 1}, "pipeline": {"stages": 2},
                                    "scaling": {"workers": {"min": 2, "max": 6}}, "train": {"global_batch": 12}})
    assert cfg.scaling.world_sizes() == [2, 3, 4, 5, 6]  # Ray Train's range; raypt/elastic.py takes 2, 4 or 6


@pytest.mark.parametrize("overrides, message", [
    ({"deepspeed": {"zero_stage": 2}}, "deepspeed.zero_stage: 2 cannot run with pipeline.stages 2"),
    ({"deepspeed": {"zero_stage": 3}}, "deepspeed.zero_stage: 3 cannot run with pipeline.stages 2"),
    ({"scaling": {"workers": 3}}, "scaling.workers: 3 is not a multiple of pipeline.stages (2)"),
    ({"scaling": {"workers": {"min": 2, "max": 5}}}, "scaling.workers.max: 5 is not a multiple of pipeline.stages"),
    ({"pipeline": {"stages": 6}, "scaling": {"workers": 6}}, "pipeline.stages: 6 is more than the model's 5"),
    ({"pipeline": {"partition": "type:("}}, "pipeline.partition: 'type:(' is not a valid regular expression"),
    ({"pipeline": {"partition": "profile"}}, "pipeline.partition: 'profile' is not one of parameters, uniform"),
    ({"model": {"task": "mae"}}, "pipeline.stages: 2 needs a task with a pipeline form (clm); model.task mae"),
])
def test_invalid_pipeline_jobs_are_refused_naming_the_field(overrides, message):
    from pydantic import ValidationError

    from raypt.config import JobConfig

    base = {"model": {"task": "clm", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
            "deepspeed": {"zero_stage": 1}, "scaling": {"workers": 2}, "pipeline": {"stages": 2},
            "train": {"global_batch": 12}}
    for key, value in overrides.items():
        base[key] = value if key == "model" else {**base[key], **value}
    with pytest.raises(ValidationError) as err:
        JobConfig.model_validate(base)
    assert message in str(err.value), str(err.value)


def save(rank: int, world: int, out_dir: str, stages: int) -> dict:
    """4 steps, a checkpoint after step 2; a pipeline's last stage also gives its logits of the first rows."""
    from raypt.checkpoint import TrainState, save_checkpoint

    cfg = job(0 if stages > 1 else 2, steps=STEPS, stages=stages, workers=world)
    task, engine = build(cfg, world, rank)
    losses = train(task, engine, range(1, 3))
    save_checkpoint(engine, os.path.join(out_dir, f"stages{stages}"), TrainState(step=2, world_size=world), {},
                    cfg.model_dump(mode="json"), cfg.trajectory())
    out = {}
    if stages > 1:  # the saved weights' logits
        rows = global_batch(0)[:engine.split.micro]
        _, logits = engine.ds.eval_batch(iter([engine._micro({"input_ids": rows, "weight": 1.0})]),
                                         num_micro_batches=1, reduce_output=None, bcast_loss=False,
                                         return_logits=True)
        out["logits"] = logits.tolist() if engine.ds.is_last_stage() else None
    return {**out, "losses": losses + train(task, engine, range(3, STEPS + 1))}


def resume(rank: int, world: int, out_dir: str, stages: int, source: int) -> list[float]:
    from raypt.checkpoint import Reader

    cfg = job(0 if stages > 1 else 2, steps=STEPS, stages=stages, workers=world)
    reader = Reader(os.path.join(out_dir, f"stages{source}"))
    task, engine = build(cfg, world, rank, restore=reader)
    return train(task, engine, range(3, STEPS + 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline-checkpoints"))
    return out, {stages: run_group(2, save, out, stages=stages) for stages in (2, 1)}


def test_pipeline_checkpoint_resumes_bit_for_bit(saved):
    out, runs = saved
    assert run_group(2, resume, out, stages=2, source=2)[0] == runs[2][0]["losses"][2:]


def test_pipeline_checkpoint_resumes_as_zero2_and_back_and_at_another_dp_size(saved):
    out, runs = saved
    as_zero = run_group(2, resume, out, stages=1, source=2)[0]
    as_pipeline = run_group(2, resume, out, stages=2, source=1)[0]
    as_two_replicas = run_group(4, resume, out, stages=2, source=2)[0]
    for got, want in ((as_zero, runs[2][0]["losses"][2:]), (as_pipeline, runs[1][0]["losses"][2:]),
                      (as_two_replicas, runs[2][0]["losses"][2:])):
        assert all(abs(a - b) <= 1e-4 for a, b in zip(got, want)), (got, want)


def test_pipeline_checkpoint_exports_to_transformers_with_its_logits(saved, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from raypt.checkpoint import load_weights
    from raypt.tasks import get_task

    out, runs = saved
    cfg = job(0, steps=STEPS, stages=2, workers=2)
    model = LlamaForCausalLM(get_task("clm")(cfg, {"text": TEXT}).hf_config())
    load_weights(model, os.path.join(out, "stages2"))
    model.save_pretrained(tmp_path, safe_serialization=True)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    want = torch.tensor(runs[2][1]["logits"])  # the last stage's (rank 1)
    with torch.no_grad():
        got = hf(input_ids=global_batch(0)[:len(want)]).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
