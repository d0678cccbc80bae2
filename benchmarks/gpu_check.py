"""GPU check of raypt's engine, task and step in one process (no Ray): what a CPU machine cannot show.

For the quickstart model and a Llama-style model of about 1B parameters (with the fast paths on: compiled
blocks, pinned non-blocking batch copies, fused AdamW), in the precision raypt picks on the device (bf16 where
supported), with DeepSpeed ZeRO-2 through raypt's engine strategy:
- tokens/s and MFU of raypt's step against the datasheet peak, and the same model in a bare torch loop (the
  standard recipe: fp32 weights, bf16 autocast, fused AdamW, the same blocks compiled), as a ratio;
- pinned batches (`fast.pin_memory`) train to the same losses as pageable ones (`--pinned`: only this, as
  tests/test_fast_paths.py runs it);
- a checkpoint saved by raypt and restored into a fresh engine: the largest difference of the restored fp32
  master weights from the saved ones (a restore that rounds them through bf16 shows here), and the next step's
  loss against the uninterrupted engine's;
- fp16 (which DeepSpeed's CPU accelerator cannot train): the dynamic loss scale saved in the checkpoint comes back
  (the LossScale hook), so the steps after a restore match the uninterrupted engine's.
Writes benchmarks/results/gpu.json (or $OUT/gpu.json when OUT is set).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "quickstart": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "vocab": 2048, "seq": 128, "micro": 16},
    "llama_1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "vocab": 32000, "seq": 2048, "micro": 8,
                 "fast": {"compile": True, "pin_memory": True}},
}


def job(m: dict, steps: int, precision: str = "auto", fast: dict | None = None):
    from raypt.config import JobConfig

    return JobConfig.model_validate({
        "model": {"task": "clm", "hidden_size": m["hidden_size"], "num_layers": m["num_layers"],
                  "num_heads": m["num_heads"]},
        "train": {"steps": steps, "global_batch": m["micro"], "micro_batch": m["micro"], "lr": 3e-4},
        "deepspeed": {"zero_stage": 2, "precision": precision}, "scaling": {"workers": 1},
        "fast": m.get("fast", {}) if fast is None else fast})


def step_batches(b: torch.Tensor):
    """One optimizer step's micro-batches on the only rank: the whole global batch, weight 1 (raypt.data.split)."""
    return iter([{"input_ids": b, "weight": 1.0}])


def batches(m: dict, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, m["vocab"], (m["micro"], m["seq"]), generator=g) for _ in range(n)]


def timed(step, data: list, warmup: int = 3) -> float:
    """Seconds per step after warm-up, synchronised."""
    for b in data[:warmup]:
        step(b)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for b in data[warmup:]:
        step(b)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (len(data) - warmup)


