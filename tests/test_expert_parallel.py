"""Expert parallelism (gptjax/core/expert_parallel.py): the experts split over mesh.expert give
experts_local's result. Oracle: a NumPy loop over tokens and their k experts (SwiGLU experts,
the capacity kept in token-major order), and the gradients of a dense jnp formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from gptjax.config import MeshConfig
from gptjax.core import expert_parallel, sharding

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
