"""Every mesh shape trains the same model: data, FSDP and tensor parallel are layouts, not maths.

One tiny f32 model (d_model 64, 8 heads, d_ff 256, vocab 512: all divisible by 8) trains 5
steps in-process on one device and on five 8-device meshes; losses and parameters must agree,
shards must really be split, and every mesh mistake must be one clear ConfigError.
"""

import collections
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import ConfigError
from gptjax.core import model, sharding, steps
from gptjax.data.batching import from_windows
from gptjax.tools import plan
from tests.conftest import tiny_config

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (2, 4, 1)]
STEPS = 5
LR = 3e-3
# Adam's update m/(sqrt(v) + eps) has a slope of up to 1/eps in the gradient. With the default
# eps 1e-8, a gradient within f32 rounding of zero (the key bias's is exactly 0 in exact maths:
# softmax ignores a constant shift) moves its weight by anything in ±LR depending on the order
# of the sums, i.e. on the mesh and on the CPU's vector width. eps 1e-4 bounds that slope while
# leaving the bulk of updates alone (median |g| here is ~1e-3): the parameters are determined.
EPS = 1e-4
# Large parameters: every weight matrix and both embedding tables (the rest are 2×64 vectors).
LARGE = {"wte", "wpe", "qkv_w", "out_w", "fc_w", "proj_w"}


def config_for(run_dir, cache_dir, data=1, fsdp=1, tensor=1, *more):
    return tiny_config(
        run_dir,
        cache_dir,
        "model.n_head=8",
        "model.dtype=float32",
        f"optim.lr={LR}",
        f"optim.eps={EPS}",
        "optim.warmup_steps=0",  # the first step already moves the parameters
        f"train.steps={STEPS}",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
        *more,
    )


