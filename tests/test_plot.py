"""`raypt plot`: a job's schedules against global tokens as the loop sets them, and runs' metrics curves."""
from __future__ import annotations

import json

import pytest
import yaml

from raypt import cli, config, plot
from raypt.config import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"


def test_schedule_is_drawn_as_the_loop_sets_it(make_job, tmp_path, monkeypatch):
    cfg = make_job("train.steps=40", "train.schedule.name=wsd", "train.schedule.decay=0.3")
    assert [key for key, _ in plot.schedule_fields(cfg)] == ["train.schedule"]
    ax = plot.schedule_figure(cfg).axes[0]
    tokens, lrs = ax.lines[0].get_data()
    plan = plot.token_plan(cfg)
    total = plan.tokens_before(40)
    assert len(tokens) == 40 and ax.get_ylabel() == "lr" and "wsd" in ax.get_title()
    for step in (1, 2, 20, 33, 40):  # the loop's lr at step `step` (1-based)
        assert tokens[step - 1] == plan.tokens_before(step)
        assert lrs[step - 1] == cfg.train.schedule.value(plan.tokens_before(step), total, cfg.train.lr)
    monkeypatch.setattr(plot, "MAX_POINTS", 7)  # a long run: a sample of its steps, the first and last among them
    tokens, _ = plot.schedule_figure(cfg).axes[0].lines[0].get_data()
    assert len(tokens) == 7 and tokens[0] == plan.tokens_before(1) and tokens[-1] == total
    out = plot.plot_schedule(cfg, str(tmp_path / "sub" / "lr.png"))
    assert open(out, "rb").read(8) == PNG


def test_phase_boundaries_are_marked(make_job, tiny_data):
    cfg = make_job("train.steps=40", "train.schedule.warmup=0.25", f"data.sources=[{{name: a, path: {tiny_data}}}, "
                   f"{{name: b, path: {tiny_data}}}]", "data.stages=[{at_tokens: 3000, weights: {a: 0, b: 1}}]")
    plan, lines = plot.token_plan(cfg), plot.schedule_figure(cfg).axes[0].lines
    marks = {line.get_label(): line.get_xdata()[0] for line in lines[1:]}
    assert marks == {"warm-up end": 0.25 * plan.tokens_before(40), "data stage": plan.tokens_at[1]}


def write_run(folder, records: list[dict]) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


@pytest.fixture
def runs(tmp_path) -> list[str]:
    a = write_run(tmp_path / "runs" / "a", [
        {"step": 0, "tokens_seen": 0, "val_loss": 6.0, "bad_records": {"main": 0}},
        {"step": 1, "tokens_seen": 256, "loss": 5.5, "lr": 1e-3},
        {"step": 2, "tokens_seen": 512, "loss": 5.0, "lr": 2e-3, "val_loss": 5.2}])
    b = write_run(tmp_path / "runs" / "b", [
        {"step": 1, "tokens_seen": 512, "loss": 4.0, "lr": 1e-3},
        {"step": 2, "tokens_seen": 1024, "loss": 3.5, "lr": 1e-3}])
    return [a, b]


def test_runs_are_drawn_one_line_each(runs, tmp_path):
    ax = plot.runs_figure(runs, "loss").axes[0]
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    assert [list(map(list, line.get_data())) for line in ax.lines] == [[[256, 512], [5.5, 5.0]],
                                                                       [[512, 1024], [4.0, 3.5]]]
    ax = plot.runs_figure(runs, "val_loss", x="step").axes[0]  # b has none: only a's line, records without it skipped
    assert [line.get_label() for line in ax.lines] == ["a"] and list(map(list, ax.lines[0].get_data())) == [
        [0, 2], [6.0, 5.2]]
    assert open(plot.plot_runs(runs, "lr", str(tmp_path / "lr.png")), "rb").read(8) == PNG


def test_runs_on_s3_are_read_and_plotted_there(s3_endpoint, runs, capsys):
    import boto3

    from raypt import storage

    boto3.client("s3").create_bucket(Bucket="raypt-plots")
    remote = "s3://raypt-plots/runs/c"
    storage.write_text(f"{remote}/metrics.jsonl", open(f"{runs[1]}/metrics.jsonl").read())
    assert cli.main(["plot", runs[0], remote, "--metric", "loss", "--out", "s3://raypt-plots/loss.png"]) == 0
    assert "wrote s3://raypt-plots/loss.png" in capsys.readouterr().out
    fs, path = storage.resolve("s3://raypt-plots/loss.png")
    with fs.open_input_stream(path) as f:
        assert f.read(8) == PNG


def test_a_metric_no_run_has_is_refused_with_the_keys_that_exist(runs):
    with pytest.raises(ConfigError) as e:
        plot.runs_figure(runs, "grad_norm")
    assert "'grad_norm'" in str(e.value) and "loss, lr, step, tokens_seen, val_loss" in str(e.value)


def test_cli(runs, make_job, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", *runs, "--metric", "loss", "--x", "step"]) == 0
    assert open(tmp_path / "loss.png", "rb").read(8) == PNG
    assert f"wrote {tmp_path / 'loss.png'}" in capsys.readouterr().out
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(make_job("run.name=cpt"))))
    assert cli.main(["plot", "schedule", str(job), "train.steps=12"]) == 0
    assert open(tmp_path / "cpt-schedule.png", "rb").read(8) == PNG
    capsys.readouterr()
    for argv, says in [
        (["plot", str(tmp_path / "nowhere"), "--metric", "loss"], "holds no metrics.jsonl; expected a run folder"),
        (["plot", *runs], "--metric KEY is required"),
        (["plot", *runs, "--metric", "mfu"], "--metric: got 'mfu'"),
        (["plot", "schedule"], "give a job file"),
        (["plot", "schedule", str(tmp_path / "missing.yaml")], "does not exist"),
        (["plot", "schedule", str(job), "--metric", "loss"], "--metric and --x are for run folders"),
        (["plot", "schedule", str(job), f"data.path={tmp_path}"], "holds no prepared dataset"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, (argv, err)
