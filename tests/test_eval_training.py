"""train.eval_tasks: the loop scores tasks at each evaluation, the same numbers `gptjax eval`
gives on the checkpoint; `gptjax plot` draws them; sweeps fit them."""

import json

import numpy as np
import pytest
from conftest import ROOT, tiny_config

from gptjax import cli
from gptjax.config import ConfigError
from gptjax.evaluation import run
from gptjax.training import loop

TASK = "stdlib_next_line"
LIMIT = 12


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny run (4 steps, evaluations at 2 and 4) with train.eval_tasks, by `gptjax train`."""
    run_dir = tmp_path_factory.mktemp("eval-training") / "run"
    overrides = [
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        f"train.eval_tasks=[{TASK}]",
        f"train.eval_limit={LIMIT}",
        *("train.steps=4", "train.eval_every=2", "train.eval_steps=1", "checkpoint.every=4"),
    ]
    config = str(ROOT / "configs" / "debug.yaml")
    assert cli.main(["train", config, *overrides, "--no-progress"]) == 0
    return run_dir


def test_eval_tasks_are_logged_at_each_evaluation_and_match_gptjax_eval(trained):
    records = read_jsonl(trained / "metrics.jsonl")
    logged = {r["step"]: r for r in records if f"eval/{TASK}/acc" in r}
    assert sorted(logged) == [2, 4]
    for record in logged.values():
        assert "eval_loss" in record  # one eval record a step: loss and tasks together
        for metric in ("acc", "acc_norm"):
            value = record[f"eval/{TASK}/{metric}"]
            assert 0 <= value <= 1 and (value * LIMIT) == pytest.approx(round(value * LIMIT))
    during = read_jsonl(trained / "evaluations" / f"{TASK}-0shot-step4.jsonl")
    # the final checkpoint scored on its own, as `gptjax eval RUN --tasks` does
    result = run.evaluate_run(trained, [TASK], limit=LIMIT)
    assert result["step"] == 4
    after = result["tasks"][TASK]
    for metric in ("acc", "acc_norm"):
        assert logged[4][f"eval/{TASK}/{metric}"] == after[metric]
        assert logged[4][f"eval/{TASK}/{metric}_stderr"] == pytest.approx(after[f"{metric}_stderr"])
    again = read_jsonl(trained / "evaluations" / f"{TASK}-0shot-step4.jsonl")
    assert len(during) == len(again) == LIMIT
    for a, b in zip(during, again, strict=True):
        assert a["predictions"] == b["predictions"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_plot_draws_the_task_panel(trained):
    from gptjax.tools import plot

    records = plot.read_metrics(trained)
    assert plot.task_keys(records) == [f"eval/{TASK}/acc", f"eval/{TASK}/acc_norm"]
    out = plot.plot_run(trained)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_tasks_mistakes_are_one_line(tmp_path, cache_dir, capsys):
    cfg = tiny_config(tmp_path / "a", cache_dir, f"train.eval_tasks=[{TASK}]")
    with pytest.raises(ConfigError, match="needs the task evaluator"):
        loop.train(cfg, progress=False)
    args = ["train", str(ROOT / "configs" / "debug.yaml"), f"run_dir={tmp_path / 'b'}"]
    assert cli.main([*args, f"data.cache_dir={cache_dir}", "train.eval_tasks=[nope]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptjax: error: unknown task 'nope'") and "\n" not in err
    assert not (tmp_path / "b").exists()  # refused before the run directory is made


def test_sweeps_carry_and_fit_task_accuracies(tmp_path, cache_dir, capsys):
    from test_sweep_fit import isoflop_rows
    from test_sweep_run import write_spec

    from gptjax.experiments import fit, report, runs, spec

    sweep = spec.load(write_spec(tmp_path, cache_dir))
    for k, member in enumerate(sweep.runs):  # finished runs whose final record holds a task
        steps = member.config.train.steps
        (member.directory / "checkpoints" / str(steps)).mkdir(parents=True)
        line = {"step": steps, "eval_loss": 2.0, "eval_bpb": 1.5}
        line |= {"eval/t/acc": 0.25 * k, "eval/t/acc_norm": 0.5}
        (member.directory / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    rows = [runs.result_row(r, runs.read_state(r)) for r in sweep.runs]
    back = report.read_csv(report.write_csv(rows, tmp_path / "results.csv"))
    assert list(back[0])[-2:] == ["eval/t/acc", "eval/t/acc_norm"]
    assert [float(r["eval/t/acc"]) for r in back] == [0.0, 0.25, 0.5, 0.75]

    # an accuracy is fitted as its error: the same fit as a loss column holding 1 - acc
    rows = isoflop_rows([1e18, 1e19, 1e20, 1e21])
    for r in rows:
        r["eval/t/acc"] = 1 - r["eval_loss"] / 4
        r["eval_loss"] = 1 - r["eval/t/acc"]
    by_acc, by_loss = fit.points(rows, "eval/t/acc"), fit.points(rows, "eval_loss")
    assert np.array_equal(by_acc.loss, by_loss.loss) and len(by_acc) == len(rows)
    assert fit.isoflop(by_acc, bootstrap=0) == fit.isoflop(by_loss, bootstrap=0)
    assert fit.isoflop(by_acc, bootstrap=0)["a"]["value"] == pytest.approx(0.4516, abs=0.02)
    with pytest.raises(spec.SweepError, match="metric 'eval/t/loss'"):
        fit.points(rows, "eval/t/loss")
    csv_path = tmp_path / "synthetic.csv"  # one budget of 4 sizes: the CLI on an acc column
    with open(csv_path, "w") as handle:
        columns = ["params", "tokens", "flops", "budget", "eval/t/acc"]
        handle.write(",".join(columns) + "\n")
        handle.writelines(",".join(str(r[c]) for c in columns) + "\n" for r in rows[2:6])
    args = ["sweep", "fit", str(csv_path), "--metric", "eval/t/acc", "--json", "--bootstrap", "0"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fitted"] == "1 - eval/t/acc" and printed["runs"] == 4
    expected = fit.isoflop(fit.points(rows[2:6], "eval_loss"), bootstrap=0)["budgets"][0]
    assert printed["isoflop"]["budgets"][0]["coefficients"] == pytest.approx(
        expected["coefficients"], rel=1e-9
    )


def test_a_learned_pattern_scores_near_all_and_a_label_shuffled_copy_near_chance(tmp_path, capsys):
    """A tiny model trained on runs of the alphabet (each letter followed by the next) picks the
    next letter among 4 nearly always; the same examples with their labels shuffled score about
    chance (1/4): the score follows the model, not the answer's position or the choices."""
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for _ in range(3000):
        start = int(rng.integers(0, 18))
        lines.append(" ".join(letters[start : start + 8]))
    book = tmp_path / "alphabet.txt"
    book.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(
        tmp_path / "run",
        tmp_path / "cache",
        f"data.source=text:{book}",
        "data.vocab_size=290",  # barely above the bytes and letters: pieces stay single letters
        "model.seq_len=32",
        "train.steps=300",
        "train.eval_every=0",
        "checkpoint.every=0",
    )
    loop.train(cfg, progress=False)
    examples, shuffled = [], []
    for _ in range(40):
        start = int(rng.integers(0, 20))
        context = " ".join(letters[start : start + 4])
        right = letters[start + 4]
        wrong = rng.choice([c for c in letters if c != right], 3, replace=False)
        choices = [f" {c}" for c in [right, *wrong]]
        order = rng.permutation(4)
        label = int(np.argwhere(order == 0)[0, 0])
        examples.append(
            {"context": context, "choices": [choices[k] for k in order], "label": label}
        )
        shuffled.append({**examples[-1], "label": int(rng.integers(0, 4))})
    scores = {}
    for name, rows in (("pattern", examples), ("shuffled", shuffled)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert cli.main(["eval", str(tmp_path / "run"), "--tasks", str(path)]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["tasks"][name]["acc"]
    agree = np.mean([s["label"] == e["label"] for s, e in zip(shuffled, examples, strict=True)])
    assert scores["pattern"] >= 0.9, scores  # 0.975 measured
    # the shuffled copy is right exactly where its random label hit the true answer
    assert scores["shuffled"] <= agree + 0.1 and scores["shuffled"] < 0.5