def batches(vocab=512, batch=8, seq=64):
    """Learnable rows (arithmetic progressions mod vocab), so the loss really falls."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, vocab, (STEPS, batch, 1))
    stride = rng.integers(1, 4, (STEPS, batch, 1))
    return ((start + stride * np.arange(seq + 1)) % vocab).astype(np.int32)


def run(cfg, devices):
    """Train STEPS steps in-process; returns (init params, losses, final state, XLA memory).

    The step is steps.make_train_step's jit, compiled ahead of time as `gptjax plan` does, so
    the same executable also gives XLA's memory analysis.
    """
    setup = steps.build(cfg, devices)
    state = steps.init_state(setup)
    init = jax.device_get(state["params"])
    step = plan.compile_step(setup)
    losses = []
    for tokens in batches():
        batch = from_windows(tokens, eod_id=0)
        state, stats = step(state, jax.device_put(batch, setup.batch_shardings))
        losses.append(float(stats["loss"]))
    return init, np.array(losses), state, plan.xla_memory(setup, step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("sharding")
    out = {(1, 1, 1): run(config_for(run_dir, cache_dir), jax.devices()[:1])}
    for shape in MESHES:
        out[shape] = run(config_for(run_dir, cache_dir, *shape), jax.devices()[:8])
    return out


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_trains_like_one_device(runs, shape):
    ref_init, ref_losses, ref_state, _ = runs[(1, 1, 1)]
    init, losses, state, _ = runs[shape]
    # Sharded initialisation draws the same numbers as unsharded (partitionable threefry).
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(ref_init), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it learns, so the comparison means something
    # Tolerances. A mesh only changes the order of f32 sums (partial matmuls + all-reduce), so
    # each op differs by a few ulp (f32 eps 1.2e-7); over 2 layers and 5 steps we measured
    # <= 2.4e-7 relative on the loss, hence rtol 1e-6. Each Adam step moves a weight by at most
    # LR·2δg/EPS for a gradient difference δg: with gradients <= 0.3 and δg <= 1e-8 (a few ulp
    # of their sums), 5 steps differ by <= 5·3e-3·2e4·1e-8 = 3e-6 plus the parameters' own f32
    # rounding (1.2e-7 at |p| = 1); we measured <= 2.2e-7. atol 1e-4 (3% of one step's LR) is
    # far above that and far below a real layout bug's error (a whole step: ~LR per weight).
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    params = jax.device_get(state["params"])
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, a), b in zip(flat, jax.tree.leaves(ref_state["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def _name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def _shard_fraction(array) -> list[float]:
    return [shard.data.nbytes / array.nbytes for shard in array.addressable_shards]


def test_fsdp_splits_params_and_adam_moments_eight_ways(runs):
    _, _, state, _ = runs[(1, 8, 1)]
    large = {
        _name(path): a
        for path, a in jax.tree_util.tree_leaves_with_path(state["params"])
        if _name(path) in LARGE
    }
    assert set(large) == LARGE
    for name, array in large.items():
        assert len(array.addressable_shards) == 8
        assert _shard_fraction(array) == [1 / 8] * 8, name
    # Adam's mu and nu: the optimiser leaves shaped like a large parameter.
    shapes = {a.shape for a in large.values()}
    moments = [a for a in jax.tree.leaves(state["opt_state"]) if a.shape in shapes]
    assert len(moments) == 2 * len(large)
    for array in moments:
        assert _shard_fraction(array) == [1 / 8] * 8
    # The 8 shards are different slices, not 8 copies.
    starts = {str(shard.index) for shard in large["fc_w"].addressable_shards}
    assert len(starts) == 8


def test_tensor_parallel_splits_heads_and_mlp(runs):
    _, _, state, _ = runs[(1, 1, 8)]
    blocks = state["params"]["blocks"]
    L, D, N, H, F = 2, 64, 8, 8, 256
    expected = {
        "qkv_w": (L, D, 3, N // 8, H),  # heads split
        "out_w": (L, N // 8, H, D),
        "fc_w": (L, D, F // 8),  # mlp split
        "proj_w": (L, F // 8, D),
    }
    for name, shard_shape in expected.items():
        shards = blocks[name].addressable_shards
        assert {shard.data.shape for shard in shards} == {shard_shape}, name
        assert len({str(shard.index) for shard in shards}) == 8
    assert {s.data.shape for s in state["params"]["wte"].addressable_shards} == {(512 // 8, D)}


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_plan_bytes_are_the_bytes_each_device_holds(runs, tmp_path, cache_dir, shape):
    """gptjax plan's analytic bytes/device equal the trained arrays' real shards and XLA's."""
    _, _, state, xla = runs[shape]
    planned = plan.state_bytes(steps.build(config_for(tmp_path, cache_dir, *shape)))
    for part in ("params", "opt_state"):
        held = collections.Counter()
        for array in jax.tree.leaves(state[part]):
            for shard in array.addressable_shards:
                held[shard.device] += shard.data.nbytes
        assert set(held.values()) == {planned[part]}, part
    # ... and XLA's compiled step takes that state as its (donated) arguments: within 5%.
    assert xla["state"] == pytest.approx(planned["params"] + planned["opt_state"], rel=0.05)
    assert xla["alias"] == pytest.approx(xla["state"], rel=0.05)
    assert xla["total"] > xla["state"]


def test_sharded_init_never_holds_the_whole_model(tmp_path, cache_dir):
    """Init compiled for fsdp=8: each device outputs 1/8 and never builds the full params."""
    cfg = config_for(tmp_path, cache_dir, 1, 8, 1, "model.d_model=256", "model.vocab_size=4096")
    setup = steps.build(cfg, jax.devices()[:8])

    def init():  # the body of steps.init_state
        params = model.init_params(cfg.model, cfg.seed)
        opt = setup.optimizer.init(params)
        return {"params": params, "opt_state": opt, "step": jnp.zeros((), jnp.int32)}

    with setup.activate():
        stats = jax.jit(init, out_shardings=setup.state_shardings).lower().compile()
    stats = stats.memory_analysis()
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state["params"]))
    per_device = sum(
        np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(setup.abstract_state)
    )
    assert stats.output_size_in_bytes == pytest.approx(per_device, rel=1e-3)  # small: padding
    assert stats.temp_size_in_bytes < full / 2


