"""`raypt` command line: train, tune, config show/explain, data prepare, submit, export, generate, plot,
fit-scaling. User mistakes exit 2, with one message and no traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import yaml

from raypt import config, preflight, storage


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="YAML job file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 deepspeed.zero_stage=3")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raypt", description="Elastic pre-training on Ray Train + DeepSpeed")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run (or resume) a job to its last step and export it")
    _job_args(tr)
    tr.add_argument("--verbose", action="store_true", help="show Ray's and DeepSpeed's own output too (it always "
                    "goes to driver.log in the run folder)")
    an = sub.add_parser("anneal", help="branch an anneal off a run on the infinite schedule: a new run folder "
                        "(RUN-anneal-STEP) forked from RUN's newest checkpoint, its LR falling exponentially over "
                        "--tokens; RUN itself, and runs continued from it, go on from the pre-anneal checkpoint")
    an.add_argument("run_folder", metavar="RUN", help="the main run's folder (local or s3://)")
    an.add_argument("overrides", nargs="*", help="dotted overrides of the branch's job, e.g. scaling.workers=1")
    an.add_argument("--tokens", type=_at_least(1, float), required=True, help="global tokens the anneal lasts")
    an.add_argument("--name", help="the branch's run.name (default: RUN's name + -anneal-STEP)")
    an.add_argument("--verbose", action="store_true", help="show Ray's and DeepSpeed's own output too")
    tu = sub.add_parser("tune", help="run (or continue) a sweep: `raypt tune SWEEP.yaml [overrides]`; "
                        "`raypt tune show SWEEP_DIR` prints its table")
    tu.add_argument("sweep", help="a sweep file, or `show`")
    tu.add_argument("overrides", nargs="*", help="job overrides for every trial (sweep.KEY=VALUE for the sweep "
                    "file's own settings); after `show`: the sweep folder")
    tu.add_argument("--verbose", action="store_true", help="show Ray's, Tune's and DeepSpeed's own output too")
    show = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    _job_args(show.add_parser("show", help="print the fully resolved config with defaults"))
    show.add_parser("explain", help="every field of the job or of one section: type, bounds, default, meaning"
                    ).add_argument("section", nargs="?", help="a dotted section, e.g. train or train.schedule")
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    _job_args(data.add_parser("prepare", help="tokenize and pack the job's data.prepare source into data.path"))
    sm = sub.add_parser("submit", help="validate a job, run it on a Ray cluster with `ray job submit`, follow it")
    _job_args(sm)
    sm.add_argument("--address", help="the cluster's dashboard address (default: RAY_ADDRESS, then local)")
    sm.add_argument("--no-wait", action="store_true", help="return once submitted")
    ex = sub.add_parser("export", help="export a run's latest checkpoint (local or s3://) as a Hugging Face folder")
    _job_args(ex)
    ex.add_argument("--out", help="folder or s3:// URI to write it to (default: the run folder's export/)")
    gen = sub.add_parser("generate", help="sample a continuation from a run or export folder (local or s3://)")
    gen.add_argument("path")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=_at_least(1, int), default=80)
    gen.add_argument("--temperature", type=_at_least(0, float), default=0.8)
    gen.add_argument("--seed", type=_at_least(0, int), default=0)
    pl = sub.add_parser("plot", help="`raypt plot schedule JOB [overrides]`: the job's LR (and every other schedule) "
                        "against tokens; `raypt plot RUN [RUN ...] --metric KEY`: runs' curves (local or s3://)")
    pl.add_argument("targets", nargs="+", metavar="RUN", help="run folders, or `schedule` then a job file and its "
                    "overrides (a run folder named schedule: write ./schedule)")
    pl.add_argument("--metric", help="with run folders: the metrics.jsonl key to draw, e.g. val_loss or lr")
    pl.add_argument("--x", choices=["tokens_seen", "step"], help="with run folders: the x axis (default tokens_seen)")
    pl.add_argument("--out", help="the PNG to write, local or s3:// (default: RUN_NAME-schedule.png or METRIC.png "
                    "here)")
    fs = sub.add_parser("fit-scaling", help="fit L(N_avg) = E + A/N_avg^alpha (one token budget) or + B/D^beta "
                        "(several) to finished runs, with bootstrap intervals; a PNG of the fit")
    fs.add_argument("paths", nargs="+", metavar="PATH", help="run folders or sweep folders (local or s3://)")
    fs.add_argument("--metric", default="val_loss", help="the metrics.jsonl key to fit (its last value per run)")
    fs.add_argument("--out", default="fit-scaling.png", help="the PNG to write, local or s3://")
    return ap


def _at_least(low: float, kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` >= low, else argparse's own usage error (exit status 2)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected {kind.__name__} >= {low}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected {kind.__name__} >= {low}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 for a mistake in the command or the job, 1 for a service (Ray, S3) that does not answer."""
    # raypt never downloads a model: transformers only reads local folders, and must not try a hub for a name
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (preflight.Unreachable, storage.StorageError) as e:  # Unreachable first: it is a ConfigError too
        print(f"raypt: error: {e}", file=sys.stderr)
        return 1
    except config.ConfigError as e:
        print(f"raypt: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.action == "explain":
            print(config.explain(args.section), end="")
            return 0
        cfg = config.load(args.job, args.overrides, check_data=False)
        print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.command == "data":
        cfg = config.load(args.job, args.overrides, check_data=False)
        os.environ.update(cfg.s3.env())  # this process reads and writes the job's storage
        preflight.check_prepare(cfg)
        from raypt.data.prepare import prepare

        if any(source.prepare.parallel != 1 for source in cfg.data.mix()):
            from raypt.driver import init_ray

            init_ray(cfg.s3.env())  # tasks on this machine's cores, or the nodes of a cluster (RAY_ADDRESS)
        for source in cfg.data.mix():
            manifest = prepare(source.path, source.prepare, cfg.data)
            rows = {k: v["rows"] for k, v in manifest["splits"].items()}
            shape = (f"vocab {manifest['vocab_size']}, sequences of {manifest['seq_len']} tokens"
                     if manifest["modality"] == "text" else f"{manifest['modality']} records")
            skipped = manifest["bad_records"]["count"]
            note = f"; skipped {skipped} bad records (listed in its manifest)" if skipped else ""
            print(f"prepared {source.name} in {source.path}: {manifest['documents']} documents, {shape}: "
                  f"{json.dumps(rows)}{note}")
        return 0
    if args.command == "train":
        preflight.ray_cluster(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
        cfg = config.load(args.job, args.overrides)  # before the driver's imports (torch, Ray): mistakes fail fast
        with storage.settings(cfg.s3.env()):
            note = preflight.resume_note(cfg)
        if note:
            print(f"raypt: note: {note}", file=sys.stderr)
        return _train(cfg, args.verbose)
    if args.command == "anneal":
        preflight.ray_cluster(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
        from raypt.continual import anneal_branch

        cfg = anneal_branch(args.run_folder, args.tokens, args.name, args.overrides)
        with storage.settings(cfg.s3.env()):
            preflight.check_run(cfg)
        print(f"raypt: anneal branch {cfg.run.name} from {cfg.run.resume_from} over {args.tokens:.0f} tokens "
              f"(to step {cfg.train.steps})", file=sys.stderr)
        return _train(cfg, args.verbose)
    if args.command == "tune":
        return _tune(args)
    if args.command == "export":
        return _export(args)
    if args.command == "submit":
        from raypt.submit import submit

        return submit(args.job, args.overrides, args.address, follow=not args.no_wait)
    if args.command == "plot":
        return _plot(args)
    if args.command == "fit-scaling":
        return _fit_scaling(args)
    if args.command == "generate":
        from raypt.generate import generate

        preflight.reach("path", args.path)
        print(generate(args.path, args.prompt, args.max_new_tokens, args.temperature, seed=args.seed))
        return 0
    return 2


def _train(cfg: config.JobConfig, verbose: bool) -> int:
    """Train a validated job on the console: its summary line and run folder, or the failure (exit 1)."""
    from raypt.console import chatter_to
    from raypt.driver import TrainingFailed, local_dir, train

    try:
        with chatter_to(os.path.join(local_dir(cfg), "driver.log"), verbose):
            try:
                folder = train(cfg)
            finally:  # Ray forwards worker output late: disconnect while it still goes to the log
                import ray

                ray.shutdown()
    except TrainingFailed as e:
        print(f"raypt: {e}", file=sys.stderr)
        return 1
    summary = json.load(open(os.path.join(folder, "summary.json"))) if "://" not in folder else {}
    if summary:
        print(f"val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f}, "
              f"{summary['tokens_per_s']:.0f} tokens/s, MFU {summary['mfu']:.1%}, "
              f"HFU {summary.get('hfu') or 0:.1%}")
    print(f"run folder: {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    cfg = config.load(args.job, args.overrides)
    os.environ.update(cfg.s3.env())
    out = config.absolute(args.out) if args.out else storage.join(cfg.run.storage, cfg.run.name, "export")
    preflight.folder("--out", out)
    from raypt.export import export_run

    step, out = export_run(cfg, out)
    print(f"exported {step} to {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from raypt import plot  # matplotlib: only for this command

    if args.targets[0] == "schedule":
        if len(args.targets) < 2:
            raise config.ConfigError("plot schedule: give a job file, e.g. raypt plot schedule jobs/quickstart.yaml")
        if args.metric or args.x:
            raise config.ConfigError("plot schedule: --metric and --x are for run folders; a job's schedules are "
                                     "drawn against global tokens")
        cfg = config.load(args.targets[1], args.targets[2:], check_data=False)  # plot_schedule reads the data
        out = plot.plot_schedule(cfg, args.out or f"{cfg.run.name}-schedule.png")
    else:
        if not args.metric:
            raise config.ConfigError("plot: --metric KEY is required with run folders, e.g. raypt plot runs/a "
                                     "runs/b --metric val_loss (or `raypt plot schedule JOB`)")
        for folder in args.targets:
            preflight.reach("plot", folder)
        out = plot.plot_runs(args.targets, args.metric, args.out or f"{args.metric.replace('/', '_')}.png",
                             args.x or "tokens_seen")
    print(f"wrote {config.absolute(out)}")
    return 0


def _fit_scaling(args: argparse.Namespace) -> int:
    from raypt import scaling  # scipy and matplotlib: only for this command

    for path in args.paths:
        preflight.reach("fit-scaling", path)
    pts = scaling.points(args.paths, args.metric)
    for p in pts:
        print(f"{p.name}: D {p.tokens:.4g}, N_avg {p.n_avg:.4g}, {args.metric} {p.loss:.4f}, "
              f"{'sparse' if p.sparse else 'dense'}")
    result = scaling.fit(pts)
    print(f"{result.formula()}  ({len(pts)} runs, {result.budgets} token budget{'s' if result.budgets > 1 else ''}; "
          f"{scaling.LEVEL:.0%} intervals from {result.resamples} bootstrap resamples of the runs)")
    for name, value in result.constants.items():
        low, high = result.intervals[name]
        print(f"  {name} = {value:.4g}  [{low:.4g}, {high:.4g}]")
    print(f"wrote {config.absolute(scaling.plot_fit(pts, result, args.out, args.metric))}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from raypt.tune.results import table
    from raypt.tune.sweep import SweepConfig, load_sweep

    if args.sweep == "show":
        if len(args.overrides) != 1:
            raise config.ConfigError("tune show: give one sweep folder, e.g. raypt tune show sweeps/lr")
        preflight.reach("tune show", args.overrides[0])
        try:
            raw = storage.read_text(storage.join(args.overrides[0].rstrip("/"), "sweep.yaml"))
        except FileNotFoundError:
            raise config.ConfigError(f"tune show: '{args.overrides[0]}' holds no sweep (sweep.yaml missing)") from None
        print(table(SweepConfig.model_validate(yaml.safe_load(raw))))
        return 0
    preflight.ray_cluster(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    sweep, job = load_sweep(args.sweep, args.overrides)
    with storage.settings(config.from_dict(job).s3.env()):
        preflight.folder("storage", sweep.storage)
    from raypt.console import chatter_to
    from raypt.tune.run import run_sweep  # Ray Tune: after the checks, which then fail in a second

    with chatter_to(os.path.join(sweep.folder if "://" not in sweep.folder else "sweeps", "driver.log"),
                    args.verbose):
        folder = run_sweep(sweep, job)
    print(table(SweepConfig.model_validate(sweep.model_dump())))
    print(f"sweep folder: {folder} (results.md, curves.png, best.yaml)")
    return 0
