"""The mixture-of-experts MLP: a linear router picks k of E SwiGLU experts for every token.

Per layer (no layers axis), with T tokens (the batch's rows flattened), D d_model, E experts,
K = top_k, F each expert's width, A = T·K assignments (token t's k-th choice is assignment
t·K + k, "token order"):

- `route`: router logits [T, E] (f32, + bias), the chosen experts and their gates [T, K]
  (model.moe.gating), and the layer's load-balancing and z losses.
- `experts_local`: every expert on the tokens routed to it, all experts on this device.
  Dropless (capacity None): the A assignments sorted by expert and two grouped matmuls
  (`jax.lax.ragged_dot`), no padding and nothing dropped. Capacity C: each expert's first C
  assignments in token order go into an [E, C, D] buffer (the rest are dropped: they add
  nothing to their token's output) and the experts run as one batched matmul.
- `moe_mlp`: route + experts on a [B, T, D] block input.

The load-balancing loss is the Switch Transformer's, in Mixtral's convention (transformers'
`load_balancing_loss_func`): E · Σ_e f_e · P_e, with f_e the fraction of tokens routed to e
among their top k (Σ_e f_e = K, so a perfectly balanced router scores K) and P_e the mean
router probability softmax(logits)_e; the z-loss (ST-MoE) is mean_t logsumexp(logits_t)².
Both are per layer; the model averages them over its MoE layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig

# The per-layer parameters of an MoE MLP (the names under "blocks"), and the experts' weight
# names as `experts_local` takes them (without the "expert_" prefix and "_w" suffix).
PARAMS = (
    "router_w",
    "router_b",
    "expert_up_w",
    "expert_gate_w",
    "expert_down_w",
    "expert_up_b",
    "expert_gate_b",
    "expert_down_b",
)
# What an MoE layer reports (summed over layers in the scan; see `summarise`).
AUX_KEYS = ("aux_loss", "z_loss", "dropped", "assigned")


def expert_weights(p: dict) -> dict:
    """{"up", "gate", "down", and "up_b", "gate_b", "down_b" with expert_bias} from a layer's
    parameters: each with a leading E axis."""
    names = {"up": "expert_up_w", "gate": "expert_gate_w", "down": "expert_down_w"}
    names |= {"up_b": "expert_up_b", "gate_b": "expert_gate_b", "down_b": "expert_down_b"}
    return {short: p[name] for short, name in names.items() if name in p}


def capacity(tokens: int, cfg: ModelConfig) -> int | None:
    """Tokens each expert takes: ceil(capacity_factor · tokens · top_k / experts); None:
    dropless."""
    moe = cfg.moe
    if moe.capacity_factor is None:
        return None
    return max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.experts))


def route(p, x_TD, cfg: ModelConfig):
    """(experts [T, K] int32, gates [T, K] f32, {"aux_loss", "z_loss"} of this layer).

    topk_softmax: the k largest logits, softmax over them (gpt-oss, Mixtral); softmax_topk:
    softmax over all E, the k largest probabilities, divided by their sum when
    model.moe.renormalize (Qwen3)."""
    moe = cfg.moe
    logits = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), p["router_w"].astype(jnp.float32))
    if "router_b" in p:
        logits = logits + p["router_b"].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if moe.gating == "topk_softmax":
        top, expert = jax.lax.top_k(logits, moe.top_k)
        gate = jax.nn.softmax(top, axis=-1)
    else:
        gate, expert = jax.lax.top_k(probs, moe.top_k)
        if moe.renormalize:
            gate = gate / gate.sum(-1, keepdims=True)
    T = x_TD.shape[0]
    routed_E = jax.nn.one_hot(expert, moe.experts, dtype=jnp.float32).sum((0, 1))
    aux_loss = moe.experts * jnp.sum(routed_E / T * probs.mean(0))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return expert.astype(jnp.int32), gate, {"aux_loss": aux_loss, "z_loss": z_loss}


def activation(gate, up, cfg: ModelConfig):
    """swiglu: silu(gate) · up; swiglu_clamped (gpt-oss): gate clamped above at `limit`, up to
    [-limit, limit], then (up + 1) · gate · sigmoid(alpha · gate)."""
    moe = cfg.moe
    if moe.activation == "swiglu":
        return jax.nn.silu(gate) * up
    gate = jnp.minimum(gate, moe.limit)
    up = jnp.clip(up, -moe.limit, moe.limit)
    return (up + 1) * (gate * jax.nn.sigmoid(moe.alpha * gate))


def grouped(w, x_AD, expert_A, sizes_E, cfg):
    """The experts on rows sorted by expert, sizes_E rows each: [A, D] -> [A, D] (ragged_dot;
    rows past the groups come out as the biases alone)."""
    bias = lambda name: w[name][expert_A] if name in w else 0
    up = jax.lax.ragged_dot(x_AD, w["up"], sizes_E) + bias("up_b")
    gate = jax.lax.ragged_dot(x_AD, w["gate"], sizes_E) + bias("gate_b")
    return jax.lax.ragged_dot(activation(gate, up, cfg), w["down"], sizes_E) + bias("down_b")


def _batched(w, x_ECD, cfg):
    """The experts on a capacity buffer: [E, C, D] -> [E, C, D] (one batched matmul each)."""
    bias = lambda name: w[name][:, None, :] if name in w else 0
    up = jnp.einsum("ecd,edf->ecf", x_ECD, w["up"]) + bias("up_b")
    gate = jnp.einsum("ecd,edf->ecf", x_ECD, w["gate"]) + bias("gate_b")
    return jnp.einsum("ecf,efd->ecd", activation(gate, up, cfg), w["down"]) + bias("down_b")


def experts_local(w, x_TD, expert_TK, gate_TK, cfg: ModelConfig, capacity: int | None):
    """(y [T, D], assignments dropped: int32 scalar): Σ_k gate[t, k] · expert_{e[t, k]}(x_t).

    `capacity` None: dropless. Else each expert keeps its first `capacity` assignments in token
    order (token t's choices before token t+1's) and drops the rest."""
    T, K = expert_TK.shape
    E = cfg.moe.experts
    flat_A = expert_TK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)  # by expert, token order within each
    expert_A = flat_A[order_A]
    token_A = order_A // K
    gate_A = gate_TK.reshape(-1)[order_A]
    sizes_E = jnp.bincount(flat_A, length=E).astype(jnp.int32)
    x_AD = x_TD[token_A]
    if capacity is None:
        y_AD = grouped(w, x_AD, expert_A, sizes_E, cfg)
        dropped = jnp.zeros((), jnp.int32)
    else:
        start_E = jnp.cumsum(sizes_E) - sizes_E
        rank_A = jnp.arange(T * K) - start_E[expert_A]  # place in its expert's queue
        kept_A = rank_A < capacity
        slot_A = jnp.where(kept_A, expert_A * capacity + rank_A, E * capacity)  # past the end
        D = x_TD.shape[-1]
        buffer = jnp.zeros((E * capacity, D), x_TD.dtype).at[slot_A].set(x_AD, mode="drop")
        y_ECD = _batched(w, buffer.reshape(E, capacity, D), cfg)
        y_AD = jnp.take(y_ECD.reshape(E * capacity, D), slot_A, axis=0, mode="fill", fill_value=0)
        dropped = (T * K - kept_A.sum()).astype(jnp.int32)
    y_AD = y_AD.astype(jnp.float32) * gate_A[:, None]
    y_TD = jnp.zeros((T, x_TD.shape[-1]), jnp.float32).at[token_A].add(y_AD)
    return y_TD.astype(x_TD.dtype), dropped


def moe_mlp(p, h_BTD, cfg: ModelConfig, *, dropless: bool = False, experts=None):
    """(y [B, T, D], this layer's {"aux_loss", "z_loss", "dropped", "assigned"}).

    The B·T tokens are routed together (a capacity counts them all); `dropless` overrides
    model.moe.capacity_factor (generation: each token routed on its own, nothing dropped).
    `experts`: experts_local (default) or a function of its signature; the model passes
    gptjax.core.expert_parallel.experts_sharded on a mesh whose expert axis is > 1 (it imports
    this module, so this module does not import it)."""
    B, T, D = h_BTD.shape
    x_TD = h_BTD.reshape(B * T, D)
    expert_TK, gate_TK, aux = route(p, x_TD, cfg)
    cap = None if dropless else capacity(B * T, cfg)
    y_TD, dropped = (experts or experts_local)(
        expert_weights(p), x_TD, expert_TK, gate_TK, cfg, cap
    )
    aux = {**aux, "dropped": dropped.astype(jnp.float32), "assigned": float(B * T * cfg.moe.top_k)}
    return y_TD.reshape(B, T, D), {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


def no_aux() -> dict:
    """A dense layer's contribution to the MoE sums (zeros)."""
    return {key: jnp.zeros((), jnp.float32) for key in AUX_KEYS}


def summarise(total: dict, cfg: ModelConfig) -> dict:
    """The model's MoE figures from the sums over its layers: {"aux_loss", "z_loss"} (means
    over the MoE layers) and "dropped" (the fraction of assignments dropped); {} for a dense
    model."""
    if not total:
        return {}
    layers = sum(cfg.moe_layers())
    return {
        "aux_loss": total["aux_loss"] / layers,
        "z_loss": total["z_loss"] / layers,
        "dropped": total["dropped"] / total["assigned"],
    }


def summarise_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """The names `summarise` gives (none for a dense model)."""
    return ("aux_loss", "z_loss", "dropped") if cfg.moe else ()


def penalty(aux: dict, cfg: ModelConfig):
    """What the training loss adds: aux_loss coefficient · aux_loss + z_loss coefficient ·
    z_loss (0 for a dense model)."""
    if not aux:
        return 0.0
    return cfg.moe.aux_loss * aux["aux_loss"] + cfg.moe.z_loss * aux["z_loss"]
