"""The interfaces every feature builds on: batches as dicts with masks and segments, the block
with positions/segments/KV cache, facts declared once (weight decay, counts, mesh axes), the
source registry, and runs trained on many hosts loading on one device."""

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_cli, tiny_config
from flax import nnx
from test_model import random_params, small_cfg

from gptjax import config
from gptjax.core import model, optim, sharding, steps
from gptjax.data import DataError, sources
from gptjax.data.batching import from_windows, segments_and_positions
from gptjax.inference import generate
from gptjax.training import runs

EOD = 0


def test_segments_and_positions_restart_after_each_end_token():
    inputs = np.array([[5, 6, EOD, 7, 8, 9, EOD, 3]])
    segments, positions = segments_and_positions(inputs, EOD)
    assert segments.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    batch = from_windows(np.array([[5, 6, EOD, 7, 8]]), EOD, "concat")
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3]]
    assert batch["targets"].tolist() == [[6, EOD, 7, 8]]


def _packed_documents(cfg, rng):
    """Three documents (each ending in EOD; the last one cut by the window) packed in a row,
    and a second row that is a single document."""
    T = cfg.seq_len
    lengths = [5, 7]
    docs = [list(rng.integers(1, cfg.vocab_size, n)) + [EOD] for n in lengths]
    tail = list(rng.integers(1, cfg.vocab_size, T + 1 - sum(len(d) for d in docs)))
    row0 = np.array(sum(docs, []) + tail, np.int32)
    row1 = rng.integers(1, cfg.vocab_size, T + 1).astype(np.int32)
    return np.stack([row0, row1]), [*docs, tail[:-1]]


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)])
def test_each_packed_document_computes_as_if_alone(mesh):
    """With segments, the logits of every document in a packed window equal the logits of that
    document run alone (no padding, no neighbours), on several meshes."""
    cfg = small_cfg(n_head=4, d_model=32, vocab_size=128)
    params = random_params(cfg)
    windows, docs = _packed_documents(cfg, np.random.default_rng(0))
    batch = from_windows(np.tile(windows, (4, 1)), EOD, "segments")  # 8 rows: any batch sharding

    full = config.Config(model=cfg, train={"batch_size": 8})
    full.mesh.data, full.mesh.fsdp, full.mesh.tensor = mesh
    setup = steps.build(full, jax.devices()[: int(np.prod(mesh))])
    with setup.activate():
        placed = jax.device_put(params, setup.state_shardings["params"])
        placed_batch = jax.device_put(batch, setup.batch_shardings)
        packed = jax.jit(
            lambda p, b: nnx.merge(setup.graphdef, p)(
                b["inputs"], positions_BT=b["positions"], segment_ids_BT=b["segment_ids"]
            )
        )(placed, placed_batch)
    packed = np.asarray(packed)

    gpt = nnx.merge(model.abstract(cfg)[0], params)
    at = 0
    for doc in docs:
        alone = np.asarray(gpt(jnp.asarray([doc], jnp.int32)))[0]
        for row in (0, 2, 4, 6):
            got = packed[row, at : at + len(doc)]
            np.testing.assert_allclose(got, alone, atol=1e-5, rtol=1e-5)
        at += len(doc)
    assert at == cfg.seq_len
    alone = np.asarray(gpt(jnp.asarray(windows[1:, :-1])))[0]
    for row in (1, 3, 5, 7):
        np.testing.assert_allclose(packed[row], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_prefill_and_decode_equal_full_recompute(scan_layers):
    """extend(): a left-padded prompt prefilled at once, then tokens one at a time, gives the
    logits of running each row's real tokens from scratch (layers scanned or unrolled)."""
    cfg = small_cfg(vocab_size=128, scan_layers=scan_layers)
    params = random_params(cfg, seed=3)
    gpt = nnx.merge(model.abstract(cfg)[0], params)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 128, 6)), list(rng.integers(1, 128, 3))]
    P = 6
    tokens = np.zeros((2, P), np.int32)
    segments = np.zeros((2, P), np.int32)
    positions = np.zeros((2, P), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) :] = prompt
        segments[row, P - len(prompt) :] = 1
        positions[row, P - len(prompt) :] = np.arange(len(prompt))
    cache = model.init_cache(cfg, 2, slots=cfg.seq_len)
    extend = jax.jit(lambda t, p, c, s=None: gpt.extend(t, p, c, s))
    logits, cache = extend(tokens, positions, cache, segments)
    seqs = [list(p) for p in prompts]
    got = [[np.asarray(logits[r, -1])] for r in range(2)]
    for _ in range(4):
        nxt = np.array([[int(np.argmax(g[-1]))] for g in got], np.int32)
        for r in range(2):
            seqs[r].append(int(nxt[r, 0]))
        pos = np.array([[len(s) - 1] for s in seqs], np.int32)
        logits, cache = extend(nxt, pos, cache)
        for r in range(2):
            got[r].append(np.asarray(logits[r, 0]))
    for r in range(2):
        full = np.asarray(gpt(jnp.asarray([seqs[r]], jnp.int32)))[0]
        want = full[len(prompts[r]) - 1 :]
        np.testing.assert_allclose(np.stack(got[r]), want, atol=1e-4, rtol=1e-4)


