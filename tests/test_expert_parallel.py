"""Expert parallelism (gptjax/core/expert_parallel.py): the experts split over mesh.expert give
experts_local's result. Oracle: a NumPy loop over tokens and their k experts (SwiGLU experts,
the capacity kept in token-major order), and the gradients of a dense jnp formulation."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from jax.sharding import NamedSharding

from gptjax import config
from gptjax.config import ConfigError, MeshConfig
from gptjax.core import expert_parallel, model, sharding, steps
from gptjax.data.batching import from_windows
from gptjax.tools import plan
from gptjax.training import loop

E, K, D, F, T = 8, 2, 16, 32, 64
NAMES = {
    "up": ("expert", "embed", "mlp"),
    "gate": ("expert", "embed", "mlp"),
    "down": ("expert", "mlp", "embed"),
    "up_b": ("expert", "mlp"),
    "gate_b": ("expert", "mlp"),
    "down_b": ("expert", "embed"),
}


def swiglu_ffn(w, x_RD, ids, group_sizes, cfg=None):
    """Grouped SwiGLU on rows sorted by expert (what moe.grouped computes)."""
    bias = lambda name: w[name][ids] if name in w else 0
    up = jax.lax.ragged_dot(x_RD, w["up"], group_sizes) + bias("up_b")
    gate = jax.lax.ragged_dot(x_RD, w["gate"], group_sizes) + bias("gate_b")
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w["down"], group_sizes) + bias("down_b")


def problem(seed=0, biases=True):
    rng = np.random.default_rng(seed)
    w = {
        "up": rng.normal(0, 0.3, (E, D, F)),
        "gate": rng.normal(0, 0.3, (E, D, F)),
        "down": rng.normal(0, 0.3, (E, F, D)),
    }
    if biases:
        w |= {
            "up_b": rng.normal(0, 0.1, (E, F)),
            "gate_b": rng.normal(0, 0.1, (E, F)),
            "down_b": rng.normal(0, 0.1, (E, D)),
        }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    x = rng.normal(0, 1, (T, D)).astype(np.float32)
    # skewed routing: expert 0 is popular (so a capacity drops), k distinct experts per token
    logits = rng.normal(0, 1, (T, E)) + np.where(np.arange(E) == 0, 1.5, 0)
    expert = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)
    gate = rng.uniform(0.1, 1, (T, K)).astype(np.float32)
    return w, x, expert, gate


def numpy_reference(w, x, expert, gate, capacity):
    silu = lambda a: a / (1 + np.exp(-a))
    y, seen, dropped = np.zeros((T, D)), np.zeros(E, int), 0
    b = lambda name, e: w[name][e] if name in w else 0
    for t in range(T):
        for k in range(K):
            e = expert[t, k]
            seen[e] += 1
            if capacity is not None and seen[e] > capacity:
                dropped += 1
                continue
            up = x[t] @ w["up"][e] + b("up_b", e)
            g = x[t] @ w["gate"][e] + b("gate_b", e)
            y[t] += gate[t, k] * ((silu(g) * up) @ w["down"][e] + b("down_b", e))
    return y, dropped


def dense_reference(w, x, expert, gate, keep):
    """Every expert on every token, the chosen ones picked: differentiable, unsharded."""
    b = lambda name: w[name][:, None] if name in w else 0
    up = jnp.einsum("td,edf->etf", x, w["up"]) + b("up_b")
    g = jnp.einsum("td,edf->etf", x, w["gate"]) + b("gate_b")
    out = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * up, w["down"]) + b("down_b")  # [E, T, D]
    picked = out[expert, jnp.arange(T)[:, None]]  # [T, K, D]
    return (picked * (gate * keep)[..., None]).sum(1)


def on_mesh(data=1, fsdp=1, expert=1, tensor=1):
    cfg = MeshConfig(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
    mesh = sharding.make_mesh(cfg, jax.devices()[: data * fsdp * expert * tensor])
    return mesh, sharding.make_rules(None, expert=expert > 1)


def sharded(mesh, rules, w, x, expert, gate, capacity):
    """experts_sharded under jit with its inputs placed as a step places them."""
    place = lambda a, names: jax.device_put(
        a, NamedSharding(mesh, sharding.logical_to_spec(names, rules))
    )
    w = {k: place(v, NAMES[k]) for k, v in w.items()}
    tokens = [place(a, ("batch", None)) for a in (x, expert, gate)]
    fn = lambda w, x, e, g: expert_parallel.experts_sharded(w, x, e, g, None, capacity, swiglu_ffn)
    with sharding.activate(mesh, rules):
        return jax.jit(fn)(w, *tokens), (w, tokens)


# (mesh, capacity): every expert size, with data, fsdp and tensor; dropless and capacity modes
CASES = [
    (dict(expert=2), 10),
    (dict(expert=4, data=2), None),
    (dict(expert=8), 10),
    (dict(expert=2, fsdp=2, tensor=2), None),
    (dict(expert=2, data=2, fsdp=2), 10),
]


def case_id(case):
    shape, capacity = case
    return "-".join(f"{k}{v}" for k, v in shape.items()) + f"-capacity{capacity}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sharded_experts_equal_a_loop_over_tokens(case):
    shape, capacity = case
    w, x, expert, gate = problem()
    mesh, rules = on_mesh(**shape)
    (y, dropped), _ = sharded(mesh, rules, w, x, expert, gate, capacity)
    y_ref, dropped_ref = numpy_reference(w, x, expert, gate, capacity)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)
    assert int(dropped) == dropped_ref
    assert (dropped_ref > 0) == (capacity is not None)  # the capacity case really drops


def test_sharded_gradients_equal_the_dense_formulation():
    """data 2 x expert 2 x tensor 2 with a capacity: tokens, F columns and experts all split."""
    w, x, expert, gate = problem(1)
    capacity = 10
    mesh, rules = on_mesh(data=2, expert=2, tensor=2)
    _, (w_placed, (x_p, e_p, g_p)) = sharded(mesh, rules, w, x, expert, gate, capacity)
    _, dropped_ref = numpy_reference(w, x, expert, gate, capacity)
    # the kept assignments: token-major ranks below the capacity
    flat = expert.reshape(-1)
    rank = np.array([(flat[:i] == flat[i]).sum() for i in range(flat.size)])
    keep = (rank < capacity).reshape(T, K).astype(np.float32)
    assert (1 - keep).sum() == dropped_ref
    probe = np.random.default_rng(2).normal(size=(T, D)).astype(np.float32)

    def loss_sharded(w, x, g):
        y, _ = expert_parallel.experts_sharded(w, x, e_p, g, None, capacity, swiglu_ffn)
        return (y * probe).sum()

    with sharding.activate(mesh, rules):
        got = jax.jit(jax.grad(loss_sharded, argnums=(0, 1, 2)))(w_placed, x_p, g_p)
    loss_dense = lambda w, x, g: (dense_reference(w, x, expert, g, keep) * probe).sum()
    want = jax.grad(loss_dense, argnums=(0, 1, 2))(w, x, gate)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# --- the whole model: configs/debug_moe.yaml with 8 experts ------------------------------------

MOE_STEPS = 3


def moe_config(run_dir, cache_dir, *overrides):
    """The tiny MoE config with 8 experts (so mesh.expert may be 8), f32, no warm-up."""
    return config.load(
        ROOT / "configs" / "debug_moe.yaml",
        [
            f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}",
            "model.moe.experts=8",
            "model.dtype=float32",
            "optim.warmup_steps=0",
            "optim.eps=1e-4",  # as tests/test_sharding.py: near-zero gradients stay determined
            *overrides,
        ],
    )


def train_steps(cfg, devices):
    """MOE_STEPS train steps on learnable rows; parameters drawn with NumPy. Returns losses."""
    setup = steps.build(cfg, devices)
    rng = np.random.default_rng(0)
    shapes = model.param_shapes(cfg.model)
    flat = {name: (0.05 * rng.standard_normal(s)).astype(np.float32) for name, s in shapes.items()}
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: flat[model.param_name(path)], setup.abstract_params
    )
    state = steps.fresh_state(setup, params)
    step = plan.compile_step(setup)
    losses = []
    for _ in range(MOE_STEPS):
        start = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, 1))
        stride = rng.integers(1, 4, (cfg.train.batch_size, 1))
        rows = (start + stride * np.arange(cfg.model.seq_len + 1)) % cfg.model.vocab_size
        batch = jax.device_put(from_windows(rows.astype(np.int32), 0), setup.batch_shardings)
        state, stats = step(state, batch)
        losses.append(float(stats["loss"]))
    return np.array(losses)


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory, cache_dir):
    cfg = moe_config(tmp_path_factory.mktemp("ep"), cache_dir, "mesh.data=1")
    return train_steps(cfg, jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh",
    [
        ("mesh.data=1", "mesh.expert=8"),
        ("mesh.data=2", "mesh.expert=4"),
        ("mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"),
    ],
    ids=["expert8", "data2-expert4", "fsdp2-expert2-tensor2"],
)
def test_expert_meshes_train_like_one_device(one_device_losses, tmp_path, cache_dir, mesh):
    """Measured: <= 1.6e-7 relative on every mesh (a mesh reorders f32 sums only)."""
    losses = train_steps(moe_config(tmp_path, cache_dir, *mesh), jax.devices()[:8])
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "devices", "message"),
    [
        (("mesh.expert=3",), 3, "model.moe.experts=8 is not divisible by mesh.expert=3"),
        (
            ("mesh.expert=2", "model.moe.capacity_factor=0.001"),
            8,
            "model.moe.capacity_factor=0.001 leaves each expert room for 0.128 tokens",
        ),
    ],
)
def test_expert_mistakes_are_one_line_before_compiling(
    tmp_path, cache_dir, overrides, devices, message
):
    cfg = moe_config(tmp_path, cache_dir, "mesh.data=-1", *overrides)
    with pytest.raises(ConfigError) as error:
        steps.build(cfg, jax.devices()[:devices])
    assert message in str(error.value) and "\n" not in str(error.value)


# --- runs: resume on another expert mesh, two processes -----------------------------------------

# a capacity (factor 1: 128 of the 1,024 assignments per expert) that drops some, so both the
# all-to-all buffers' bounds and the global token order of the drops are exercised
RUN = [
    "model.moe.capacity_factor=1.0",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_steps=1",
    "checkpoint.every=2",
]
# as tests/test_checkpoint.py: another mesh reorders f32 sums only
RESUME_RTOL = 1e-6


def metrics(run_dir) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "loss" in line}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """4 steps on mesh data 2 × expert 4, in this process: {step: metrics line}."""
    run_dir = tmp_path_factory.mktemp("ep-run")
    cfg = moe_config(run_dir, cache_dir, *RUN, "mesh.data=2", "mesh.expert=4")
    loop.train(cfg, progress=False)
    found = metrics(run_dir)
    assert sorted(found) == [1, 2, 3, 4]
    assert all(found[s]["moe/dropped"] > 0 for s in found)  # the capacity really drops
    return found


def test_resume_on_another_expert_mesh(uninterrupted, tmp_path, cache_dir):
    """Steps 1-2 on expert 8, then 3-4 on data 4 × expert 2: the uninterrupted run's losses
    and dropped fractions."""
    run = tmp_path / "run"
    first = moe_config(run, cache_dir, *RUN, "mesh.data=1", "mesh.expert=8", "train.stop_at=2")
    loop.train(first, progress=False)
    assert max(metrics(run)) == 2
    loop.train(moe_config(run, cache_dir, *RUN, "mesh.data=4", "mesh.expert=2"), progress=False)
    got = metrics(run)
    assert sorted(got) == [1, 2, 3, 4]
    for key in ("loss", "moe/dropped"):
        np.testing.assert_allclose(
            [got[s][key] for s in got], [uninterrupted[s][key] for s in got], rtol=RESUME_RTOL
        )


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_expert_parallel_train_like_one(uninterrupted, tmp_path, cache_dir):
    """2 processes × 4 devices, mesh data 2 (across the processes) × expert 4 (each process's
    devices): the losses and dropped fractions of one process on the same mesh."""
    run = tmp_path / "multi"
    log = tmp_path / "launch.log"
    args = [f"run_dir={run}", f"data.cache_dir={cache_dir}", "model.moe.experts=8"]
    args += ["model.dtype=float32", "optim.warmup_steps=0", "optim.eps=1e-4", *RUN]
    args += ["mesh.data=2", "mesh.expert=4", "--no-progress"]
    launcher = [sys.executable, "-m", "gptjax", "launch", "--nproc=2", "--devices-per-proc=4"]
    with log.open("w") as out:
        process = subprocess.run(
            [*launcher, "--", "train", str(ROOT / "configs" / "debug_moe.yaml"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            timeout=400,
        )
    assert process.returncode == 0, log.read_text()[-3000:]
    got = metrics(run)
    assert sorted(got) == [1, 2, 3, 4]
    for key in ("loss", "moe/dropped"):
        np.testing.assert_allclose(
            [got[s][key] for s in got], [uninterrupted[s][key] for s in got], rtol=RESUME_RTOL
        )
