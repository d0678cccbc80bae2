"""Sparse pre-training: the density schedule, N_avg and config errors (fast); the distributed threshold against a
single-process sort with ties; and in gloo groups, pruned entries at zero in the masters, the working copy and
both Adam moments under ZeRO 0-3 (and with CPU offload), masks and losses across a resume at another world size."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from gloo import GLOBAL, SEQ, build, job, rank_batches, run_group
from raypt.schema import ConfigError

STEPS = 6
SPARSE = {"final": 0.5, "every": 2, "schedule": {"start": 0.0, "end": 0.5}}


def sparse_job(stage: int, offload: str = "none", **sparsity):
    cfg = job(stage, offload, steps=STEPS)
    return cfg.model_copy(update={"sparsity": type(cfg.sparsity).model_validate({**SPARSE, **sparsity})})


def fake_loop(cfg, engine):
    """What the hook reads of the worker loop: one global batch of GLOBAL x SEQ tokens per step."""
    plan = SimpleNamespace(tokens_before=lambda step: step * GLOBAL * SEQ)
    return SimpleNamespace(cfg=cfg, engine=engine, plan=plan)


def train_pruned(task, loop, hook, steps: range) -> list[float]:
    from raypt.metrics import CORE, Reducer

    reduce, losses = Reducer(CORE), []
    for step in steps:
        hook.before_step(loop, step)
        loss, _ = loop.engine.train_step(rank_batches(step, loop.engine.split, loop.engine.dp_rank), task.loss)
        record = {"loss": reduce({"loss": loss})["loss"]}
        hook.after_step(loop, step, record)
        losses.append(record)
    return losses


def leaks(hook, engine) -> dict:
    """The largest |value| at a pruned entry of the masters, the moments and the working copy on this rank."""
    worst = {"master": 0.0, "moments": 0.0, "working": 0.0, "moment_views": 0}
    for s in engine.shards():
        if s.name not in hook.masks:
            continue
        for kind, views in (("master", [(s.master, s.start)]), ("moments", [(m, s.start) for m in s.moments]),
                            ("working", list(s.working))):
            for view, start in views:
                kept = hook.local(s.name, start, view)
                if view.numel():
                    worst[kind] = max(worst[kind], float(view.detach().float().masked_fill(kept, 0).abs().max()))
        worst["moment_views"] += len(s.moments)
    return worst


def pruned_stages(rank: int, world: int, out_dir: str, stages: list, offload: str, scope: str) -> dict:
    from raypt.hooks.pruning import Pruning

    out = {}
    for stage in stages:
        cfg = sparse_job(stage, offload, scope=scope)
        task, engine = build(cfg, world, rank)
        hook, loop = Pruning(cfg.sparsity), fake_loop(cfg, engine)
        hook.start(loop, None)
        records = train_pruned(task, loop, hook, range(1, STEPS + 1))
        out[stage] = {"records": records, "leaks": leaks(hook, engine), "kept": hook.kept, "size": hook.size,
                      "per_tensor": {n: [int(m.sum()), m.numel()] for n, m in hook.masks.items()}}
    return out


@pytest.mark.parametrize("offload,stages,scope", [("none", [0, 1, 2, 3], "global"),  # ~16 s on 2 busy cores
                                                  pytest.param("cpu", [2, 3], "per_layer", marks=pytest.mark.slow)])
def test_pruned_entries_stay_zero(tmp_path, offload, stages, scope):
    results = run_group(2, pruned_stages, str(tmp_path), stages=stages, offload=offload, scope=scope)
    for stage in map(str, stages):
        for rank in results:
            got = rank[stage]
            assert got["leaks"]["master"] == got["leaks"]["moments"] == got["leaks"]["working"] == 0.0, got
            assert got["leaks"]["moment_views"] > 0
        got = results[0][stage]
        if scope == "global":
            assert got["kept"] == round(0.5 * got["size"])  # exact in count
        else:
            assert all(abs(kept - n / 2) <= 1 for kept, n in got["per_tensor"].values())
        assert got["records"][-1]["density"] == got["kept"] / got["size"]
        assert results[1][stage]["per_tensor"] == got["per_tensor"]  # every rank holds the same masks
        reference = results[0][str(stages[0])]["records"]
        tolerance = 1e-4 if offload == "none" else 1e-3  # DeepSpeed's CPU Adam is not torch's AdamW to the bit
        assert [r["loss"] for r in got["records"]] == pytest.approx([r["loss"] for r in reference], abs=tolerance)


def save_then_continue(rank: int, world: int, out_dir: str) -> dict:
    """Three steps, a checkpoint with the hook's state, three more: the uninterrupted run."""
    from raypt.checkpoint import TrainState, save_checkpoint
    from raypt.hooks import Hooks
    from raypt.hooks.pruning import Pruning

    cfg = sparse_job(2)
    task, engine = build(cfg, world, rank)
    hook, loop, hooks = Pruning(cfg.sparsity), fake_loop(cfg, engine), Hooks()
    hooks.add(hook)
    hooks.start(loop, None)
    first = train_pruned(task, loop, hook, range(1, 4))
    save_checkpoint(engine, os.path.join(out_dir, f"w{world}"), TrainState(step=3, world_size=world),
                    hooks.states(), cfg.model_dump(mode="json"), cfg.trajectory())
    return {"records": first + train_pruned(task, loop, hook, range(4, STEPS + 1)),
            "masks": {n: m.tolist() for n, m in hook.masks.items()}}


