"""optim.name=muon: two optimiser steps against a NumPy float64 reference written here from the
formula (per-weight reshapes spelled out by hand, not from the axis rule), the same train steps
on sharded meshes, and the plain AdamW update on the embeddings, head, norms and biases."""

import math

import jax
import numpy as np
import pytest

from gptjax import config
from gptjax.core import model, optim, steps
from gptjax.training import runs
from tests.conftest import tiny_config

BASE = [
    "model.n_head=8",
    "model.dtype=float32",
    "model.tie_embeddings=false",  # a head of its own: AdamW's
    "optim.name=muon",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.muon_lr=0.02",
    "optim.muon_weight_decay=0.1",
]
GROUPED = ["model.n_kv_head=2", "model.mlp=swiglu", "model.norm=rmsnorm"]
MUON = {"qkv_w", "q_w", "kv_w", "out_w", "fc_w", "gate_w", "proj_w"}


def _ns5(m):
    """Newton-Schulz, Keller Jordan's quintic, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.T if m.shape[0] > m.shape[1] else m
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if m.shape[0] > m.shape[1] else x


def _orth(name, u):
    """Each layer's matrices of `u` [L, ...] orthogonalised and scaled by sqrt(max(1, out/in))."""
    out = np.empty_like(u)
    for layer in range(u.shape[0]):
        w = u[layer]
        if name in ("qkv_w", "kv_w"):  # [D, 3 or 2, heads, H]: q, k, v apart, each D x heads*H
            for j in range(w.shape[1]):
                m = w[:, j].reshape(w.shape[0], -1)
                out[layer, :, j] = (_ns5(m) * math.sqrt(max(1, m.shape[1] / m.shape[0]))).reshape(
                    w[:, j].shape
                )
            continue
        if name == "out_w":  # [N, H, D]: N*H x D
            m = w.reshape(-1, w.shape[-1])
        elif name == "q_w":  # [D, N, H]: D x N*H
            m = w.reshape(w.shape[0], -1)
        else:  # fc_w, gate_w [D, F], proj_w [F, D]
            m = w
        out[layer] = (_ns5(m) * math.sqrt(max(1, m.shape[1] / m.shape[0]))).reshape(w.shape)
    return out


def _leaf(path):
    return str(getattr(path[-1], "key", path[-1]))


def _setup(cfg):
    """Parameters, two random gradients (float32) and the Muon and plain AdamW optimisers."""
    _, abstract = model.abstract(cfg.model)
    decay = model.declared(abstract, "decay")
    axes = model.declared(abstract, "out_sharding")
    tx = optim.make(cfg.optim, 10, decay, None, axes)
    adamw = optim.make(cfg.optim.model_copy(update={"name": "adamw"}), 10, decay)
    params = jax.device_get(model.init_params(cfg.model, 0))
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda p: (0.01 * rng.standard_normal(p.shape)).astype(np.float32), params)
        for _ in range(2)
    ]
    return params, grads, tx, adamw


