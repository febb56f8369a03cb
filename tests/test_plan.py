"""`gptjax plan`: counts, FLOPs and bytes per device against hand formulas and XLA's analysis."""

import json
import math
from pathlib import Path

import jax
import pytest

from gptjax import cli, config
from gptjax.tools import plan
from tests.conftest import ROOT, tiny_config

L, D, N, F, V, T = 2, 64, 8, 256, 512, 64  # the tiny model below


def tiny(tmp_path, cache_dir, *overrides):
    return tiny_config(tmp_path, cache_dir, "model.n_head=8", "mesh.data=1", *overrides)


def hand_counts(L, D, F, V, P, tied=True):
    """Parameters of a GPT-2 by hand, and those with no `embed` axis (qkv_b [L,3,D], fc_b [L,F])."""
    layer = 2 * D + 3 * D * D + 3 * D + D * D + D + 2 * D + D * F + F + F * D + D
    total = V * D + P * D + L * layer + 2 * D + (0 if tied else D * V)
    return total, L * (3 * D + F)


def hand_param_bytes(L, D, F, V, P, fsdp, tensor):
    """f32 bytes per device, default rules: embed over fsdp; vocab, heads, mlp over tensor."""
    e, t = fsdp, tensor
    per_layer = 4 * D // e  # two layer norms (scale, bias)
    per_layer += 3 * D * D // (e * t) + 3 * D // t  # qkv_w [D, 3, N, H], qkv_b [3, N, H]
    per_layer += D * D // (t * e) + D // e  # out_w [N, H, D], out_b
    per_layer += D * F // (e * t) + F // t + F * D // (t * e) + D // e  # fc_w, fc_b, proj_w, proj_b
    return 4 * (V * D // (t * e) + P * D // e + L * per_layer + 2 * D // e)


def test_counts_and_flops_follow_the_hand_formulas(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir, "mesh.fsdp=8")
    report = plan.plan(cfg, jax.devices()[:8], xla=False)
    total, _ = hand_counts(L, D, F, V, P=T)
    assert report["params"] == total
    assert report["non_embedding_params"] == total - V * D - T * D
    assert sum(math.prod(row["shape"]) for row in report["param_table"]) == total
    # PaLM appendix B: 6·N + 12·L·H·Q·T, N without position embeddings.
    assert report["flops_per_token"] == 6 * (total - T * D) + 12 * L * N * (D // N) * T
    assert report["tokens_per_step"] == 8 * T


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)], ids=["fsdp8", "2x2x2"])
def test_bytes_per_device_by_hand(tmp_path, cache_dir, mesh):
    data, fsdp, tensor = mesh
    shape = (f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    report = plan.plan(tiny(tmp_path, cache_dir, *shape), jax.devices()[:8], xla=False)
    size = report["bytes_per_device"]
    total, no_embed = hand_counts(L, D, F, V, P=T)
    if mesh == (1, 8, 1):  # everything with an embed axis is split 8 ways, the rest replicated
        assert size["params"] == 4 * ((total - no_embed) // 8 + no_embed)
    assert size["params"] == hand_param_bytes(L, D, F, V, T, fsdp, tensor)
    assert size["grads"] == size["params"]
    assert size["opt_state"] == pytest.approx(2 * size["params"], abs=64)  # + Adam's counters
    assert report["xla"] is None and size["xla_total"] is None  # XLA: see test_sharding.py


def test_gpt3_configs_match_the_paper():
    """Table 2.1 of the GPT-3 paper: sizes, learning rates, batch sizes in tokens."""
    table = {  # name: (params, layers, d_model, heads, batch tokens, lr)
        "125m": (125e6, 12, 768, 12, 0.5e6, 6.0e-4),
        "350m": (350e6, 24, 1024, 16, 0.5e6, 3.0e-4),
        "760m": (760e6, 24, 1536, 16, 0.5e6, 2.5e-4),
        "1.3b": (1.3e9, 24, 2048, 16, 1e6, 2.0e-4),  # 16 heads of 128 (paper: 24)
        "2.7b": (2.7e9, 32, 2560, 32, 1e6, 1.6e-4),
        "6.7b": (6.7e9, 32, 4096, 32, 2e6, 1.2e-4),
        "13b": (13e9, 40, 5120, 40, 2e6, 1.0e-4),  # d_model 5120 (paper: 5140)
        "175b": (175e9, 96, 12288, 96, 3.2e6, 0.6e-4),
    }
    from gptjax.core import flops

    for name, (params, layers, width, heads, batch_tokens, lr) in table.items():
        cfg = config.load(ROOT / "configs" / f"gpt3_{name}.yaml")
        m = cfg.model
        assert (m.n_layer, m.d_model, m.n_head, m.seq_len) == (layers, width, heads, 2048), name
        assert m.vocab_size == 50304 and m.dtype == "bfloat16", name
        assert flops.param_counts(m)["params"] == pytest.approx(params, rel=0.02), name  # <= 1.8%
        tokens = cfg.train.batch_size * m.seq_len
        assert tokens == pytest.approx(batch_tokens, rel=0.05 if name != "175b" else 0.02), name
        assert cfg.optim.lr == lr and (cfg.optim.b1, cfg.optim.b2) == (0.9, 0.95), name
        assert (cfg.optim.clip_norm, cfg.optim.weight_decay) == (1.0, 0.1), name
        assert cfg.train.steps * tokens == pytest.approx(300e9, rel=1e-4), name


def test_plan_175b_on_64_devices_in_a_fresh_process(capfd):
    """This process has 8 devices: `plan --devices 64` reruns itself with 64 fake ones."""
    config_path = str(ROOT / "configs/gpt3_175b.yaml")
    code = cli.main(["plan", config_path, "--devices", "64", "--json", "--no-xla"])
    assert code == 0
    report = json.loads(capfd.readouterr().out)
    shape = dict(L=96, D=12288, F=4 * 12288, V=50304, P=2048)
    assert report["params"] == hand_counts(**shape)[0]
    assert report["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 8}
    params = hand_param_bytes(**shape, fsdp=8, tensor=8)
    assert report["bytes_per_device"]["params"] == params  # 10.2 GiB
    assert report["bytes_per_device"]["xla_total"] is None  # --no-xla
    assert set(report["bytes_per_device"]) == {"params", "grads", "opt_state", "xla_total"}


def test_plan_text_with_param_table(tmp_path, cache_dir, capsys):
    path = Path(tmp_path) / "tiny.yaml"
    path.write_text(tiny(tmp_path, cache_dir).to_yaml())
    assert cli.main(["plan", str(path), "mesh.tensor=8", "--devices", "8", "--params"]) == 0
    out = capsys.readouterr().out
    assert "XLA:CPU compiled" in out and "6N + 12LHQT (PaLM appendix B" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line.startswith("blocks.")
    }
    # qkv_w [2, 64, 3, 8, 8] split on heads: 2*64*3*1*8 floats per device.
    assert rows["blocks.qkv_w"][1] == "2×64×3×8×8"
    assert "'tensor'" in " ".join(rows["blocks.qkv_w"])
    assert rows["blocks.qkv_w"][-1] == f"{4 * 2 * 64 * 3 * 8:,}"
    assert rows["blocks.fc_w"][-1] == f"{4 * 2 * 64 * 256 // 8:,}"


def test_plan_mistake_is_one_line(tmp_path, cache_dir, capsys):
    path = Path(tmp_path) / "tiny.yaml"
    path.write_text(tiny(tmp_path, cache_dir).to_yaml())
    code = cli.main(["plan", str(path), "mesh.tensor=4", "model.n_head=2", "--devices", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "gptjax: error: model.n_head=2 is not divisible by mesh.tensor=4; " + (
        "change the model size, the mesh or mesh.rules\n"
    )