def resume(rank: int, world: int, out_dir: str, saved: int) -> dict:
    from raypt.checkpoint import Reader
    from raypt.hooks import Hooks
    from raypt.hooks.pruning import Pruning

    cfg = sparse_job(2)
    reader = Reader(os.path.join(out_dir, f"w{saved}"))
    task, engine = build(cfg, world, rank, reader)
    hook, loop, hooks = Pruning(cfg.sparsity), fake_loop(cfg, engine), Hooks()
    hooks.add(hook)
    hooks.start(loop, reader)
    records = train_pruned(task, loop, hook, range(4, STEPS + 1))
    return {"records": records, "leaks": leaks(hook, engine), "masks": {n: m.tolist() for n, m in hook.masks.items()}}


@pytest.mark.slow
def test_resume_at_another_world_size_keeps_masks(tmp_path):
    out = str(tmp_path)
    uninterrupted = {w: run_group(w, save_then_continue, out)[0] for w in (2, 1)}
    for saved, world in ((2, 1), (1, 2)):
        resumed = run_group(world, resume, out, saved=saved)[0]
        reference = uninterrupted[saved]
        assert resumed["leaks"]["master"] == resumed["leaks"]["working"] == resumed["leaks"]["moments"] == 0.0
        assert resumed["masks"] == reference["masks"]
        for got, want in zip(resumed["records"], reference["records"][3:]):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
            assert got["n_avg"] == want["n_avg"] and got["density"] == want["density"]


# --- the distributed threshold ------------------------------------------------------------------------------
def tied_tensors() -> dict[str, torch.Tensor]:
    """Magnitudes on a coarse grid, so many weights tie at any threshold; sizes that do not split evenly."""
    g = torch.Generator().manual_seed(0)
    return {name: (torch.randint(-6, 7, (n,), generator=g) / 4).float() for name, n in
            (("b.weight", 37), ("a.weight", 50), ("c.weight", 23))}


def reference_prune(tensors: dict, need: list, per_tensor: bool) -> dict:
    """One process, every magnitude sorted by (magnitude, name, index): the first `need` per group go."""
    names = sorted(tensors)
    groups = [[n] for n in names] if per_tensor else [names]
    out = {n: torch.zeros(len(t), dtype=torch.bool) for n, t in tensors.items()}
    for group, count in zip(groups, need if per_tensor else need[:1]):
        order = sorted((float(tensors[n][i].abs()), n, i) for n in group for i in range(len(tensors[n])))
        for _, n, i in order[:count]:
            out[n][i] = True
    return out