def _two_steps(tx, params, grads, shardings=None):
    """The updates of two optimiser steps, jitted (on the (params, opt_state) `shardings`)."""
    if shardings is None:
        update, put_p, put_s = jax.jit(tx.update), (lambda x: x), (lambda x: x)
    else:
        p_sh, s_sh = shardings
        update = jax.jit(tx.update, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
        put_p, put_s = (lambda x: jax.device_put(x, p_sh)), (lambda x: jax.device_put(x, s_sh))
    params = put_p(params)
    state, p, out = put_s(tx.init(params)), params, []
    for g in grads:
        u, state = update(put_p(g), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        out.append(u)
    return jax.device_get(out), state


def _one_device(cache_dir, run_dir, more):
    cfg = tiny_config(run_dir, cache_dir, *BASE, *more)
    params, grads, tx, adamw = _setup(cfg)
    got, _ = _two_steps(tx, params, grads)
    plain, _ = _two_steps(adamw, params, grads)
    return cfg, params, grads, got, plain


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, cache_dir):
    return _one_device(cache_dir, tmp_path_factory.mktemp("muon"), [])


@pytest.mark.parametrize("variant", ["gpt2", "grouped"])
def test_two_muon_steps_match_a_numpy_float64_reference(request, tmp_path, cache_dir, variant):
    if variant == "gpt2":
        one_device = request.getfixturevalue("gpt2")
    else:  # grouped heads (q_w, kv_w), SwiGLU (gate_w), RMSNorm
        one_device = _one_device(cache_dir, tmp_path, GROUPED)
    cfg, params, grads, got, plain = one_device
    oc = cfg.optim
    names = {model.param_name(path): _leaf(path) for path, _ in jax.tree.leaves_with_path(params)}
    grouped = cfg.model.n_kv_head is not None
    assert {n for n in names.values() if n in MUON} == (
        {"q_w", "kv_w", "out_w", "fc_w", "gate_w", "proj_w"}
        if grouped
        else {"qkv_w", "out_w", "fc_w", "proj_w"}
    )

    # The reference: global-norm clipping of all gradients, then Muon on the matrices.
    p = {k: v.astype(np.float64) for k, v in model.by_name(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    mu, lr, wd = oc.muon_momentum, oc.muon_lr, oc.muon_weight_decay
    for step, g in enumerate(grads):
        g = {k: v.astype(np.float64) for k, v in model.by_name(g).items()}
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
        g = {k: v * min(1.0, oc.clip_norm / norm) for k, v in g.items()}
        got_step, plain_step = model.by_name(got[step]), model.by_name(plain[step])
        for name, leaf in names.items():
            if leaf not in MUON:  # exactly AdamW's update, bit for bit
                np.testing.assert_array_equal(got_step[name], plain_step[name], err_msg=name)
                continue
            m[name] = mu * m[name] + (1 - mu) * g[name]
            u = (1 - mu) * g[name] + mu * m[name]  # Nesterov
            want = -lr * (_orth(leaf, u) + wd * p[name])
            p[name] = p[name] + want
            # f32 Newton-Schulz against f64: the update's entries are ~lr/sqrt(D) = 2.5e-3
            np.testing.assert_allclose(got_step[name], want, rtol=0, atol=1e-5 * lr, err_msg=name)
        # The first step's update is orthogonal-ish: singular values of O near 1 (0.7..1.2)
        if step == 0:
            o = model.by_name(got[0])["blocks.fc_w"][0] / -lr  # wd·w is ~1e-3 of it
            s = np.linalg.svd(o / math.sqrt(max(1, o.shape[1] / o.shape[0])), compute_uv=False)
            assert 0.6 < s.min() and s.max() < 1.3


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2), (1, 1, 8)], ids=["fsdp8", "2x2x2", "tp8"])
def test_muon_steps_on_sharded_matrices_equal_one_device(gpt2, mesh):
    cfg, params, grads, got, _ = gpt2
    cfg = cfg.model_copy(deep=True)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    setup = steps.build(cfg, jax.devices()[:8])
    shard_p, shard_s = setup.param_shardings, setup.state_shardings["opt_state"]
    sharded, state = _two_steps(setup.optimizer, params, grads, (shard_p, shard_s))
    # A mesh reorders f32 sums (a few ulp); Newton-Schulz's slope bounds what that does to the
    # update. atol 1e-5 of one Muon step (lr 0.02); a layout bug (a matrix orthogonalised per
    # shard, q/k/v mixed) moves weights by ~a whole step.
    for step in range(2):
        for name, a in model.by_name(sharded[step]).items():
            b = model.by_name(got[step])[name]
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * cfg.optim.muon_lr, err_msg=name)
    # fc_w [L, D, F] is (layers, embed, mlp): its momentum is sharded as the weight is
    momentum = state[1].inner_states["muon"].inner_state.momentum["blocks"]["fc_w"]
    assert momentum.sharding.spec == shard_p["blocks"]["fc_w"].spec
    assert momentum.sharding.spec != jax.sharding.PartitionSpec()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.name=sgd", "optim.name: Input should be 'adamw' or 'muon' (got 'sgd')"),
        ("optim.muon_momentum=1", "optim.muon_momentum: Input should be less than 1"),
        ("optim.muon_ns_steps=0", "optim.muon_ns_steps: Input should be greater than 0"),
    ],
)
def test_bad_muon_keys_are_one_line(override, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, [override])


def test_resuming_with_the_other_optimiser_is_one_line(tmp_path, cache_dir):
    saved = tiny_config(tmp_path, cache_dir)
    (tmp_path / "config.yaml").write_text(saved.to_yaml())
    assert runs.check_resume(tmp_path, saved) == []
    with pytest.raises(config.ConfigError, match=r"trained with optim.name=adamw, whose .* "):
        runs.check_resume(tmp_path, tiny_config(tmp_path, cache_dir, "optim.name=muon"))