def test_masked_loss_is_exact_when_micro_batches_score_different_counts(tmp_path, cache_dir):
    """Micro-batches holding very different numbers of scored tokens: the accumulated loss and
    gradient equal the masked mean over the whole batch computed at once."""
    cfg = tiny_config(tmp_path, cache_dir)
    graphdef, _ = model.abstract(cfg.model)
    params = model.init_params(cfg.model, 0)
    rng = np.random.default_rng(4)
    T = cfg.model.seq_len
    windows = rng.integers(1, cfg.model.vocab_size, (8, T + 1)).astype(np.int32)
    mask = np.zeros((8, T + 1), np.int32)
    for row, scored in enumerate([T, 1, 0, 3, T // 2, 0, 7, 2]):  # rows m, m+4 form micro m
        mask[row, 1 : 1 + scored] = 1
    batch = from_windows(windows, EOD, "concat", loss_mask=mask)

    def reference(params):
        losses = steps.token_losses(graphdef, params, batch)
        m = batch["loss_mask"].astype(jnp.float32)
        return (losses * m).sum() / m.sum()

    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(params)
    for micro in (1, 4):
        fn = jax.jit(steps.loss_and_grads, static_argnums=(0, 3))
        loss, grads, count, _ = fn(graphdef, params, batch, micro)
        assert float(count) == mask[:, 1:].sum()
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


class GatedGPT(model.GPT):
    """A toy variant with two new weights: one declared decayed, one not."""

    def __init__(self, cfg, rngs):
        super().__init__(cfg, rngs)
        D = cfg.d_model
        self.gate_w = model._param(rngs, (D, D), ("embed", "mlp"), 0.02, decay=True)
        self.gate_scale = model._param(rngs, (D,), ("embed",), None, 1.0, decay=False)


def test_weight_decay_follows_each_parameters_declaration():
    cfg = small_cfg()
    with nnx.use_eager_sharding(False):
        toy = nnx.eval_shape(lambda: GatedGPT(cfg, nnx.Rngs(0)))
    mask = model.declared(nnx.state(toy, nnx.Param), "decay")
    assert mask["gate_w"] is True and mask["gate_scale"] is False
    assert mask["blocks"]["qkv_w"] and not mask["blocks"]["ln1_scale"]
    # and the optimiser really decays exactly those: one step with zero gradients
    with nnx.use_eager_sharding(False):
        params = nnx.to_pure_dict(nnx.state(GatedGPT(cfg, nnx.Rngs(0)), nnx.Param))
    opt_cfg = config.OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant")
    tx = optim.make(opt_cfg, 10, mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["gate_w"], params["gate_w"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["gate_scale"], params["gate_scale"])


def test_parameter_counts_come_from_the_models_shapes():
    for tied in (True, False):
        cfg = small_cfg(tie_embeddings=tied, d_ff=48)
        params = model.init_params(cfg, 0)
        counts = model.param_counts(cfg)
        assert counts["params"] == sum(x.size for x in jax.tree.leaves(params))
        embeddings = params["wte"].size + params["wpe"].size
        assert counts["non_embedding_params"] == counts["params"] - embeddings
        assert counts["position_params"] == params["wpe"].size


def test_a_resume_with_other_shapes_names_the_parameters(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    wider = tiny_config(tmp_path, cache_dir, "model.d_ff=128")
    match = r"model.d_ff \(None -> 128\) \(blocks\.fc_b \[2, 256\] -> \[2, 128\]; blocks\.fc_w"
    with pytest.raises(config.ConfigError, match=match):
        runs.check_resume(tmp_path, wider)


def test_one_mesh_definition_resets_every_axis_for_local_devices():
    mesh = config.MeshConfig(data=2, fsdp=2, expert=2, tensor=2, dcn_data=2, dcn_expert=2)
    local = mesh.on_local_devices()
    assert local.sizes() == {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert set(local.dcn().values()) == {1}
    one = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert sharding.make_mesh(local, jax.devices()[:1]).shape == one
    assert tuple(sharding.make_mesh(mesh.one_device(), jax.devices()[:1]).axis_names) == (
        config.MESH_AXES
    )


def test_one_process_asking_for_several_hosts_gets_one_line(tmp_path, cache_dir):
    result = run_cli(
        "train",
        "configs/debug.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache_dir}",
        "mesh.dcn_data=2",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gptjax: error: mesh dcn_data=2 dcn_fsdp=1 spans 2 hosts but these devices belong to "
        "1 process(es); set the dcn_* sizes to 1 on one host"
    ]
    assert not (tmp_path / "run").exists()


def test_sources_come_from_one_registry(tmp_path, cache_dir, monkeypatch):
    # the config parses; the data side (which knows the registry) refuses the unknown source
    with pytest.raises(DataError, match="unknown source; use 'stdlib', 'text_dir:PATH'"):
        sources.check(config.load(None, ["data.source=books:x"]).data)
    # adding a source: one module and one entry
    module = types.ModuleType("gptjax_test_lines")
    module.documents = lambda arg: (
        lambda: iter((f"line{i}", f"{arg} number {i} " * 40) for i in range(60))
    )
    module.fingerprint = lambda arg: f"lines-{arg}-v2"
    monkeypatch.setitem(sys.modules, "gptjax_test_lines", module)
    monkeypatch.setitem(sources.SOURCES, "lines", sources.Source("gptjax_test_lines", "WORD", ""))
    cfg = tiny_config(tmp_path, cache_dir, "data.source=lines:zebra", "data.vocab_size=300")
    data = runs.load_data(cfg, tmp_path)
    text = data.tokenizer.decode(data.train.read(np.arange(len(data.train))).ravel().tolist())
    assert "zebra number 7" in text
    with pytest.raises(DataError, match="needs lines:WORD"):
        sources.parse("lines")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_run_trained_on_two_hosts_loads_on_one_device(tmp_path, cache_dir):
    """2 processes × 4 devices with mesh.dcn_data=2; then sample, eval, export on one device."""
    from test_distributed import launch

    run = tmp_path / "run"
    process, log = launch(
        tmp_path,
        "--nproc=2",
        "--devices-per-proc=4",
        "--",
        "train",
        "configs/debug.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "mesh.dcn_data=2",
        "mesh.data=2",
        "mesh.fsdp=2",
        "train.steps=4",
        "--no-progress",
    )
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    one = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # the oracle: the run's last checkpoint restored here, on one device, and generated from
    setup, params, tokenizer = runs.load_run(run)
    args = ["--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]
    sample = run_cli("sample", str(run), *args, env=one)
    assert sample.returncode == 0, sample.stderr
    greedy = generate.complete(setup, params, tokenizer, ["def "], max_new_tokens=5, temperature=0)
    assert sample.stdout.rstrip("\n") == "def " + greedy[0]
    cfg = config.load(run / "config.yaml")
    evaluated = run_cli("eval", str(run), "--batches", str(cfg.train.eval_steps), env=one)
    assert evaluated.returncode == 0, evaluated.stderr
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "eval_loss" in r and r["step"] == 4][-1]["eval_loss"]
    # the same held-out batches as the run's own final evaluation; 8 devices over 2 processes
    # there and one here only change the order of the float32 sums
    got = json.loads(evaluated.stdout.strip().splitlines()[-1])["eval_loss"]
    assert got == pytest.approx(final, rel=1e-5)
    out = tmp_path / "export"
    exported = run_cli("export", str(run), "--out", str(out), env=one)
    assert exported.returncode == 0, exported.stderr
    restored = {name: np.asarray(leaf) for name, leaf in model.by_name(params).items()}
    with np.load(out / "params.npz") as arrays:
        assert sorted(arrays.files) == sorted(restored)
        for name, value in restored.items():
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert restored["blocks.qkv_w"].shape == (2, 64, 3, 2, 32)