def distributed_prune(rank: int, world: int, tensors: dict, need: list, per_tensor: bool) -> dict:
    """This rank's contiguous slice of each tensor, as ZeRO-3 holds it, through `choose`."""
    import torch.distributed as dist

    from raypt.sparsity.threshold import Slice, choose, magnitude_bits

    def reduce(t):
        if world > 1:
            dist.all_reduce(t)
        return t

    names = list(tensors)  # deliberately not sorted: the tie order must not depend on the walk order
    slices = []
    for i, n in enumerate(names):
        size = -(-len(tensors[n]) // world)
        part = tensors[n][rank * size:(rank + 1) * size]
        group = sorted(names).index(n) if per_tensor else 0
        slices.append(Slice(n, group, rank * size, magnitude_bits(part, torch.ones(len(part), dtype=torch.bool))))
    chosen = choose(slices, torch.tensor(need), reduce, rank, world)
    return {n: (s.start, c.tolist()) for n, s, c in zip(names, slices, chosen)}


def threshold_group(rank: int, world: int, out_dir: str, cases: list) -> list:
    tensors = tied_tensors()
    return [distributed_prune(rank, world, tensors, need, per_tensor) for need, per_tensor in cases]


CASES = [([40], False), ([55], False), ([0], False), ([110], False), ([10, 20, 5], True)]


def assemble(ranks: list, tensors: dict) -> list:
    out = []
    for case in range(len(CASES)):
        full = {n: torch.zeros(len(t), dtype=torch.bool) for n, t in tensors.items()}
        for got in ranks:
            for n, (start, mask) in got[case].items():
                full[n][start:start + len(mask)] = torch.tensor(mask, dtype=torch.bool)
        out.append(full)
    return out


def test_threshold_matches_a_single_sort_at_one_rank():
    tensors = tied_tensors()
    got = assemble([[distributed_prune(0, 1, tensors, need, pt) for need, pt in CASES]], tensors)
    for full, (need, per_tensor) in zip(got, CASES):
        want = reference_prune(tensors, need, per_tensor)
        assert all(torch.equal(full[n], want[n]) for n in tensors), (need, per_tensor)


def test_threshold_matches_a_single_sort_at_three_ranks(tmp_path):
    tensors = tied_tensors()
    got = assemble(run_group(3, threshold_group, str(tmp_path), cases=CASES), tensors)
    for full, (need, per_tensor) in zip(got, CASES):
        want = reference_prune(tensors, need, per_tensor)
        assert all(torch.equal(full[n], want[n]) for n in tensors), (need, per_tensor)


# --- fast: schedule, N_avg, config --------------------------------------------------------------------------
def test_n_avg_against_a_hand_count():
    """8 steps of 100 tokens, 100 prunable + 50 other weights, linear to 50% over tokens [200, 600], every 2
    steps: prunes before steps 3 (to 0%), 5 (to 25%) and 7 (to 50%, the window's end), so N_t is 150 x 4 steps,
    125 x 2, 100 x 2 and N_avg = (600 + 250 + 200) / 8 = 131.25."""
    from raypt.sparsity.config import SparsityConfig
    from raypt.sparsity.plan import RunningMean, due, target_keep

    cfg = SparsityConfig.model_validate({"final": 0.5, "every": 2,
                                         "schedule": {"form": "linear", "start": 0.25, "end": 0.75}})
    kept, mean, counts = 100, RunningMean(), []
    for step in range(1, 9):
        tokens = 100 * (step - 1)
        if due(cfg, step, tokens, 800):
            kept = min(kept, target_keep(cfg, 100, tokens, 800))
        counts.append(50 + kept)
        mean.add(50 + kept, 100)
    assert counts == [150] * 4 + [125] * 2 + [100] * 2
    assert mean.value == 131.25
    resumed = RunningMean(**RunningMean(**mean.state()).state())
    assert resumed == mean


def test_a_window_that_ends_with_the_run_reaches_the_final_sparsity_at_its_last_step():
    """8 steps of 100 tokens, linear to 50% over the second half, every 2 steps: events before steps 5 (0%), 7
    (25%) and, the run's last step, 8 (50%): read at step 8's start (700 tokens) it would end at 37.5%."""
    from raypt.sparsity.config import SparsityConfig
    from raypt.sparsity.plan import due, read_at, target_keep

    cfg = SparsityConfig.model_validate({"final": 0.5, "every": 2,
                                         "schedule": {"form": "linear", "start": 0.5, "end": 1.0}})
    kept, counts = 100, []
    for step in range(1, 9):
        tokens = read_at(step, 8, 100 * (step - 1), 800)
        if due(cfg, step, tokens, 800):
            kept = min(kept, target_keep(cfg, 100, tokens, 800))
        counts.append(kept)
    assert counts == [100] * 6 + [75, 50]


@pytest.mark.parametrize("form", ["geometric", "cubic", "linear"])
def test_density_forms_run_from_dense_to_final(form):
    from raypt.schedules import SCHEDULES

    ramp = SCHEDULES["sparsity"].model_validate({"form": form, "start": 0.2, "end": 0.6})
    values = [ramp.value(t, 100, 0.8) for t in range(0, 101, 5)]
    assert values[0] == values[4] == 0.0 and values[-1] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert ramp.value(40, 100, 0.8) == pytest.approx({"geometric": 1 - 0.2 ** 0.5, "cubic": 0.8 * (1 - 0.125),
                                                      "linear": 0.4}[form])


@pytest.mark.parametrize("override,message", [
    ("sparsity.final=1.0", "sparsity.final"),
    ("sparsity.final=-0.1", "sparsity.final"),
    ("sparsity.schedule.end=0.1", "sparsity.schedule.end"),
    ("sparsity.schedule.end_tokens=10", "sparsity.schedule.end_tokens"),
])
def test_config_errors_name_the_field(override, message):
    from raypt.config.load import load

    overrides = ["sparsity.final=0.5", "sparsity.schedule.start_tokens=100", override] \
        if "tokens" in override else ["sparsity.final=0.5", override]
    with pytest.raises(ConfigError, match=message):
        load(None, overrides, check_data=False)


def test_exclusion_that_matches_nothing_and_the_prunable_set():
    from raypt.sparsity.config import SparsityConfig
    from raypt.sparsity.select import prunable
    from raypt.tasks import get_task

    from gloo import TEXT

    def names(tied: bool, **sparsity) -> list[str]:
        cfg = job(2).model_copy(update={"model": job(2).model.model_copy(update={"tie_embeddings": tied})})
        with torch.device("meta"):
            model = get_task("clm")(cfg, {"text": TEXT}).construct()
        return prunable(model, SparsityConfig.model_validate({"final": 0.5, **sparsity}))

    dense_head = names(False)
    assert dense_head and all(n.endswith(".weight") and "norm" not in n and "embed" not in n for n in dense_head)
    assert "lm_head.weight" not in dense_head and "lm_head.weight" in names(False, prune_head=True)
    assert not any("lm_head" in n or "embed" in n for n in names(True, prune_head=True))  # tied: never
    assert not any("self_attn" in n for n in names(False, exclude=["self_attn"]))
    with pytest.raises(ConfigError, match=r"sparsity.exclude: \['nothing_here'\]"):
        names(False, exclude=["nothing_here"])


def test_plot_and_preflight_read_the_section(make_job):
    from raypt import plot, preflight

    cfg = make_job("train.steps=40", "sparsity.final=0.6", "sparsity.schedule.form=cubic")
    panels = {ax.get_ylabel(): ax for ax in plot.schedule_figure(cfg).axes}
    assert set(panels) == {"lr", "sparsity"}
    _, values = panels["sparsity"].lines[0].get_data()
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.6)
    preflight.check_sparsity(cfg, preflight.check_data_path(cfg))
    with pytest.raises(ConfigError, match="sparsity.schedule: the end"):  # loading a job runs the preflight
        make_job("train.steps=40", "sparsity.final=0.6", "sparsity.schedule.start=0.5",
                 "sparsity.schedule.end_tokens=1")
    with pytest.raises(ConfigError, match="sparsity.exclude"):
        make_job("sparsity.final=0.6", "sparsity.exclude=[no_such_layer]")


