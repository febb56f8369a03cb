"""Config loading, overrides and the errors a user sees (one line, non-zero exit)."""

import pytest
from conftest import ROOT, run_cli

from gptjax import config
from gptjax.data import DataError, sources


def test_yaml_plus_dotted_overrides():
    cfg = config.load(ROOT / "configs" / "quickstart.yaml", ["model.n_layer=6", "optim.lr=1e-3"])
    assert cfg.model.n_layer == 6 and cfg.optim.lr == 1e-3
    assert cfg.model.d_model == 128  # from the file
    assert cfg.checkpoint.async_ is True
    assert config.load(None, ["checkpoint.async=false"]).checkpoint.async_ is False


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config.load(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layr=3"], "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
        (["trian.steps=3"], "unknown config key 'trian'; did you mean 'train'?"),
        (["model.d_model=100", "model.n_head=3"], "model.d_model=100 is not divisible by"),
        (["model.seq_len=512", "model.max_positions=256"], "model.seq_len=512 exceeds"),
        (["train.steps=-1"], "train.steps: Input should be greater than or equal to 0"),
        (["train.batch_size=10", "train.micro_batches=4"], "not divisible by train.micro"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "only one of mesh.data"),
        (["model.dtype=float16"], "model.dtype"),
        (["steps"], "override 'steps' must look like key=value"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(config.ConfigError) as error:
        config.load(None, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_an_unknown_data_source_is_one_line_before_anything_is_written(tmp_path):
    """The data side knows the sources (the config does not import it): the same one line."""
    with pytest.raises(DataError, match="data.source='s3://bucket': unknown source") as error:
        sources.check(config.load(None, ["data.source=s3://bucket"]).data)
    assert "\n" not in str(error.value)
    run_dir, cache = tmp_path / "r", tmp_path / "cache"
    overrides = ["data.source=s3://bucket", f"run_dir={run_dir}", f"data.cache_dir={cache}"]
    result = run_cli("train", "configs/debug.yaml", *overrides)
    assert result.returncode == 2
    assert result.stderr.startswith("gptjax: error: data.source='s3://bucket': unknown source")
    assert result.stderr.count("\n") == 1
    assert not run_dir.exists() and not cache.exists()


def test_cli_reports_config_errors_without_traceback(tmp_path):
    result = run_cli("train", "configs/debug.yaml", "model.n_layr=3", f"run_dir={tmp_path}/r")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "gptjax: error: unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"
    )
    assert not (tmp_path / "r").exists()  # nothing written for a bad config

    missing = run_cli("train", "configs/nope.yaml")
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    assert "Traceback" not in missing.stderr

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {n_layer: [\n")
    result = run_cli("train", str(bad_yaml))
    assert result.returncode == 2 and "is not valid YAML" in result.stderr
