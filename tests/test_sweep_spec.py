"""Sweep specs expand into the right runs; a bad spec is one line (gptjax/experiments/spec.py)."""

import itertools
import math

import pytest
import yaml
from conftest import ROOT, run_cli

from gptjax import config
from gptjax.core import flops
from gptjax.experiments import spec

DEBUG = str(ROOT / "configs" / "debug.yaml")


def write_spec(tmp_path, body, name="s.yaml"):
    body = {"base": DEBUG, "dir": str(tmp_path / "sweep")} | body
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_grid_is_the_cartesian_product_in_order(tmp_path):
    path = write_spec(
        tmp_path,
        {
            "overrides": {"train.steps": 7},
            "grid": {
                "size": [
                    {"model.d_model": 32, "model.n_head": 2},
                    {"model.d_model": 64, "model.n_head": 4},
                ],
                "optim.lr": [1.0e-3, 3.0e-3, 1.0e-2],
            },
        },
    )
    sweep = spec.load(path)
    got = [(r.config.model.d_model, r.config.model.n_head, r.config.optim.lr) for r in sweep.runs]
    assert got == [(d, h, lr) for d, h in ((32, 2), (64, 4)) for lr in (1e-3, 3e-3, 1e-2)]
    assert [r.index for r in sweep.runs] == list(range(6))
    for run in sweep.runs:
        assert run.config.train.steps == 7  # the overrides reach every run
        assert run.directory == tmp_path / "sweep" / run.name
        # everything else is the base config
        base = config.load(DEBUG)
        assert run.config.model.n_layer == base.model.n_layer
        assert run.config.data == base.data
    assert len({r.name for r in sweep.runs}) == 6
    assert sweep.runs[0].label == "model.d_model=32 model.n_head=2 optim.lr=0.001"


def test_run_names_ignore_execution_settings_only(tmp_path):
    grid = {"optim.lr": [1.0e-3, 2.0e-3]}
    plain = spec.load(write_spec(tmp_path, {"grid": grid}, "a.yaml"))
    executed = spec.load(
        write_spec(
            tmp_path,
            {
                "grid": grid,
                "overrides": {"mesh.data": 1, "checkpoint.every": 3, "model.remat": "full"},
            },
            "b.yaml",
        )
    )
    other = spec.load(
        write_spec(tmp_path, {"grid": grid, "overrides": {"optim.b2": 0.99}}, "d.yaml")
    )
    # a setting spelled out at its default value: the same runs (as a key gptjax adds later)
    spelled = spec.load(
        write_spec(tmp_path, {"grid": grid, "overrides": {"data.packing": "concat"}}, "c.yaml")
    )
    names = [r.name for r in plain.runs]
    assert [r.name for r in executed.runs] == names
    assert [r.name for r in spelled.runs] == names
    assert not set(r.name for r in other.runs) & set(names)


def test_isoflop_steps_spend_each_budget(tmp_path):
    shapes = [
        {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2},
        {"model.n_layer": 2, "model.d_model": 64, "model.n_head": 2},
        {"model.n_layer": 4, "model.d_model": 128, "model.n_head": 4},
    ]
    budgets = [3.0e10, 1.0e12]
    path = write_spec(
        tmp_path,
        {"isoflop": {"budgets": budgets, "shapes": shapes, "min_steps": 20},
         "warmup_fraction": 0.1},
    )  # fmt: skip
    sweep = spec.load(path)
    tokens_per_step = 8 * 64  # debug.yaml: batch 8 x seq 64
    seen = {}
    for run in sweep.runs:
        cfg = run.config
        # PaLM appendix B, by hand: 6 N (without position embeddings) + 12 L H Q T
        d, layers, vocab, ff = cfg.model.d_model, cfg.model.n_layer, 512, 4 * cfg.model.d_model
        per_layer = 4 * d + 3 * d * d + 3 * d + d * d + d + d * ff + ff + ff * d + d
        n = vocab * d + layers * per_layer + 2 * d
        per_token = 6 * n + 12 * layers * d * 64
        assert flops.flops_per_token(cfg.model) == per_token
        exact = run.budget / (per_token * tokens_per_step)
        assert cfg.train.steps == round(exact)
        assert cfg.optim.warmup_steps == round(0.1 * cfg.train.steps)
        seen.setdefault(run.budget, []).append(d)
    # 20 steps of the largest shape cost more than 3e10 FLOPs: left out of that budget only
    assert seen == {3.0e10: [32, 64], 1.0e12: [32, 64, 128]}
    assert sweep.runs[0].label.startswith("budget=3e+10 model.n_layer=1")


