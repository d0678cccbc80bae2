"""The gloo tier: the ZeRO engine strategy and checkpoints across stages and world sizes, without Ray.

One group of 2 ranks trains each ZeRO stage and saves at step 2 (with a hook's tensors and dict); groups of 1, 3
and 4 ranks resume each checkpoint under another stage and must continue as the uninterrupted run did (among
them ZeRO-3 resumed as ZeRO-1 on 3 ranks and ZeRO-0 as ZeRO-3 on 4). Checksums: a run's newest checkpoint,
damaged in ways only its CRC-32s or headers reveal, is skipped by every rank for the previous one.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from gloo import FROZEN, build, frozen_values, job, run_group, train
from raypt.hooks import Hook, Hooks

STAGES = (0, 1, 2, 3)
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint_v1")


class Probe(Hook):
    """A test hook that keeps tensors and a dict in the checkpoint."""

    name = "probe"

    def __init__(self) -> None:
        self.tensors = {"mask": torch.arange(10) % 3 == 0, "counts": torch.tensor([7, 8, 9])}
        self.extra = {"seen": [1, 2], "phase": "warm"}
        self.restored: dict = {}

    def state(self):
        return self.tensors, self.extra

    def restore(self, tensors, state):
        self.restored = {"tensors": {k: v.tolist() for k, v in tensors.items()}, "state": state}


def save_every_stage(rank: int, world: int, out_dir: str) -> dict:
    from raypt.checkpoint import TrainState, save_checkpoint

    out = {}
    for stage in STAGES:
        cfg = job(stage)
        task, engine = build(cfg, world, rank, frozen=True)
        losses = train(task, engine, range(1, 3))
        hooks = Hooks()
        hooks.add(Probe())
        save_checkpoint(engine, os.path.join(out_dir, f"zero{stage}"), TrainState(step=2, world_size=world),
                        hooks.states(), cfg.model_dump(mode="json"), cfg.trajectory())
        out[stage] = losses + train(task, engine, range(3, 5))
        if stage == 3:  # fp32 masters share the working partitions' storage through steps and a save
            opt = engine.ds.optimizer
            out["shared"] = [m is w for w, m in
                             zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat)]
    return out


def resume_every_stage(rank: int, world: int, out_dir: str, shift: int) -> dict:
    from raypt.checkpoint import Reader

    out = {}
    for saved in STAGES:
        reader = Reader(os.path.join(out_dir, f"zero{saved}"))
        task, engine = build(job((saved + shift) % 4), world, rank, reader, frozen=True)
        hooks, probe = Hooks(), Probe()
        hooks.add(probe)
        hooks.start(None, reader)
        frozen = {s.start: s.master.tolist() for s in engine.shards() if s.name == FROZEN}
        out[saved] = {"losses": train(task, engine, range(3, 5)), "probe": probe.restored,
                      "world_size": reader.state.world_size, "frozen": frozen}
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("gloo"))
    return out, run_group(2, save_every_stage, out)[0]


def test_zero_stages_train_alike(saved):
    _, losses = saved
    reference = losses["0"]
    assert reference[-1] < reference[0]
    for stage in STAGES[1:]:
        assert max(abs(a - b) for a, b in zip(reference, losses[str(stage)])) <= 1e-5, stage
    assert losses["shared"] and all(losses["shared"]), losses["shared"]  # no second fp32 copy of the model


@pytest.mark.parametrize("world,shift", [(1, 1), (3, 2), pytest.param(4, 3, marks=pytest.mark.slow)])
def test_checkpoint_resumes_at_another_world_size_and_stage_with_hook_state(saved, world, shift):
    out, losses = saved
    got = run_group(world, resume_every_stage, out, shift=shift)
    for stage in STAGES:
        mine = got[0][str(stage)]
        assert mine["world_size"] == 2
        uninterrupted = losses[str(stage)][2:]
        assert max(abs(a - b) for a, b in zip(mine["losses"], uninterrupted)) <= 1e-5, (stage, world)
        for rank in range(world):  # every rank gets the hook's whole state back
            probe = got[rank][str(stage)]["probe"]
            assert probe["state"] == {"seen": [1, 2], "phase": "warm"}
            assert probe["tensors"] == {"mask": [i % 3 == 0 for i in range(10)], "counts": [7, 8, 9]}
        # the frozen weights come back (not the zeros the resumed build starts them at), each rank's share
        held = [(int(start), v) for rank in got for start, v in rank[str(stage)]["frozen"].items()]
        expected = frozen_values(saved=True).tolist()
        assert all(v == expected[start:start + len(v)] for start, v in held), (stage, world, held)
        assert {start + i for start, v in held for i in range(len(v))} == set(range(len(expected)))


def offload_or_not(rank: int, world: int, out_dir: str) -> dict:
    """The same steps with the optimizer in device memory and offloaded to CPU (DeepSpeed's CPU Adam), ZeRO-2
    and 3 (ZeRO-3 offloads the parameters too)."""
    return {f"{stage}-{offload}": train(*build(job(stage, offload), world, rank), range(1, 5))
            for stage in (2, 3) for offload in ("none", "cpu")}


@pytest.mark.slow
def test_cpu_offload_trains_like_the_resident_optimizer(tmp_path):
    got = run_group(2, offload_or_not, str(tmp_path))[0]
    for stage in (2, 3):
        resident, offloaded = got[f"{stage}-none"], got[f"{stage}-cpu"]
        assert abs(resident[0] - offloaded[0]) <= 1e-5  # the same weights before the first update
        assert max(abs(a - b) for a, b in zip(resident, offloaded)) <= 1e-3  # CPU Adam vs torch's AdamW


def load_format_1(rank: int, world: int, out_dir: str) -> dict:
    """The kept checkpoint from before the index: every tensor reaches the engine exactly."""
    from raypt.checkpoint import Reader
    from raypt.config import JobConfig
    from raypt.engines import Topology, select
    from raypt.tasks import get_task

    reader = Reader(FIXTURE)
    cfg = JobConfig.model_validate({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
                                    "train": {"global_batch": 8, "micro_batch": 2}, "deepspeed": {"zero_stage": 3}})
    model = get_task("clm")(cfg, {"text": {"vocab_size": 512, "seq_len": 32, "eos_id": 0}}).build_model(0)
    engine = select(cfg).build(model, cfg, Topology.data_parallel(world, rank), reader)
    kinds = {kind: reader.tensors(kind) for kind in ("param", "exp_avg", "exp_avg_sq")}
    diffs = [(kinds[key.split("/", 1)[0]][key.split("/", 1)[1]] - value).abs().max().item()
             for key, owner, value in engine.state_tensors() if value is not None]
    return {"format": reader.format, "step": reader.state.step, "optimizer_steps": reader.optimizer_steps,
            "compared": len(diffs), "max_diff": max(diffs, default=0.0)}


def test_format_1_checkpoint_still_loads(tmp_path):
    got = run_group(2, load_format_1, str(tmp_path))
    assert all(r["format"] == 1 and r["step"] == 3 and r["optimizer_steps"] == 3 for r in got)
    assert sum(r["compared"] for r in got) == 3 * len(Reader_keys()) and all(r["max_diff"] == 0 for r in got)


def Reader_keys() -> list[str]:
    from raypt.checkpoint import Reader

    return list(Reader(FIXTURE).tensors("param"))


def bf16_round_trip(rank: int, world: int, out_dir: str) -> dict:
    """bf16 on CPU, under ZeRO-2 (DeepSpeed's fp32 fragments) and ZeRO-3 (partitions): train, save, restore into
    a fresh engine; the fp32 masters and the bf16 working copy must come back bit for bit."""
    from deepspeed.utils import safe_get_full_fp32_param

    from raypt.checkpoint import Reader, TrainState, save_checkpoint

    out = {}
    for stage in (2, 3):
        cfg = job(stage)
        cfg = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"precision": "bf16"})})
        task, engine = build(cfg, world, rank)
        train(task, engine, range(1, 3))
        folder = os.path.join(out_dir, f"bf16-zero{stage}")
        save_checkpoint(engine, folder, TrainState(step=2, world_size=world), {}, cfg.model_dump(mode="json"),
                        cfg.trajectory())
        torch.distributed.barrier()  # rank 0 writes the index last
        reader = Reader(folder)
        _, restored = build(cfg, world, rank, reader)
        saved = reader.tensors("param")
        params = list(restored.ds.module.named_parameters())
        masters = [(safe_get_full_fp32_param(p).float() - saved[n]).abs().max().item() for n, p in params]
        working = [(p.detach().float() - saved[n].bfloat16().float()).abs().max().item()
                   for n, p in params if stage < 3]  # ZeRO-3 keeps only partitions between forwards
        out[stage] = {"masters": max(masters), "working": max(working, default=0.0),
                      "dtype": str(params[0][1].dtype)}
    return out


@pytest.mark.slow  # bf16 on CPU is slow: with the Ray tier, so the fast tier stays under two minutes
def test_bf16_masters_restore_bit_for_bit(tmp_path):
    for rank in run_group(2, bf16_round_trip, str(tmp_path)):
        for stage, got in rank.items():
            assert got == {"masters": 0.0, "working": 0.0, "dtype": "torch.bfloat16"}, (stage, got)


# --- checksummed checkpoints ------------------------------------------------------------------------------------
def flip_byte(path: str) -> None:
    """One byte in the middle of the file (tensor data) inverted; the size stays, so only a checksum tells."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


def cut_header(path: str) -> None:
    """The safetensors header cut short mid-JSON, the rest of it zeroed: same size, no longer parses."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        f.seek(8 + length // 2)
        f.write(bytes(length - length // 2))


# run folder -> (file of its step-4 checkpoint, damage)
DAMAGES = {"intact": (None, None), "flipped": ("state-00001-of-00002.safetensors", flip_byte),
           "header": ("state-00000-of-00002.safetensors", cut_header)}


def save_two_checkpoints(rank: int, world: int, out_dir: str) -> list[float]:
    """A ZeRO-1 run that commits checkpoints at steps 2 and 4 into a run folder and trains on to step 6."""
    from raypt.checkpoint import TrainState, save_checkpoint

    cfg = job(1, steps=6)
    task, engine = build(cfg, world, rank)
    losses = []
    for step in (2, 4):
        losses += train(task, engine, range(step - 1, step + 1))
        folder = os.path.join(out_dir, "run", f"step{step:06d}")
        save_checkpoint(engine, folder, TrainState(step=step, world_size=world), {}, cfg.model_dump(mode="json"),
                        cfg.trajectory())
    return losses + train(task, engine, range(5, 7))


def resume_newest_verified(rank: int, world: int, out_dir: str) -> dict:
    """Each run folder restored as the worker loop restores: the newest checkpoint every rank verifies."""
    from raypt.checkpoint import newest_verified

    out = {}
    for run in DAMAGES:
        said: list[str] = []
        with newest_verified(os.path.join(out_dir, run), None, said.append) as reader:
            task, engine = build(job(1), world, rank, reader)
            step = reader.state.step
        out[run] = {"step": step, "said": said, "losses": train(task, engine, range(step + 1, 7))}
    return out


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[str, list[float]]:
    out = str(tmp_path_factory.mktemp("gloo-crc"))
    losses = run_group(2, save_two_checkpoints, out)[0]
    for run, (name, damage) in DAMAGES.items():
        shutil.copytree(os.path.join(out, "run"), os.path.join(out, run))
        if damage:
            damage(os.path.join(out, run, "step000004", name))
    return out, losses


def test_damaged_newest_checkpoint_falls_back_on_every_rank(two_checkpoints):
    out, uninterrupted = two_checkpoints
    got = run_group(2, resume_newest_verified, out)
    for run, (name, _) in DAMAGES.items():
        step = 4 if name is None else 2
        for rank in got:
            assert rank[run]["step"] == step, run  # both ranks, together
            assert rank[run]["losses"] == uninterrupted[step:], run
            if name is None:
                assert rank[run]["said"] == []
            else:
                [line] = rank[run]["said"]
                assert f"{run}/step000004/{name}" in line and "falling back" in line, line


def test_reader_names_the_file_whose_checksum_differs(two_checkpoints):
    out, _ = two_checkpoints
    from raypt.checkpoint import CheckpointError, Reader

    Reader(os.path.join(out, "intact", "step000004")).verify()
    with pytest.raises(CheckpointError, match=r"state-00001-of-00002\.safetensors has CRC-32 \w+, committed as"):
        Reader(os.path.join(out, "flipped", "step000004")).verify()


def test_format_1_checkpoint_with_an_unreadable_header_falls_back(tmp_path):
    """Format 1 has no checksums; a shard whose header does not parse is still skipped for the previous one."""
    from raypt.checkpoint import newest_verified

    for step in ("step000003", "step000005"):
        shutil.copytree(FIXTURE, tmp_path / step)
    cut_header(str(tmp_path / "step000005" / "state-00001-of-00002.safetensors"))
    said: list[str] = []
    with newest_verified(str(tmp_path), None, said.append) as reader:
        assert reader.directory == str(tmp_path / "step000003") and reader.format == 1
        assert set(reader.tensors("param")) == set(Reader_keys())
    [line] = said
    assert "step000005/state-00001-of-00002.safetensors is unreadable" in line


def test_resume_from_that_does_not_verify_is_refused(tmp_path):
    """A fork from a damaged checkpoint must fail, not start fresh."""
    from raypt.checkpoint import CheckpointError, newest_verified

    shutil.copytree(FIXTURE, tmp_path / "source")
    cut_header(str(tmp_path / "source" / "state-00000-of-00002.safetensors"))
    with pytest.raises(CheckpointError,
                       match=r"run\.resume_from=.*source/state-00000-of-00002\.safetensors is unreadable"):
        with newest_verified(str(tmp_path / "run"), str(tmp_path / "source"), print):
            pass


