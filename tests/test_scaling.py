"""`raypt fit-scaling`: the scaling law recovered from synthetic run folders whose losses come from known constants."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from raypt import cli, scaling
from raypt.config import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
ONE = {"E": 1.8, "A": 300.0, "alpha": 0.3}
TWO = {**ONE, "B": 400.0, "beta": 0.28}
NOISE = 0.002  # lognormal sd of the losses: 0.2%, above Huber's delta (0.1%), so the fit is in its robust regime


def write_run(folder, loss, n_avg, tokens, sparsity=None, final=True, last=None):
    """A run folder as the driver leaves it: metrics.jsonl (a training record, then the last evaluation, with
    `last`'s keys; n_avg None: no record has it), config.yaml (a `sparsity` section only when given) and, when
    finished, summary.json."""
    folder.mkdir(parents=True)
    records = [{"step": 1, "loss": 9.0, "tokens_seen": tokens / 10, "n_avg": n_avg},
               {"step": 10, "loss": loss, "tokens_seen": tokens, "val_loss": loss, "n_avg": n_avg}]
    records[-1].update(last or {})
    (folder / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                                  for r in records))
    job = {"run": {"name": folder.name}, **({"sparsity": {"final": sparsity}} if sparsity is not None else {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(job))
    if final:
        (folder / "summary.json").write_text(json.dumps({"final_val_loss": loss}))
    return str(folder)


def law(c, n, d):
    return c["E"] + c["A"] / n ** c["alpha"] + (c["B"] / d ** c["beta"] if "B" in c else 0.0)


def synthetic(tmp_path, constants, ns, ds, seed=0):
    rng = np.random.default_rng(seed)
    folders = []
    for i, (n, d) in enumerate((n, d) for d in ds for n in ns):
        loss = law(constants, n, d) * np.exp(rng.normal(0, NOISE))
        folders.append(write_run(tmp_path / f"run{i:02d}", loss, n, d, sparsity=0.5 if i % 2 else None))
    return folders


def check(result, truth, tolerance):
    for name, value in truth.items():
        assert abs(result.constants[name] - value) <= tolerance[name] * value, (name, result.constants[name])
        low, high = result.intervals[name]
        assert low <= value <= high, (name, low, high)


def test_one_budget_recovers_the_constants(tmp_path):
    folders = synthetic(tmp_path, ONE, np.geomspace(1e4, 1e6, 12), [2e8])
    pts = scaling.points(folders)
    result = scaling.fit(pts)
    assert result.budgets == 1 and set(result.constants) == {"E", "A", "alpha"} and result.resamples == 200
    # E is the least pinned down (a small part of losses 6.5-21 here): over seeds 0-5 the fit's E is within 7%,
    # A within 4% and alpha within 1.5%
    check(result, ONE, {"E": 0.1, "A": 0.05, "alpha": 0.02})
    grid = np.array([1e4, 1e5, 1e6])
    assert np.allclose(result.predict(grid), law(ONE, grid, 2e8), rtol=0.01)
    assert scaling.fit(pts).intervals == result.intervals  # seeded resampling: the same intervals every time


def test_several_budgets_fit_the_two_variable_form(tmp_path):
    folders = synthetic(tmp_path, TWO, np.geomspace(1e4, 1e6, 5), [1e7, 1e8, 1e9])
    result = scaling.fit(scaling.points(folders), resamples=100)
    assert result.budgets == 3 and set(result.constants) == set(TWO)
    # over seeds 0-5: E within 7%, A 3%, alpha 1.5%, B 11%, beta 3%
    check(result, TWO, {"E": 0.1, "A": 0.05, "alpha": 0.02, "B": 0.15, "beta": 0.04})


def test_budgets_within_one_percent_are_one():
    assert scaling.budgets(np.array([1e8, 1.005e8, 0.999e8])) == [0.999e8]
    assert len(scaling.budgets(np.array([1e8, 1.02e8]))) == 2


def test_sweep_folder_and_dense_sparse_marking(tmp_path, capsys):
    sweep = tmp_path / "sweeps" / "sparse"
    sweep.mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("metric: val_loss\n")
    write_run(sweep / "trial-00000", 3.0, 1e5, 1e8)  # no sparsity section: dense
    write_run(sweep / "trial-00001", 3.2, 6e4, 1e8, sparsity=0.8)
    (sweep / "trial-00001" / "values.json").write_text('{"variant": "sparse-25-75"}')  # labelled by its variant
    write_run(sweep / "trial-00002", 3.1, 1e5, 1e8, sparsity=0.0)  # a sparsity section at 0: dense
    write_run(sweep / "trial-00003", 3.5, 5e4, 1e8, sparsity=0.5, final=False)  # still running
    # a run from before n_avg was reported: its nonzero_params
    write_run(sweep / "trial-00004", 3.3, None, 1e8, sparsity=0.5, last={"nonzero_params": 7e4})
    (sweep / "trials.json").write_text("{}")
    other = write_run(tmp_path / "runs" / "dense-big", 2.8, 3e5, 1e8)
    pts = scaling.points([str(sweep) + "/", other])
    assert [(p.name, p.sparse, p.n_avg, p.loss) for p in pts] == [
        ("trial-00000", False, 1e5, 3.0), ("trial-00001 sparse-25-75", True, 6e4, 3.2), ("trial-00002", False, 1e5, 3.1),
        ("trial-00004", True, 7e4, 3.3), ("dense-big", False, 3e5, 2.8)]
    assert f"skipped {sweep}/trial-00003: unfinished (no summary.json)" in capsys.readouterr().err

    assert scaling.fit(pts, resamples=20).budgets == 1


def test_plot_marks_dense_and_sparse(tmp_path, monkeypatch):
    pts = [scaling.Point("d1", 3.0, 1e5, 1e8, False), scaling.Point("d2", 2.8, 3e5, 1e8, False),
           scaling.Point("s1", 3.2, 6e4, 1e8, True), scaling.Point("d3", 2.6, 1e6, 1e8, False)]
    result = scaling.fit(pts, resamples=10)
    figures = []
    monkeypatch.setattr(scaling, "save_png", lambda fig, out: figures.append(fig) or out)
    scaling.plot_fit(pts, result, "unused.png")
    ax = figures[0].axes[0]
    marks = {c.get_label(): c.get_offsets().data[:, 0].tolist() for c in ax.collections}
    assert marks == {"dense": [1e5, 3e5, 1e6], "sparse": [6e4]}
    assert sorted(t.get_text() for t in ax.texts) == ["d1", "d2", "d3", "s1"]
    assert ax.get_xscale() == "log" and [line.get_label() for line in ax.lines] == ["fit"]


def test_cli(tmp_path, capsys):
    folders = synthetic(tmp_path / "runs", ONE, np.geomspace(1e4, 1e6, 6), [2e8])
    out = tmp_path / "plots" / "fit.png"
    assert cli.main(["fit-scaling", *folders, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "run00: D 2e+08, N_avg 1e+04" in text and "run01" in text and "sparse" in text and "dense" in text
    assert re.search(r"\nL = .* \(6 runs, 1 token budget; 90% intervals from \d+ bootstrap resamples of the runs\)\n"
                     r"  E = .*\n  A = .*\n  alpha = 0\.3\d* +\[0\.\d+, 0\.\d+\]\n", text)
    assert text.endswith(f"wrote {out}\n")
    assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize("case, message", [
    ("metric", "fit-scaling: run '{run}' reports no val_loss/cpp in metrics.jsonl"),
    ("few", "fit-scaling: 2 finished runs for 3 constants (E, A, alpha, one token budget); need at least 3"),
    ("n_avg", "fit-scaling: run '{run}' reports no n_avg or nonzero_params in metrics.jsonl"),
    ("empty", "fit-scaling: '{empty}' holds no runs; expected a run folder (metrics.jsonl) or a sweep folder "
              "(sweep.yaml and trial-NNNNN/)"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, case, message):
    run = write_run(tmp_path / "a", 3.0, None if case == "n_avg" else 1e5, 1e8)
    args = [run, write_run(tmp_path / "b", 2.9, 2e5, 1e8)]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args.append(str(tmp_path / "empty"))
    elif case != "few":
        args.append(write_run(tmp_path / "c", 2.8, 4e5, 1e8))
    metric = ["--metric", "val_loss/cpp"] if case == "metric" else []
    assert cli.main(["fit-scaling", *args, "--out", str(tmp_path / "fit.png"), *metric]) == 2
    err = capsys.readouterr().err
    assert err == f"raypt: error: {message.format(run=run, empty=tmp_path / 'empty')}\n"
    with pytest.raises(ConfigError):
        scaling.points([str(tmp_path / "nowhere")])