def test_lr_rule_scales_with_width(tmp_path):
    path = write_spec(
        tmp_path,
        {
            "grid": {"model.d_model": [32, 64, 128]},
            "lr_rule": {"lr": 2.0e-3, "d_model": 64, "power": 1.0},
        },
    )
    lrs = [r.config.optim.lr for r in spec.load(path).runs]
    assert lrs == pytest.approx([4e-3, 2e-3, 1e-3])


def test_execution_overrides_only():
    assert spec.execution_overrides(["train.stop_at=3", "mesh.data=2"]) == {
        "train.stop_at": 3,
        "mesh.data": 2,
    }
    with pytest.raises(spec.SweepError, match="optim.lr changes what a run computes"):
        spec.execution_overrides(["optim.lr=1"])


BAD_SPECS = [
    ({"grid": {"optim.lr": [1.0e-3]}, "grdi": 1}, "unknown spec key 'grdi'; did you mean 'grid'?"),
    ({"grid": {}}, "grid has no axes"),
    ({"grid": {"optim.lr": []}}, "grid axis 'optim.lr' has no values"),
    ({"grid": {"model.d_modle": [32]}}, "unknown config key 'model.d_modle'"),
    (
        {"isoflop": {"budgets": [1.0e6], "shapes": [{"model.d_model": 32}]}},
        "isoflop budget 1e+06 FLOPs is too small for every shape",
    ),
    ({"overrides": {"train.steps": 5}}, "a sweep spec needs exactly one of 'grid' or 'isoflop'"),
]


@pytest.mark.parametrize(("body", "message"), BAD_SPECS)
def test_bad_spec_is_one_line(tmp_path, body, message):
    path = write_spec(tmp_path, body)
    with pytest.raises(spec.SweepError, match="^" + str(path).replace(".", r"\.") + ": ") as error:
        spec.load(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", [0, 1, 4])  # unknown key, empty grid, budget too small
def test_bad_spec_via_the_cli(tmp_path, case):
    body, message = BAD_SPECS[case]
    path = write_spec(tmp_path, body)
    done = run_cli("sweep", "plan", str(path))
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gptjax: error: {path}: {message}")
    assert not (tmp_path / "sweep").exists()  # nothing written


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=str)
def test_shipped_specs_expand(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # their paths start from the repository root
    sweep = spec.load(path)
    budgets = [r.budget for r in sweep.runs]
    if sweep.spec.isoflop is not None:  # every budget has enough sizes for a parabola
        assert all(budgets.count(b) >= 3 for b in sweep.spec.isoflop.budgets)
        return
    # a grid: every combination of its axes once, in order, each run's config holding its point
    axes = sweep.spec.grid
    assert len(sweep.runs) == math.prod(len(values) for values in axes.values())

    def get(tree, dotted):
        for part in dotted.split("."):
            tree = tree[part]
        return tree

    points = itertools.product(*([{a: v} if "." in a else v for v in vs] for a, vs in axes.items()))
    for run, point in zip(sweep.runs, points, strict=True):
        resolved = run.config.to_dict()
        for part in point:
            assert all(get(resolved, key) == value for key, value in part.items()), run.label
    assert len({run.name for run in sweep.runs}) == len(sweep.runs)