def check(name: str, m: dict, steps: int) -> dict:
    from raypt.checkpoint import Reader, TrainState, save_checkpoint
    from raypt.engines import Topology, select
    from raypt.engines.device import precision
    from raypt.metrics.flops import peak_flops
    from raypt.tasks import get_task

    cfg = job(m, steps)
    text = {"vocab_size": m["vocab"], "seq_len": m["seq"], "eos_id": 0}
    task = get_task("clm")(cfg, {"text": text})
    data = batches(m, steps)

    def build(restore=None):
        with torch.device("cuda"):  # initialised on the GPU: a 1B model's CPU init alone takes a minute
            model = task.build_model(0)
        return select(cfg).build(model, cfg, Topology.data_parallel(1, 0), restore)

    engine = build()
    losses = []

    def raypt_step(b):
        loss, _ = engine.train_step(step_batches(b), task.loss)
        losses.append(loss)

    raypt_s = timed(raypt_step, data)
    flops = task.flops_per_sample(engine.ds.module, "text") * m["micro"]
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(engine, d, TrainState(step=steps, world_size=1), {}, cfg.model_dump(mode="json"),
                        cfg.trajectory())
        reader = Reader(d)
        restored = build(reader)
        saved = reader.tensors("param")
        from deepspeed.utils import safe_get_full_fp32_param

        master_diff = max((safe_get_full_fp32_param(p).float().cpu() - saved[n]).abs().max().item()
                          for n, p in restored.ds.module.named_parameters())
        probe = batches(m, 1)[0]
        after_restore, _ = restored.train_step(step_batches(probe), task.loss)
        uninterrupted, _ = engine.train_step(step_batches(probe), task.loss)
    del engine, restored
    torch.cuda.empty_cache()

    with torch.device("cuda"):
        model = task.build_model(0)
    if cfg.fast.compile:
        from raypt.models.compiled import compile_blocks

        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

    def bare_step(b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=b.cuda(), labels=b.cuda()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bare_s = timed(bare_step, data)
    del model, opt
    torch.cuda.empty_cache()
    tokens = m["micro"] * m["seq"]
    peak = peak_flops(1, cfg.deepspeed.precision)
    return {f"{name}_params": sum(v.numel() for v in saved.values()),
            f"{name}_precision": precision("auto"),
            f"{name}_tokens_per_s": tokens / raypt_s, f"{name}_mfu": flops / raypt_s / peak,
            f"{name}_bare_tokens_per_s": tokens / bare_s, f"{name}_bare_mfu": flops / bare_s / peak,
            f"{name}_raypt_vs_bare": bare_s / raypt_s,
            f"{name}_first_loss": float(losses[0]), f"{name}_last_loss": float(losses[-1]),
            f"{name}_restore_master_max_abs_diff": master_diff,
            f"{name}_loss_after_restore_vs_uninterrupted": abs(float(after_restore) - float(uninterrupted))}


def fp16_check(m: dict, steps: int) -> dict:
    """fp16 under ZeRO-2: train until the loss scale has moved off its initial 2^16, checkpoint with the hooks'
    state, restore into a fresh engine, and train both on the same batches."""
    from types import SimpleNamespace

    from raypt.checkpoint import Reader, TrainState, save_checkpoint
    from raypt.engines import Topology, select
    from raypt.hooks import Hooks
    from raypt.hooks.loss_scale import LossScale, read, scaler
    from raypt.tasks import get_task

    cfg = job(m, steps, precision="fp16")
    task = get_task("clm")(cfg, {"text": {"vocab_size": m["vocab"], "seq_len": m["seq"], "eos_id": 0}})

    def build(reader=None, keep_scale=True):
        with torch.device("cuda"):
            model = task.build_model(0)
        engine = select(cfg).build(model, cfg, Topology.data_parallel(1, 0), reader)
        hooks = Hooks()
        if keep_scale:
            hooks.add(LossScale())
        hooks.start(SimpleNamespace(engine=engine), reader)
        return engine, hooks

    engine, hooks = build()
    scaler(engine.ds.optimizer).cur_scale = 2.0 ** 24  # overflows at first: the scale comes down and moves
    for b in batches(m, steps):
        engine.train_step(step_batches(b), task.loss)
    probes = batches(m, steps + 4)[steps:]
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(engine, d, TrainState(step=steps, world_size=1), hooks.states(), cfg.model_dump(mode="json"),
                        cfg.trajectory())
        restored, _ = build(Reader(d))
        unscaled, _ = build(Reader(d), keep_scale=False)  # what a restore without the hook would do
    saved_scale, restored_scale = read(scaler(engine.ds.optimizer)), read(scaler(restored.ds.optimizer))
    runs = [[float(e.train_step(step_batches(b), task.loss)[0]) for b in probes] for e in (restored, unscaled, engine)]
    return {"fp16_loss_scale_saved": saved_scale["cur_scale"], "fp16_loss_scale_restored": restored_scale["cur_scale"],
            "fp16_scaler_state_equal": saved_scale == restored_scale,
            "fp16_losses_after_restore_max_abs_diff": max(abs(a - b) for a, b in zip(runs[0], runs[2])),
            "fp16_losses_without_saved_scale_max_abs_diff": max(abs(a - b) for a, b in zip(runs[1], runs[2]))}


def pinned_check(m: dict, steps: int) -> dict:
    """The same steps from pinned host batches with non-blocking copies (`fast.pin_memory`) as from pageable
    ones."""
    from raypt.engines import Topology, select
    from raypt.tasks import get_task

    losses = {}
    for pin in (False, True):
        cfg = job(m, steps, fast={"pin_memory": pin})
        task = get_task("clm")(cfg, {"text": {"vocab_size": m["vocab"], "seq_len": m["seq"], "eos_id": 0}})
        with torch.device("cuda"):
            model = task.build_model(0)
        engine = select(cfg).build(model, cfg, Topology.data_parallel(1, 0))
        losses[pin] = [float(engine.train_step(step_batches(b), task.loss)[0]) for b in batches(m, steps)]
    return {"pinned_engine": engine.pinned,
            "pinned_losses_max_abs_diff": max(abs(a - b) for a, b in zip(losses[True], losses[False]))}


def main() -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29555", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    assert torch.cuda.is_available(), "no GPU here: this check is for a GPU machine"
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    if sys.argv[1:] == ["--pinned"]:
        print(json.dumps(pinned_check(MODELS["quickstart"], steps=5)))
        dist.destroy_process_group()
        return
    figures = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    figures.update(pinned_check(MODELS["quickstart"], steps=5))
    for name, m in MODELS.items():
        t = time.time()
        figures.update(check(name, m, steps=30 if name == "quickstart" else 15))
        figures[f"{name}_check_s"] = time.time() - t
        print(json.dumps({k: v for k, v in figures.items() if k.startswith(name)}, indent=1), flush=True)
    figures.update(fp16_check(MODELS["quickstart"], steps=30))
    print(json.dumps({k: v for k, v in figures.items() if k.startswith("fp16")}, indent=1), flush=True)
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results") / "gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import deepspeed
    import transformers

    body = {"benchmark": "gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__}, "figures": figures}
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
