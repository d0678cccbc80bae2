"""The Ray Train worker loop: restore -> build -> stream -> step -> evaluate -> checkpoint. Thin on purpose."""
from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from contextlib import nullcontext

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from raypt import checkpoint, preemption, storage
from raypt.checkpoint import TrainState
from raypt.config import JobConfig, from_dict
from raypt.data.manifest import modality, read_manifest
from raypt.data.mix import MixPlan
from raypt.data.stream import RankStream
from raypt.engine import accelerator, build_engine, grad_accumulation, keep_host_memory, set_lr
from raypt.faults import Faults
from raypt.launch import PREEMPTION_WATCHER
from raypt.metrics import peak_flops
from raypt.schedules.lr import lr_at
from raypt.tasks import by_modality, get_task

preemption.install()


def quiet_known_noise() -> None:
    """Hide warnings every ZeRO step or model build repeats, so real ones stay visible."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor|.*reduce_scatter_tensor")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    import transformers

    transformers.logging.set_verbosity_error()


def mean_over_ranks(*values: torch.Tensor | float, device) -> list[float]:
    t = torch.tensor([float(v) for v in values], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class Worker:
    def __init__(self, cfg: JobConfig, sink):
        quiet_known_noise()
        keep_host_memory()
        ctx = ray.train.get_context()
        self.cfg, self.sink = cfg, sink
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.threads = max(1, int(cfg.scaling.cpus_per_worker))
        if accelerator() == "cpu":
            torch.set_num_threads(self.threads)
        self.manifests = [read_manifest(s.path) for s in cfg.data.mix()]
        self.task = get_task(cfg.model.task)
        kinds = by_modality(self.manifests)
        self.accum = grad_accumulation(cfg, self.world)
        model = self.task.build_model(cfg, kinds, cfg.run.seed)
        tokens = [self.task.tokens_per_sample(cfg, kinds, modality(m)) for m in self.manifests]
        self.flops_per_sample = np.array([self.task.flops_per_sample(model, cfg, modality(m))
                                          for m in self.manifests])
        stages = [(at, np.array(w)) for at, w in cfg.data.stage_weights()]
        self.plan = MixPlan(stages, cfg.train.global_batch, tokens)
        self.val_plan = MixPlan(stages[:1], cfg.train.global_batch, tokens)
        self.state = TrainState(world_size=self.world, config_digest=cfg.digest())
        self.saved_for_drain = False
        # Without Ray Train's preemption watcher (the embedded cluster) no drain notice can come: skip the barrier.
        self.drain_notices = os.environ.get(PREEMPTION_WATCHER, "1") != "0"
        self.outbox: list[dict] = []
        self.sent_at = 0.0
        self.run_uri = storage.join(cfg.run.storage, cfg.run.name)
        preemption.set_grace(cfg.failure.sigterm_grace_s)
        self.faults = Faults(cfg.faults, self.run_uri, self.rank)
        self.uploader = checkpoint.Uploader(self.run_uri, cfg.checkpoint.keep, prunes=self.rank == 0)
        log = self.note if self.rank == 0 else (lambda message: None)
        resumed = checkpoint.latest_good(self.run_uri, log) or cfg.run.resume_from
        with checkpoint.local_copy(resumed) if resumed else nullcontext() as directory:
            if directory:
                self.state, body = checkpoint.read_state(directory)
                checkpoint.load_weights(model, directory)
            self.engine = build_engine(model, cfg, self.world)
            if directory:
                checkpoint.load_optimizer(self.engine, directory, body)
                checkpoint.restore_rng(directory, self.rank)
        if self.rank == 0:
            ray.get(sink.begin.remote(self.state.step))
            if resumed:
                log(f"resumed from {resumed} at step {self.state.step} ({self.state.world_size} -> {self.world} "
                    f"workers, {self.accum} accumulation steps)")
                if self.state.config_digest != cfg.digest():
                    log("warning: the job's model/data/train settings differ from the checkpoint's")

    def note(self, message: str) -> None:
        """A line for the driver's console and the worker log."""
        print(f"[raypt] {message}", flush=True)
        self.sink.note.remote(message)

    def log(self, record: dict, now: bool = False) -> None:
        """Rank 0's records reach the sink in batches, about once a second: one actor call per second instead of
        one per step on the ranks' cores. Notable records go at once."""
        self.outbox.append(record)
        if now or time.monotonic() - self.sent_at >= 1.0:
            self.sink.log.remote(self.outbox)
            self.outbox, self.sent_at = [], time.monotonic()

    def stream(self, split: str, first_batch: int, num_batches: int, shuffle: bool):
        c = self.cfg
        plan = self.plan if split == "train" else self.val_plan
        return RankStream(self.manifests, plan, split, c.run.seed, shuffle, self.world, self.rank,
                          c.train.micro_batch, c.data.prefetch_batches, c.data.image,
                          c.data.audio).batches(first_batch, num_batches)

    def evaluate(self, batches: list[dict]) -> float:
        self.engine.eval()
        with torch.no_grad():
            total = sum(self.task.loss(self.engine, self.to_device(b)).item() for b in batches) / len(batches)
        self.engine.train()
        return mean_over_ranks(total, device=self.engine.device)[0]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def step(self, batches) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        """One optimizer step over `accum` micro-batches; returns (mean loss, seconds waiting for data, ids)."""
        loss_sum, wait, ids = torch.zeros((), device=self.engine.device), 0.0, []
        for _ in range(self.accum):
            t = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t
            ids.append(batch.pop("sample_id"))
            loss = self.task.loss(self.engine, self.to_device(batch))
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach()  # summed on the device: no host sync per micro-batch on a GPU
        return loss_sum / self.accum, wait, ids

    def save(self, record: dict, wait_for_upload: bool = False) -> None:
        """Write this rank's part, make the metrics it covers durable, then upload in the background (in the
        foreground when the process is about to exit). `checkpoint_s` is the time training was held up."""
        t = time.perf_counter()
        local = tempfile.mkdtemp(prefix=f"raypt-{self.cfg.run.name}-{self.state.step}-r{self.rank}-")
        checkpoint.save(self.engine, local, self.state)
        self.faults.after_save(self.state.step, local)
        record["checkpoint_s"] = time.perf_counter() - t
        if self.rank == 0:  # before the checkpoint can land: a resume from it must find every step's record
            self.log(record, now=True)
            ray.get(self.sink.flush.remote())
        self.uploader.submit(local, self.state.step)
        if wait_for_upload:
            self.uploader.wait()
        ray.train.report(record)  # rank 0's metrics reach Ray (and Tune) at every checkpoint

    def preempted(self, record: dict) -> None:
        """A rank got SIGTERM: all commit this step (the watchdog ends the signalled rank if the grace period
        runs out first), then the signalled rank leaves and Ray Train restarts the group from this step."""
        record["preempted"] = True
        self.save(record, wait_for_upload=True)
        if preemption.signalled():
            preemption.exit_now()

    def node_draining(self, step: int) -> bool:
        """Ray's own reclaim notice (a node being drained): checkpoint now, keep training until it goes."""
        every = self.cfg.failure.preemption_check_every if self.drain_notices else 0
        if not every or step % every:
            return False
        if ray.train.get_preemption_info() is None or self.saved_for_drain:
            return False
        self.saved_for_drain = True
        return True

    def bad_records(self) -> dict:
        """What `data prepare` skipped, per source, so the run's own metrics say what it trained without."""
        counts = {s.name: m["bad_records"]["count"] for s, m in zip(self.cfg.data.mix(), self.manifests)
                  if m.get("bad_records", {}).get("count")}
        return {"bad_records": counts} if counts else {}

    def sample_ids(self, ids: list[torch.Tensor]) -> list[int]:
        """The step's sample ids from every rank, in global-batch order (for resume audits)."""
        mine = torch.cat(ids).to(self.engine.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return torch.cat(every).tolist()

    def run(self) -> None:
        c, steps = self.cfg, self.cfg.train.steps
        start = self.state.step
        if start >= steps:
            return
        val = list(self.stream("val", 0, c.train.eval_batches, shuffle=False))
        if start == 0:
            v = self.evaluate(val)
            if self.rank == 0:
                self.log({"step": 0, "tokens_seen": 0, "val_loss": v, **self.bad_records()}, now=True)
        peak = peak_flops(self.threads) * self.world
        train = self.stream("train", start, steps - start, shuffle=True)
        total_tokens = self.plan.tokens_before(steps)
        for step in range(start + 1, steps + 1):
            lr = lr_at(self.plan.tokens_before(step), total_tokens, c.train.lr, c.train.schedule)
            set_lr(self.engine, lr)
            self.faults.before_step(step)
            t0 = time.perf_counter()
            loss, wait, ids = self.step(train)
            loss, wait, preempted = mean_over_ranks(loss, wait, preemption.signalled(), device=self.engine.device)
            seconds = time.perf_counter() - t0
            self.state.step, self.state.world_size = step, self.world
            self.state.tokens_seen, self.state.samples_seen = self.plan.tokens_before(step), step * c.train.global_batch
            step_tokens = self.state.tokens_seen - self.plan.tokens_before(step - 1)
            counts = self.plan.counts[self.plan.stage(step - 1)]
            record = {"step": step, "loss": loss, "lr": lr, "tokens_seen": self.state.tokens_seen,
                      "samples_seen": self.state.samples_seen, "tokens_per_s": step_tokens / seconds,
                      "mfu": float(counts @ self.flops_per_sample) / seconds / peak,
                      "step_time_s": seconds, "data_wait_s": wait, "world_size": self.world, "time": time.time()}
            if step == start + 1 and start > 0:
                record["resumed_from"] = start
            if c.run.log_sample_ids:
                record["sample_ids"] = self.sample_ids(ids)
            if step % c.train.eval_every == 0 or step == steps:
                record["val_loss"] = self.evaluate(val)
            notable = "val_loss" in record or "resumed_from" in record
            if preempted:
                self.preempted(record)
            elif self.node_draining(step) or step % c.checkpoint.every == 0 or step == steps:
                self.save(record)
            elif self.rank == 0 and (step % c.run.log_every == 0 or notable):
                self.log(record, now=notable)
        self.uploader.wait()  # the last checkpoint is in storage before the worker reports success


def train_loop(loop_config: dict) -> None:
    """Entry point Ray Train runs on every worker."""
    Worker(from_dict(loop_config["job"]), loop_config["sink"]).run()
