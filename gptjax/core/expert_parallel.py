"""Expert parallelism: the experts of an MoE layer split over the mesh's `expert` axis.

`experts_sharded` takes the arguments of `gptjax.core.moe.experts_local` and returns the same
result (the same tokens dropped, the same sums up to their order); the model passes it to
`moe_mlp` on any mesh of more than one device (`active`). Inside `jax.shard_map` every device
holds E / mesh.expert experts (their F columns split over `tensor`, their D rows gathered from
`fsdp`) and the tokens of its batch shard (the batch is split over data, fsdp and expert).
Each device

1. ranks its token-expert assignments: with a capacity, an assignment is kept when fewer than
   `capacity` assignments to its expert come before it in the global token order (the counts
   of the devices before it in that order come from one all-gather of E integers each);
2. packs the kept ones by destination shard into a [expert_size, C, D] buffer and sends it with
   one `all_to_all` over the expert axis;
3. groups what it received by local expert and runs the expert MLP as grouped matmuls;
4. sends the results back with a second `all_to_all`, weights them by their gates and sums each
   token's k results (with tensor > 1, a psum over tensor adds the F slices).

C, the rows one device may send one shard, is the worst case: every assignment of the device
(T_local * k) without a capacity, at most E_local * capacity with one. A ragged all-to-all would
carry only the assignments routed, but XLA:CPU has none ("HLO opcode ragged-all-to-all is not
supported by XLA:CPU ThunkEmitter", jax 0.10.2), and this module runs on every platform the same.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptjax.config import ConfigError
from gptjax.core import sharding

WEIGHT_NAMES = {  # experts_local's weight keys -> logical names (no layers axis)
    "up": ("expert", None, "mlp"),
    "gate": ("expert", None, "mlp"),
    "down": ("expert", "mlp", None),
    "up_b": ("expert", "mlp"),
    "gate_b": ("expert", "mlp"),
    "down_b": ("expert", None),
}


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def expert_axes(mesh, rules) -> tuple[str, ...]:
    """The mesh axes of size > 1 that split the experts."""
    axes = _axes(sharding.logical_to_spec(("expert",), rules)[0])
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def active() -> bool:
    """A step activated a mesh of more than one device: the model then runs its experts with
    experts_sharded, also without an expert axis (each device its own tokens, every expert
    replicated). experts_local on the whole batch would leave XLA's partitioner to place its
    global sort and scatter: on 8 fake devices (mesh.data=8) that step took 3.8x as long
    (benchmarks/expert_parallel.py, docs/sharding.md)."""
    found = sharding.active()
    return found is not None and found[0].size > 1


def check(model_cfg, mesh, rules, tokens: int | None = None) -> None:
    """Refuse, in one line before compiling, what experts_sharded cannot run: an expert axis on
    a dense model, experts that do not divide over it, a batch not split over it, a capacity
    below one token (`tokens`: the tokens of one MoE call, rows per micro-batch × seq_len)."""
    moe_cfg = getattr(model_cfg, "moe", None)
    axes = expert_axes(mesh, rules)
    size = math.prod(mesh.shape[axis] for axis in axes)
    label = "×".join(f"mesh.{axis}" for axis in axes) + f"={size}"
    if axes and moe_cfg is None:
        raise ConfigError(
            f"{label} splits experts but the model is dense (model.moe is not set); "
            "set mesh.expert=1 or configure model.moe"
        )
    if moe_cfg is None:
        return
    if moe_cfg.experts % size:
        raise ConfigError(
            f"model.moe.experts={moe_cfg.experts} is not divisible by {label}; "
            "change mesh.expert or model.moe.experts"
        )
    batch = _axes(sharding.logical_to_spec(("batch",), rules)[0])
    if any(axis not in batch for axis in axes):
        raise ConfigError(
            f"{label} must also split the batch (mesh.rules.batch has no expert); "
            "add expert to mesh.rules.batch"
        )
    if tokens is not None and moe_cfg.capacity_factor is not None:
        room = moe_cfg.capacity_factor * tokens * moe_cfg.top_k / moe_cfg.experts
        if room < 1:
            raise ConfigError(
                f"model.moe.capacity_factor={moe_cfg.capacity_factor} leaves each expert room "
                f"for {room:.3g} tokens ({tokens} tokens per micro-batch × top_k "
                f"{moe_cfg.top_k} / {moe_cfg.experts} experts), less than one; raise it, or "
                "set it to null (dropless)"
            )


def _ffn(w, x_RD, expert_R, group_sizes, cfg):
    """The expert MLP on rows sorted by (local) expert: experts_local's own grouped matmuls."""
    from gptjax.core import moe  # moe imports this module

    return moe.grouped(w, x_RD, expert_R, group_sizes, cfg)


def _rank_in_expert(expert_A, n_experts: int):
    """(stable order by expert, each assignment's rank among its expert's, counts per expert)."""
    order = jnp.argsort(expert_A, stable=True)
    counts = jnp.zeros(n_experts, jnp.int32).at[expert_A].add(1)
    starts = jnp.cumsum(counts) - counts
    sorted_e = expert_A[order]
    rank_sorted = jnp.arange(expert_A.shape[0], dtype=jnp.int32) - starts[sorted_e]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    return order, rank, counts


