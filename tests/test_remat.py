"""Every rematerialisation policy computes the same loss and gradients as no remat."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from gptjax.core import model, steps
from gptjax.data.batching import from_windows


def _loss_and_grads(tmp_path, cache_dir, *overrides):
    cfg = tiny_config(tmp_path, cache_dir, *overrides)
    setup = steps.build(cfg, jax.devices()[:1])
    params = steps.init_state(setup)["params"]
    tokens = jax.random.randint(jax.random.key(3), (4, cfg.model.seq_len + 1), 0, 512)
    batch = from_windows(np.asarray(tokens), eod_id=0)
    f = lambda p: steps.token_losses(setup.graphdef, p, batch).mean()
    return jax.jit(jax.value_and_grad(f))(params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    return _loss_and_grads(tmp_path_factory.mktemp("remat"), cache_dir, "model.remat=none")


@pytest.mark.parametrize("policy", sorted(model.REMAT_POLICIES))
def test_policy_matches_no_remat(policy, reference, tmp_path, cache_dir):
    value, grads = _loss_and_grads(tmp_path, cache_dir, f"model.remat={policy}")
    ref_value, ref_grads = reference
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for got, want in zip(flat, ref_flat, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_remat_full_saves_memory_in_the_compiled_step(tmp_path, cache_dir):
    """remat=full keeps fewer bytes alive than none (XLA's own memory analysis of the step)."""

    def temp_bytes(policy):
        cfg = tiny_config(
            tmp_path, cache_dir, f"model.remat={policy}", "model.n_layer=4", "train.batch_size=16"
        )
        setup = steps.build(cfg, jax.devices()[:1])
        step = steps.make_train_step(setup)
        batch = setup.abstract_batch(16)
        with setup.activate():
            compiled = step.jitted.lower(setup.abstract_state, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes("none")


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_gradient_accumulation_holds_one_f32_gradient_buffer(param_dtype, tmp_path, cache_dir):
    """Read from XLA's memory analysis of the compiled step: accumulating over 4
    micro-batches keeps at most one extra f32 gradient-sized buffer (the accumulator) beyond
    what one batch needs, whatever the parameter dtype (bf16 parameters accumulate in f32)."""

    def temp_bytes(micro):
        cfg = tiny_config(
            tmp_path,
            cache_dir,
            "model.d_model=256",
            "model.n_head=4",
            "model.n_layer=4",
            "model.seq_len=16",
            "train.batch_size=4",
            f"train.micro_batches={micro}",
            f"model.param_dtype={param_dtype}",
        )
        setup = steps.build(cfg, jax.devices()[:1])
        with setup.activate():
            compiled = (
                steps.make_train_step(setup)
                .jitted.lower(setup.abstract_state, setup.abstract_batch())
                .compile()
            )
        f32_grads = 4 * model.count_params(setup.abstract_state["params"])
        return compiled.memory_analysis().temp_size_in_bytes, f32_grads

    one, grads = temp_bytes(1)
    four, _ = temp_bytes(4)
    assert four - one <= grads


def _forward_scan_outputs(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every forward (not reversed) scan's outputs, nested jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and not eqn.params["reverse"]:
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes += _forward_scan_outputs(inner)
    return shapes


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_scanned_layers_do_not_save_a_copy_of_the_parameters(policy, tmp_path, cache_dir):
    """Under remat the forward scan saves each layer's inputs for the backward pass, never the
    layer's parameter slice: a stacked [n_layer, ...] copy of every block parameter (10 GiB per
    device for GPT-3 175B on 64 GPUs with fsdp 64, in XLA:GPU's memory analysis)."""
    cfg = tiny_config(tmp_path, cache_dir, f"model.remat={policy}", "model.n_layer=3")
    setup = steps.build(cfg, jax.devices()[:1])
    params = setup.abstract_state["params"]
    tokens = np.zeros((2, cfg.model.seq_len + 1), np.int32)
    batch = from_windows(tokens, eod_id=0)
    f = lambda p: steps.token_losses(setup.graphdef, p, batch).mean()
    saved = _forward_scan_outputs(jax.make_jaxpr(jax.grad(f))(params).jaxpr)
    assert saved, "no forward scan over the layers"
    stacked = {tuple(leaf.shape) for leaf in jax.tree.leaves(params["blocks"])}
    assert stacked, params.keys()
    assert not stacked & set(saved), sorted(stacked & set(saved))
