"""Recovery after a worker is SIGKILLed mid-run, from durable checkpoints and from in-memory snapshots, and what
the snapshots cost, in one invocation.

2-worker quickstart runs (ZeRO-2) lose rank 1 to SIGKILL at step KILL_AT: with durable checkpoints every EVERY
steps only, and also with in-memory snapshots every step (checkpoint.memory_every=1), in rounds of alternating
order (durable, memory; memory, durable; ...), each run ending 10 steps after the kill. Then uninterrupted runs
without snapshots, with them every 10 steps and every step, in the order 0, 10, 1, 0, 10, 1, ..., 0, so that each
run with snapshots is compared with the runs without on either side of it (this machine's speed drifts over an
invocation). Times are medians over the rounds. Figures:
- recovery_vs_cold_start: (kill -> end of the first resumed step) / (fit start -> end of step 1), durable run
- lost_steps: steps computed before the kill that had to be recomputed (durable); lost_steps_memory (snapshots,
  the most over the rounds)
- recovery_memory_vs_durable: kill -> end of the first resumed step, snapshot run over durable run;
  regain_memory_vs_durable: the same to the end of the step the kill interrupted (lost steps recomputed)
- checkpoint_overhead_fraction: time inside checkpoint saves / wall time of the training steps
- memory_snapshot_overhead_fraction_{10,1}: median over the rounds of the training steps' wall time with
  snapshots every 10 (every 1) steps over that without (interpolated between the runs on either side), less 1;
  memory_snapshot_held_fraction_*: the time the snapshot hook held the training thread, over the steps' wall time;
  memory_snapshot_overhead_fraction_10_within_run: the same cost measured inside each run with snapshots every
  10 steps, so that the drift between runs (their wall times spread by more than the cost) drops out: the extra
  wall time of the two steps after each snapshot (held, then its shares sent while the next step trains) over the
  mean of the same run's steps 4 to 10 after one, as a share of the run's wall time; `_placebo`: the same figure
  read from the runs without snapshots, where it should be 0 within noise
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402
from raypt.hooks.faults import fired  # noqa: E402
from raypt.driver import init_ray, run_dir, train  # noqa: E402
from raypt.metrics.sink import read_metrics  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")
STORAGE = tempfile.mkdtemp(prefix="raypt-recovery-")


def run(name: str, steps: int, every: int, *overrides: str) -> tuple[config.JobConfig, float, list[dict]]:
    """(the job, when its fit started, its step records)."""
    cfg = config.load(JOB, [f"train.steps={steps}", f"checkpoint.every={every}", f"train.eval_every={steps}",
                            f"run.storage={STORAGE}", f"run.name={name}", *overrides])
    start = time.time()
    records = [r for r in read_metrics(train(cfg)) if r.get("loss") is not None]
    return cfg, start, records


def killed(name: str, steps: int, every: int, kill_at: int, *overrides: str) -> dict:
    cfg, start, records = run(name, steps, every, f"faults.kill_at_step={kill_at}", "faults.kill_rank=1",
                              "failure.max_failures=1", *overrides)
    by_step = {r["step"]: r for r in records}
    resumed = next(r for r in records if "resumed_from" in r)
    kill = fired(run_dir(cfg), "kill")
    recovery = resumed["time"] - kill["time"]
    saves = sum(r.get("checkpoint_s", 0.0) for r in records)
    return {"cold_start_s": by_step[1]["time"] - start,  # (the resumed attempt rewrote steps after its checkpoint)
            "recovery_s": recovery, "regain_s": by_step[kill["step"]]["time"] - kill["time"],
            "lost_steps": kill["step"] - 1 - resumed["resumed_from"], "kill_step": kill["step"],
            "resumed_from": resumed["resumed_from"], "from_memory": bool(resumed.get("resumed_from_memory")),
            "saves_s": saves, "saves": sum("checkpoint_s" in r for r in records),
            "span_s": records[-1]["time"] - by_step[1]["time"] - recovery,
            "step_time_s_mean": sum(r["step_time_s"] for r in records[1:]) / (len(records) - 1)}


def span(records: list[dict]) -> float:
    """Wall time from the end of step 1 to the end of the last step: the training steps, start-up excluded."""
    return records[-1]["time"] - records[0]["time"]


def within_run(records: list[dict], every: int) -> float:
    """Snapshot cost from one run's own steps (see the module's docstring); a snapshot follows step s when s %
    every == 0."""
    walls = {r["step"]: r["time"] - prev["time"] for prev, r in zip(records, records[1:])}
    after = [s for s in walls if s > every and (s - 1) % every in (0, 1)]
    quiet = statistics.mean(w for s, w in walls.items() if (s - 1) % every >= 3)
    return sum(walls[s] - quiet for s in after) / sum(walls.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--every", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kill-rounds", type=int, default=3)
    args = ap.parse_args()
    init_ray()
    kills: dict[str, list[dict]] = {"durable": [], "memory": []}
    for i in range(args.kill_rounds):
        for kind in (("durable", "memory") if i % 2 == 0 else ("memory", "durable")):
            extra = ("checkpoint.memory_every=1",) if kind == "memory" else ()
            # 10 steps past the kill: enough for the resumed steps these figures read
            kills[kind].append(killed(f"{kind}-{i}", args.kill_at + 10, args.every, args.kill_at, *extra))
    durable, memory = ({k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k])
                        for k in runs[0]} for runs in (kills["durable"], kills["memory"]))
    memory["from_memory"] = all(r["from_memory"] for r in kills["memory"])
    memory["lost_steps"] = max(r["lost_steps"] for r in kills["memory"])
    # Overhead runs in the order 0, 10, 1, 0, 10, 1, ..., 0: each run with snapshots lies between two without,
    # and is compared with their wall time interpolated at its place, since this machine's speed drifts over an
    # invocation by as much as the overhead measured (3 % from one run to the next on a slow day).
    sequence = [k for _ in range(args.rounds) for k in (0, 10, 1)] + [0]
    walls: list[tuple[int, float]] = []
    held: dict[int, list[float]] = {10: [], 1: []}
    inside: dict[int, list[float]] = {10: [], 0: []}
    for i, k in enumerate(sequence):
        _, _, records = run(f"overhead-{k}-{i}", args.steps, args.steps, f"checkpoint.memory_every={k}")
        walls.append((k, span(records)))
        if k in inside:
            inside[k].append(within_run(records, 10))
        if k:
            held[k].append(sum(r.get("memory_snapshot_s", 0.0) for r in records) / span(records))
    base = [(i, w) for i, (k, w) in enumerate(walls) if k == 0]
    ratios: dict[int, list[float]] = {10: [], 1: []}
    for i, (k, w) in enumerate(walls):
        if k:
            (i0, w0), (i1, w1) = max(b for b in base if b[0] < i), min(b for b in base if b[0] > i)
            ratios[k].append(w / (w0 + (w1 - w0) * (i - i0) / (i1 - i0)))
    figures = {
        "recovery_vs_cold_start": durable["recovery_s"] / durable["cold_start_s"],
        "recovery_s": durable["recovery_s"],
        "cold_start_s": durable["cold_start_s"],
        "lost_steps": durable["lost_steps"],
        "checkpoint_interval_steps": args.every,
        "checkpoint_overhead_fraction": durable["saves_s"] / durable["span_s"],
        "checkpoint_save_s_mean": durable["saves_s"] / max(1, durable["saves"]),
        "step_time_s_mean": durable["step_time_s_mean"],
        "kill_step": durable["kill_step"],
        "resumed_from": durable["resumed_from"],
        "lost_steps_memory": memory["lost_steps"],
        "resumed_from_memory": memory["resumed_from"],
        "memory_resume_was_from_memory": memory["from_memory"],
        "recovery_s_memory": memory["recovery_s"],
        "recovery_memory_vs_durable": memory["recovery_s"] / durable["recovery_s"],
        "regain_s_durable": durable["regain_s"],
        "regain_s_memory": memory["regain_s"],
        "regain_memory_vs_durable": memory["regain_s"] / durable["regain_s"],
        "recovery_s_rounds": {k: [r["recovery_s"] for r in v] for k, v in kills.items()},
        "lost_steps_rounds": {k: [r["lost_steps"] for r in v] for k, v in kills.items()},
        "rounds": args.rounds,
        "kill_rounds": args.kill_rounds,
    }
    for k in held:
        figures[f"memory_snapshot_overhead_fraction_{k}"] = statistics.median(ratios[k]) - 1
        figures[f"memory_snapshot_overhead_fraction_{k}_spread"] = [min(ratios[k]) - 1, max(ratios[k]) - 1]
        figures[f"memory_snapshot_held_fraction_{k}"] = statistics.median(held[k])
    figures["memory_snapshot_overhead_fraction_10_within_run"] = statistics.median(inside[10])
    figures["memory_snapshot_overhead_fraction_10_within_run_spread"] = [min(inside[10]), max(inside[10])]
    figures["memory_snapshot_overhead_fraction_10_within_run_placebo"] = statistics.median(inside[0])
    figures["steps_wall_s"] = {str(k): [w for kk, w in walls if kk == k] for k in (0, 10, 1)}
    write_result("recovery", figures)


if __name__ == "__main__":
    main()