def experts_sharded(w, x_TD, expert_TK, gate_TK, cfg, capacity: int | None, ffn=None):
    """experts_local's result with the experts split over the active mesh's expert axis.

    `w`: {"up", "gate", "down", optional biases} with a leading E axis (sharded as the
    parameters are); `x_TD` the tokens, `expert_TK` / `gate_TK` their k experts and gates;
    `capacity` per expert over all T tokens (None: dropless). Returns (y_TD in x's dtype, the
    number of dropped token-expert assignments). `ffn` replaces moe.grouped (tests)."""
    found = sharding.active()
    if found is None:
        raise RuntimeError("experts_sharded needs an active mesh (sharding.activate)")
    mesh, rules = found
    ffn = ffn or _ffn
    ex = expert_axes(mesh, rules)
    batch = tuple(
        a for a in _axes(sharding.logical_to_spec(("batch",), rules)[0]) if mesh.shape[a] > 1
    )
    # the F columns stay split over the mlp axes that split neither experts nor tokens
    mlp = _axes(sharding.logical_to_spec(("expert", "mlp"), rules)[1])
    f_axes = tuple(a for a in mlp if a not in batch and mesh.shape[a] > 1)
    S = math.prod(mesh.shape[a] for a in ex)
    E = w["up"].shape[0]
    E_local = E // S
    T, K = expert_TK.shape
    n_batch = math.prod(mesh.shape[a] for a in batch)
    T_local = T // n_batch
    A = T_local * K
    C = A if capacity is None else max(1, min(A, E_local * capacity))

    names = {k: WEIGHT_NAMES[k] for k in w}
    w_specs = {
        k: P(*[_entry(ex) if n == "expert" else _entry(f_axes) if n == "mlp" else None
               for n in names[k]])
        for k in w
    }  # fmt: skip
    tok = P(_entry(batch), None)

    def local(x, expert, gate, w):
        expert_A = expert.reshape(A).astype(jnp.int32)
        gate_A = gate.reshape(A)
        order, rank, counts = _rank_in_expert(expert_A, E)
        if capacity is None:
            keep = jnp.ones(A, bool)
        else:
            if batch:  # the assignments to each expert on the devices before this one
                every = jax.lax.all_gather(counts, batch)  # [n_batch, E]
                me = jax.lax.axis_index(batch)
                before = jnp.where(jnp.arange(n_batch)[:, None] < me, every, 0).sum(0)
            else:
                before = jnp.zeros(E, jnp.int32)
            keep = before[expert_A] + rank < capacity
        dropped = (~keep).sum().astype(jnp.int32)
        # pack the kept assignments by destination shard (sorted by expert, hence by shard)
        sorted_e, kept = expert_A[order], keep[order]
        dest = sorted_e // E_local
        kept_before = jnp.cumsum(kept) - kept
        per_shard = jnp.zeros(S, jnp.int32).at[dest].add(kept.astype(jnp.int32))
        shard_start = jnp.cumsum(per_shard) - per_shard
        slot = jnp.where(kept, dest * C + kept_before - shard_start[dest], S * C)
        rows = x[order // K]
        send_x = jnp.zeros((S * C, x.shape[1]), x.dtype).at[slot].set(rows, mode="drop")
        send_id = (
            jnp.full((S * C,), E_local, jnp.int32).at[slot].set(sorted_e % E_local, mode="drop")
        )
        # no expert axis: every device holds every expert and keeps its tokens
        a2a = (lambda a: jax.lax.all_to_all(a, ex, 0, 0, tiled=True)) if ex else (lambda a: a)
        recv_x, recv_id = a2a(send_x), a2a(send_id)
        # group by local expert (E_local marks an empty row: last, outside every group)
        r_order = jnp.argsort(recv_id, stable=True)
        sizes = jnp.zeros(E_local + 1, jnp.int32).at[recv_id].add(1)[:E_local]
        local_w = {k: v for k, v in w.items() if k != "down_b"}
        r_id = jnp.minimum(recv_id[r_order], E_local - 1)  # empty rows: past every group
        y = ffn(local_w, recv_x[r_order], r_id, sizes, cfg)
        y = jnp.zeros_like(y).at[r_order].set(y)
        valid = recv_id < E_local
        if "down_b" in w:  # once, not once per tensor shard
            bias = w["down_b"][jnp.minimum(recv_id, E_local - 1)].astype(y.dtype)
            if f_axes:
                bias = jnp.where(jax.lax.axis_index(f_axes) == 0, bias, 0)
            y = y + bias
        y = jnp.where(valid[:, None], y, 0)
        back = a2a(y)
        y_sorted = jnp.where(kept[:, None], back[jnp.minimum(slot, S * C - 1)], 0)
        y_A = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
        y_TD = (y_A.astype(jnp.float32) * gate_A[:, None].astype(jnp.float32)).reshape(
            T_local, K, -1
        ).sum(1)  # fmt: skip
        if f_axes:
            y_TD = jax.lax.psum(y_TD, f_axes)
        if batch:
            dropped = jax.lax.psum(dropped, batch)
        return y_TD.astype(x.dtype), dropped

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok, tok, tok, w_specs),
        out_specs=(tok, P()),
    )
    return run(x_TD, expert_TK, gate_TK, w)
