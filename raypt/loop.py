"""The Ray Train worker loop: restore -> build -> stream -> step -> evaluate -> checkpoint. Thin on purpose: the
engine runs steps, the task computes losses, hooks do everything around the step (see raypt/hooks/base.py)."""
from __future__ import annotations

import tempfile
import time

import numpy as np
import ray.train
import torch

from raypt import checkpoint, storage
from raypt.config import JobConfig, from_dict
from raypt.console import quiet_known_noise
from raypt.data.manifest import bad_records, modality, read_manifest
from raypt.data.mix import MixPlan
from raypt.data.stream import Timed, rank_stream
from raypt.engines import select
from raypt.engines.device import accelerator, keep_host_memory
from raypt.evaluation import Evaluator
from raypt.hooks import preemption, standard_hooks
from raypt.metrics import CORE, Reducer, source_losses
from raypt.metrics.flops import peak_flops, sample_flops
from raypt.tasks import by_modality, get_task

preemption.install()


class Worker:
    def __init__(self, cfg: JobConfig, sink, extra_hooks: tuple = (), feed=None, snapshots=None):
        quiet_known_noise()
        keep_host_memory(training=False)  # until the model is built and restored: see device.py
        ctx = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, ctx.get_world_rank(), ctx.get_world_size()
        self.sink, self.feed, self.snapshots = sink, feed, snapshots  # the in-memory snapshot registry, or None
        self.threads = max(1, int(cfg.scaling.cpus_per_worker))
        if accelerator() == "cpu":
            torch.set_num_threads(self.threads)
        self.manifests = [read_manifest(s.path) for s in cfg.data.mix()]
        self.task = get_task(cfg.model.task)(cfg, by_modality(self.manifests))
        self.run_uri = storage.join(cfg.run.storage, cfg.run.name)
        self.uploader = checkpoint.Uploader(self.run_uri, cfg.checkpoint.keep, prunes=self.rank == 0)
        self.hooks = standard_hooks(cfg, sink, self.run_uri, self.rank, (*self.task.hooks(), *extra_hooks), snapshots)
        self.checkpoint_requested = self.saved_this_step = False
        self.topology = select(cfg).place(cfg, self.world, self.rank)
        model = select(cfg).construct(self.task, cfg, self.topology)  # ZeRO-3: in slices; a pipeline: its stage
        tokens = [self.task.tokens_per_sample(modality(m)) for m in self.manifests]
        self.flops = sample_flops(self.task, model, [modality(m) for m in self.manifests], cfg.fast)  # model, hardware
        self.plan = MixPlan(cfg.data.stage_weights(), cfg.train.global_batch, tokens)
        self.restore(model)
        keep_host_memory()
        self.evaluator = Evaluator(cfg, self.manifests, self.engine, self.task.loss, feed)

    def restore(self, model: torch.nn.Module) -> None:
        """The engine from the newest checkpoint all ranks verify, else resume_from, else init_from's, else fresh."""
        c, say = self.cfg.run, self.note if self.rank == 0 else (lambda message: None)
        with checkpoint.newest_verified(self.run_uri, c.resume_from, say, c.init_from, self.snapshots) as reader:
            self.engine = select(self.cfg).build(model, self.cfg, self.topology, reader)
            self.state = reader.state if reader else checkpoint.TrainState()
            self.reduce = Reducer([*CORE, *source_losses(self.cfg.data.evaluated()), *self.task.metrics,
                                   *self.engine.metrics, *self.hooks.metrics])
            self.hooks.start(self, reader)  # before the state takes this run's world size: hooks may say both
            self.state.world_size, self.state.config_digest = self.world, self.cfg.digest()

    def note(self, message: str) -> None:
        """A line for the driver's console and the worker log."""
        print(f"[raypt] {message}", flush=True)
        if self.sink is not None:
            self.sink.note.remote(message)

    def request_checkpoint(self) -> None:
        """For hooks: commit a checkpoint at the end of this step."""
        self.checkpoint_requested = True

    def stream(self, first_batch: int, num_batches: int):
        stream = rank_stream(self.engine, self.manifests, self.plan, "train", self.cfg.run.seed, True, self.cfg.data,
                             self.feed)
        return stream.batches(first_batch, num_batches)

    def evaluate(self, val: list[list[dict]]) -> dict:  # the mix by the weights in force at the tokens seen
        return self.evaluator(val, self.plan.stage(self.state.step))

    def step(self, step: int, train: Timed, total_tokens: int, peak: float) -> dict:
        """One optimizer step; the record of what it did, reduced over the ranks."""
        c, plan = self.cfg, self.plan
        self.engine.set_lr(lr := c.train.schedule.value(plan.tokens_before(step), total_tokens, c.train.lr))
        # Randomness that is not a sample's own (dropout, say) comes from (seed, rank, step): a resumed run, or a
        # rank that did not exist when the checkpoint was written, derives it the same way.
        torch.manual_seed(int(np.random.SeedSequence([c.run.seed, self.rank, step]).generate_state(1)[0]))
        self.hooks.fire("before_step", self, step)
        t0 = time.perf_counter()
        train.reset()
        loss, metrics = self.engine.train_step(train, self.task.loss)
        local = {"loss": loss, "data_wait_s": train.wait, **metrics, **self.hooks.fire("measure", self, step)}
        reduced = self.reduce(local, self.engine.device)
        seconds = time.perf_counter() - t0
        s = self.state
        s.step, s.tokens_seen, s.samples_seen = step, plan.tokens_before(step), step * c.train.global_batch
        step_flops = self.flops @ plan.counts[plan.stage(step - 1)]
        return {"step": step, **reduced, "lr": lr, "tokens_seen": s.tokens_seen, "samples_seen": s.samples_seen,
                "tokens_per_s": (s.tokens_seen - plan.tokens_before(step - 1)) / seconds,
                "mfu": step_flops[0] / seconds / peak, "hfu": step_flops[1] / seconds / peak, "step_time_s": seconds,
                "world_size": self.world, "time": time.time()}

    def save(self, step: int, record: dict) -> None:
        """Write this rank's part, let hooks make what it covers durable, then upload in the background.
        `checkpoint_s` is the time training was held up."""
        t = time.perf_counter()
        self.saving_to = tempfile.mkdtemp(prefix=f"raypt-{self.cfg.run.name}-{step}-r{self.rank}-")
        checkpoint.save_checkpoint(self.engine, self.saving_to, self.state, self.hooks.states(),
                                   self.cfg.model_dump(mode="json"), self.cfg.trajectory())
        record["checkpoint_s"] = time.perf_counter() - t
        self.hooks.fire("save", self, step, record)
        self.uploader.submit(self.saving_to, step)
        self.saved_this_step, self.checkpoint_requested = True, False

    def run(self) -> None:
        c, steps, start = self.cfg, self.cfg.train.steps, self.state.step
        if start >= steps:  # nothing to train; `end` still settles what it settles (the watchdog)
            self.hooks.fire("end", self)
            return
        val = self.evaluator.batches()
        if start == 0:
            record = {"step": 0, "tokens_seen": 0, **self.evaluate(val),
                      **bad_records([s.name for s in c.data.mix()], self.manifests)}
            self.hooks.fire("evaluate", self, 0, record)
            self.hooks.fire("step_end", self, 0, record)
        peak = peak_flops(self.threads, c.deepspeed.precision) * self.world
        self.batches = train = Timed(self.stream(start, steps - start))
        total_tokens = self.plan.tokens_before(steps)
        for step in range(start + 1, steps + 1):
            record = self.step(step, train, total_tokens, peak)
            if step == start + 1 and start > 0:
                record["resumed_from"] = start
            self.hooks.fire("after_step", self, step, record)
            if step % c.train.eval_every == 0 or step == steps:
                record.update(self.evaluate(val))
                self.hooks.fire("evaluate", self, step, record)
            self.saved_this_step = False
            if self.checkpoint_requested or step % c.checkpoint.every == 0 or step == steps:
                self.save(step, record)
            self.hooks.fire("step_end", self, step, record)
        self.uploader.wait()  # the last checkpoint is in storage before the worker reports success
        self.hooks.fire("end", self)


def train_loop(c: dict) -> None:  # the entry point Ray Train runs on every worker, with the driver's loop config
    Worker(from_dict(c["job"]), c.get("sink"), tuple(c.get("hooks", ())), c.get("feed"), c.get("snapshots")).run()