@pytest.mark.ray
def test_a_pruned_run_reports_and_exports_its_zeros(ray_cluster, make_job):
    """The real loop on two ZeRO-3 workers: the hook's metrics in every record, the summary's per-tensor sparsity,
    and the export's weights at zero where the masks are."""
    import json

    from safetensors.torch import load_file

    from raypt.driver import train
    from raypt.metrics.sink import read_metrics

    cfg = make_job("run.name=sparse", "deepspeed.zero_stage=3", "train.steps=6", "sparsity.final=0.5",
                   "sparsity.every=1", "sparsity.schedule.start=0", "sparsity.schedule.end=0.5")
    folder = train(cfg)
    steps = [r for r in read_metrics(folder) if r.get("loss") is not None]
    assert [r["density"] for r in steps][-1] == 0.5 and steps[0]["density"] == 1.0
    assert all(r["nonzero_params"] and r["n_avg"] for r in steps)
    summary = json.load(open(os.path.join(folder, "summary.json")))
    assert summary["density"] == 0.5 and summary["n_avg"] > summary["nonzero_params"]
    assert summary["sparsity_by_tensor"] and all(0 < s < 1 for s in summary["sparsity_by_tensor"].values())
    weights = {}
    for name in os.listdir(os.path.join(folder, "export")):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(folder, "export", name)))
    for name, share in summary["sparsity_by_tensor"].items():
        assert int((weights[name] == 0).sum()) >= round(share * weights[name].numel()), name  # exported zeros