# --- mistakes: one clear line each, before compiling ------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("mesh.data=2", "mesh.fsdp=2"), "mesh data=2 fsdp=2 tensor=1 needs 4 devices but 8"),
        (("mesh.data=-1", "mesh.fsdp=3"), "does not divide the 8 devices"),
        (("mesh.data=8", "train.batch_size=12"), "train.batch_size=12 is not divisible by "),
        (
            ("mesh.data=2", "mesh.fsdp=4", "train.batch_size=16", "train.micro_batches=4"),
            "train.batch_size=16 / train.micro_batches=4 = 4 rows per micro-batch is not "
            "divisible by mesh.data×mesh.fsdp=8",
        ),
        (("mesh.tensor=8", "model.n_head=4"), "model.n_head=4 is not divisible by mesh.tensor=8"),
        (("mesh.tensor=8", "model.d_ff=100"), "model.d_ff=100 is not divisible by mesh.tensor=8"),
        (
            ("mesh.tensor=8", "model.vocab_size=500"),
            "model.vocab_size=500 is not divisible by mesh.tensor=8",
        ),
        (("mesh.fsdp=8", "model.d_model=36", "model.n_head=4"), "model.d_model=36 is not"),
        (("mesh.data=8", "mesh.rules={embd: fsdp}"), "mesh.rules.embd: unknown logical axis"),
        (("mesh.data=8", "mesh.rules={embed: model}"), "mesh.rules.embed: unknown mesh axis"),
        (("mesh.expert=8",), "mesh.expert=8 splits experts but the model is dense"),
    ],
)
def test_mesh_mistakes_are_one_line_config_errors(tmp_path, cache_dir, overrides, message):
    cfg = tiny_config(tmp_path, cache_dir, "model.n_head=8", "mesh.data=1", *overrides)
    with pytest.raises(ConfigError) as error:
        steps.build(cfg, jax.devices()[:8])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_axis_that_shards_no_parameter_warns(tmp_path, cache_dir, caplog):
    rules = "mesh.rules={heads: null, mlp: null, vocab: null}"
    cfg = config_for(tmp_path, cache_dir, 4, 1, 2, rules)
    with caplog.at_level(logging.WARNING, logger="gptjax"):
        steps.build(cfg, jax.devices()[:8])
    lines = [r.getMessage() for r in caplog.records if r.name == "gptjax"]
    assert lines == [
        "mesh.tensor=2 shards no parameter (its 2 device groups repeat the same work); "
        "check mesh.rules or the mesh shape"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gptjax"):  # plain data parallel: no warning
        steps.build(config_for(tmp_path, cache_dir, 8, 1, 1), jax.devices()[:8])
    assert not [r for r in caplog.records if r.name == "gptjax"]


def test_rules_override_changes_the_layout(tmp_path, cache_dir):
    """mesh.rules in the config: shard the MLP over fsdp+tensor and leave embed whole."""
    rules = "mesh.rules={embed: null, mlp: [fsdp, tensor]}"
    setup = steps.build(config_for(tmp_path, cache_dir, 1, 4, 2, rules), jax.devices()[:8])
    specs = setup.state_shardings["params"]["blocks"]
    assert tuple(specs["fc_w"].spec) == (None, None, ("fsdp", "tensor"))
    assert tuple(specs["proj_w"].spec) == (None, ("fsdp", "tensor"), None)
    assert tuple(specs["ln1_scale"].spec) == (None, None)
    # An axis is used once per array: with the default rules embed takes fsdp first.
    default = sharding.logical_to_spec(("embed", "mlp"), sharding.make_rules({"mlp": ["fsdp"]}))
    assert tuple(default) == ("fsdp", None)
