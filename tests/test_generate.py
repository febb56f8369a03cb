"""Generation with the KV cache against full recomputation, batching, seeds, compiles, meshes;
sampling filters against hand-computed sets; text pieces; one-line errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import cli
from gptjax.config import ConfigError
from gptjax.core import model, steps
from gptjax.inference import generate
from gptjax.inference.generate import Sampling, filter_logits
from gptjax.inference.settings import Finish
from tests.conftest import tiny_config

LOGITS = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.3, 0.15, 9.0]))  # the last id is past the vocab
V = 512  # configs/debug.yaml


def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


def test_top_k_keeps_the_k_largest_within_the_vocabulary():
    assert kept(filter_logits(LOGITS, 1.0, 2, 1.0, vocab=5)) == {1, 3}
    assert kept(filter_logits(LOGITS, 1.0, 0, 1.0, vocab=5)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(LOGITS, 1.0, 9, 1.0, vocab=5)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities (vocab 5): 0.4, 0.3, 0.15, 0.1, 0.05 -> 0.4 + 0.3 = 0.7 reaches 0.6
    assert kept(filter_logits(LOGITS, 1.0, 0, 0.6, vocab=5)) == {1, 3}
    assert kept(filter_logits(LOGITS, 1.0, 0, 0.8, vocab=5)) == {1, 3, 4}
    # top-p applies to the top-k set, renormalised: {1, 3, 4} -> 0.47, 0.35, 0.18
    assert kept(filter_logits(LOGITS, 1.0, 3, 0.8, vocab=5)) == {1, 3}


def test_settings_per_row_are_traced_arrays():
    """One call filters each row with its own settings (what the decode loop does)."""
    rows = jnp.stack([LOGITS] * 3)
    filtered = jax.jit(filter_logits, static_argnums=4)(
        rows, jnp.array([1.0, 1.0, 1.0]), jnp.array([2, 0, 0]), jnp.array([1.0, 0.8, 1.0]), 5
    )
    assert [kept(row) for row in filtered] == [{1, 3}, {1, 3, 4}, {0, 1, 2, 3, 4}]


def test_temperature_scales_and_samples_stay_in_the_kept_set():
    scaled = filter_logits(LOGITS, 0.5, 0, 1.0, vocab=5)
    np.testing.assert_allclose(np.asarray(scaled[:5]), np.asarray(LOGITS[:5]) / 0.5, rtol=1e-6)
    filtered = filter_logits(LOGITS, 1.0, 3, 1.0, vocab=5)
    keys = jax.random.split(jax.random.key(0), 500)
    draws = jax.vmap(lambda k: jax.random.categorical(k, filtered))(keys)
    assert set(np.asarray(draws).tolist()) == {1, 3, 4}


@pytest.mark.parametrize(
    "settings, message",
    [
        ((-1.0, 0, 1.0), "temperature -1.0"),
        ((1.0, -2, 1.0), "top_k -2"),
        ((1.0, 0, 0.0), "top_p 0.0"),
        ((1.0, 0, 1.5), "top_p 1.5"),
    ],
)
def test_bad_settings_are_one_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        Sampling(*settings)


# --- the model: a tiny random GPT (f32) ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """configs/debug.yaml with a 128-token context, f32, random ("trained-looking") weights."""
    cfg = tiny_config(tmp_path_factory.mktemp("gen"), "unused", "model.seq_len=128")
    setup = steps.build(cfg, jax.devices()[:1])
    params = model.init_params(cfg.model, 0)

    @jax.jit
    def noisy(params):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noise = [0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(tree, [a + n for a, n in zip(leaves, noise, strict=True)])

    return setup, noisy(params)


def prompts_of(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, V, n).tolist() for n in lengths]


GREEDY = Sampling(0.0)


def run(setup, params, prompts, max_new, sampling=GREEDY, chunk=16, **kwargs):
    """Every row's new tokens and finish reason."""
    out = [[] for _ in prompts]
    finish = []
    gen = generate.Generator(setup, params, chunk)
    for tokens, emitted, reasons in gen.stream(prompts, max_new, sampling, **kwargs):
        for row in range(len(prompts)):
            out[row] += tokens[row][emitted[row]].tolist()
        finish = [Finish.of_code(r) for r in reasons]
    return out, finish


def recompute_greedy(setup, params, prompt, max_new):
    """The oracle: a full forward over the whole text for every new token, argmax (the text is
    right-padded to the context, which causal attention never sees: one compile)."""
    T = setup.cfg.model.seq_len
    forward = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t))
    seq, logits = list(prompt), []
    while len(seq) - len(prompt) < max_new and len(seq) < T:
        window = np.zeros((1, T), np.int32)
        window[0, : len(seq)] = seq
        last = np.asarray(forward(params, window)[0, len(seq) - 1])
        logits.append(last)
        seq.append(int(np.argmax(last)))
    return seq[len(prompt) :], logits


def test_greedy_with_the_cache_equals_full_recompute(tiny):
    """64 greedy tokens decoded with the cache (prefill, then one jitted step per token) are
    the full recompute's, and every step's logits are within 1e-4 of its."""
    setup, params = tiny
    prompt = prompts_of(9)[0]
    want, want_logits = recompute_greedy(setup, params, prompt, 64)
    gen = generate.Generator(setup, params)
    settings = {
        "temperature": np.zeros(1, np.float32),
        "top_k": np.zeros(1, np.int32),
        "top_p": np.ones(1, np.float32),
        "max_new": np.full(1, 64, np.int32),
        "row": np.zeros(1, np.int32),
        "seed": np.int32(0),
        "eod": np.full(generate.MAX_STOP_IDS, -1, np.int32),  # no stop id
    }
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, -9:] = prompt
    cache, state = generate._prefill(
        params, tokens, np.array([9], np.int32), settings["max_new"], graphdef=setup.graphdef
    )
    got, got_logits = [], []
    for _ in range(64):
        got_logits.append(np.asarray(state["logits"][0]))
        out, emitted, _, cache, state = generate._decode(
            params, cache, state, settings, np.zeros(1, bool), np.int32(1),
            graphdef=setup.graphdef, chunk=1, vocab=V,
        )  # fmt: skip
        got.append(int(out[0, 0]))
    assert got == want
    np.testing.assert_allclose(np.stack(got_logits), np.stack(want_logits), atol=1e-4, rtol=0)
    # and the chunked loop of the Generator makes the same tokens
    assert run(setup, params, [prompt], 64)[0][0] == want
    assert gen.chunk == 16


def test_batched_prompts_of_different_lengths_equal_each_alone(tiny):
    """Rows of 3, 40 and 100 tokens in one batch (bucket 128 = the whole cache, so the cache
    shifts out padding as rows grow) give each prompt's tokens alone, and stop at their own
    limits: 50 new tokens, or the end of the 128-token context (full recompute agrees)."""
    setup, params = tiny
    prompts = prompts_of(3, 40, 100, seed=1)
    together, reasons = run(setup, params, prompts, 50, chunk=8)
    assert reasons == ["length", "length", "context"]
    assert [len(t) for t in together] == [50, 50, 28]
    for prompt, tokens in zip(prompts, together, strict=True):
        assert run(setup, params, [prompt], 50)[0][0] == tokens
    assert recompute_greedy(setup, params, prompts[2], 50)[0] == together[2]


def test_rows_stop_at_the_end_of_document_token(tiny):
    setup, params = tiny
    prompts = prompts_of(5, 12, seed=2)
    free, _ = run(setup, params, prompts, 20)
    at = next(i for i, t in enumerate(free[1]) if i > 0 and t not in free[1][:i])
    eod = free[1][at]  # the first new token of row 1 not seen before: "the end of document"
    cut = free[0].index(eod) if eod in free[0] else 20
    unused = next(t for t in range(setup.cfg.model.vocab_size) if t not in free[0] + free[1])
    # one stop id, or several (end of document, end of turn): any of them ends the row
    for eod_id in (eod, [unused, eod], [eod, unused, unused, unused]):
        stopped, reasons = run(setup, params, prompts, 20, eod_id=eod_id)
        assert stopped[1] == free[1][:at] and reasons[1] == "eod"
        assert stopped[0] == free[0][:cut]
    assert run(setup, params, prompts, 20, eod_id=[unused, unused])[0] == free  # no stop met


def test_seeded_sampling_is_reproducible_and_independent_of_chunks_and_batch(tiny):
    setup, params = tiny
    prompts = prompts_of(6, 30, seed=3)
    hot = Sampling(1.0, top_k=50, top_p=0.9)
    first, _ = run(setup, params, prompts, 24, hot, seed=7)
    assert run(setup, params, prompts, 24, hot, seed=7, chunk=5)[0] == first
    assert run(setup, params, prompts[:1], 24, hot, seed=7)[0][0] == first[0]
    assert run(setup, params, prompts, 24, hot, seed=8)[0] != first
    # top-k 1 at any temperature is greedy
    greedy, _ = run(setup, params, prompts, 24)
    assert run(setup, params, prompts, 24, Sampling(2.0, top_k=1), seed=7)[0] == greedy


def test_a_second_call_in_the_same_bucket_compiles_nothing(tiny):
    """Prompt lengths in the same bucket, other sampling settings, seed, max_new_tokens and stop
    ids: no compilation at all (counted from jax's compile log)."""
    setup, params = tiny
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                compiles.append(record.getMessage().split(" with ")[0])

    handler = Count()
    logging.getLogger("jax").addHandler(handler)
    generate._prefill.clear_cache()  # whatever other tests compiled
    generate._decode.clear_cache()
    try:
        with jax.log_compiles():
            run(setup, params, prompts_of(20, 25, seed=4), 10, Sampling(0.0), chunk=4)
            first = list(compiles)
            compiles.clear()
            hot, warm = Sampling(0.7, 5, 0.5), Sampling(1.3, 0, 0.9)
            run(setup, params, prompts_of(17, 32, seed=5), 7, hot, chunk=4, seed=3)
            run(setup, params, prompts_of(31, 18, seed=6), 12, warm, chunk=4)
            # any number of stop ids (a completion: one; a chat turn: two) is the same program
            run(setup, params, prompts_of(20, 30, seed=7), 5, warm, chunk=4, eod_id=3)
            run(setup, params, prompts_of(20, 30, seed=7), 5, warm, chunk=4, eod_id=[3, 4, 5])
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert "Compiling jit(_prefill)" in first and "Compiling jit(_decode)" in first
    assert compiles == []


def test_mesh_2x2x2_generates_what_one_device_does(tmp_path):
    """Rows over data x fsdp, the cache's heads over tensor: the same greedy tokens."""
    overrides = ["model.seq_len=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    cfg = tiny_config(tmp_path, "unused", *overrides)
    sharded = steps.build(cfg, jax.devices()[:8])
    one = steps.build(cfg.model_copy(update={"mesh": cfg.mesh.one_device()}), jax.devices()[:1])
    params = steps.init_state(sharded)["params"]
    prompts = prompts_of(4, 19, 33, seed=7)  # 3 rows: padded to 4 for the 4 batch shards
    got, _ = run(sharded, params, prompts, 40, chunk=8)
    local = jax.device_put(jax.device_get(params), jax.devices()[0])
    assert got == run(one, local, prompts, 40, chunk=8)[0]


# --- text -------------------------------------------------------------------------------------


class Bytes:
    """A tokenizer whose ids are UTF-8 bytes (+2): characters split across tokens."""

    eod_id, vocab_size = 1, 258

    def encode(self, text):
        return [b + 2 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")


def pieces(text, stop=None, step=1):
    row = generate._TextRow(Bytes(), stop)
    ids = Bytes().encode(text)
    out = []
    for i in range(0, len(ids), step):
        final = i + step >= len(ids)
        out.append(row.add(ids[i : i + step], final))
        if row.stopped:
            break
    return out


def test_text_pieces_hold_back_incomplete_characters():
    text = "naïve → 東京 🙂 done"
    for step in (1, 2, 3):
        got = pieces(text, step=step)
        assert "".join(got) == text
        assert not any("\ufffd" in piece for piece in got)


def test_a_stop_string_cuts_the_text_and_is_never_shown():
    got = pieces("one\ntwo\n\nthree", stop="\n\n")
    assert "".join(got) == "one\ntwo"
    assert "".join(pieces("a stop that never comes: x", stop="xyz")) == "a stop that never comes: x"


def test_the_first_of_several_stop_strings_cuts_the_text():
    stops = ["<|end|>", "<|user|>", "\n\n"]
    for step in (1, 3):
        got = pieces("reply text<|user|>more<|end|>", stop=stops, step=step)
        assert "".join(got) == "reply text"
        assert not any("<" in piece for piece in got)  # a stop's beginning is never shown
    assert "".join(pieces("a <| b <|en", stop=stops)) == "a <| b <|en"  # never completed


def test_generate_streams_text_that_matches_the_tokens(tiny):
    """The text API: pieces decode the row's tokens, and a stop string ends the row."""
    setup, params = tiny
    tokenizer = Bytes()
    prompts = ["hello", "a longer prompt"]
    chunks = list(generate.generate(setup, params, tokenizer, prompts, 30, temperature=0.0))
    for row in range(2):
        mine = [c for c in chunks if c.row == row]
        ids = [i for c in mine for i in c.ids]
        assert "".join(c.text for c in mine) == tokenizer.decode(ids)
        assert mine[-1].finish == "length" and len(ids) == 30
    text = generate.complete(setup, params, tokenizer, prompts[:1], max_new_tokens=30, top_k=1)[0]
    stop = text[5:7]
    cut = generate.complete(
        setup, params, tokenizer, prompts[:1], max_new_tokens=30, top_k=1, stop=stop
    )
    assert cut == [text[: text.index(stop)]]


def test_prompt_longer_than_the_context_is_one_clear_error(tiny):
    setup, params = tiny
    with pytest.raises(ConfigError, match="has 128 tokens but the context holds 128"):
        run(setup, params, [[5] * 128], 4)


def test_cli_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--prompt-file", str(empty)], "holds no prompts"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "No such file"),
        (["--temperature", "-1"], "temperature -1.0"),
        (["--top-p", "1.5"], "top_p 1.5"),
        (["--num-samples", "0"], "--num-samples 0"),
        (["--devices", "4", "--tensor", "3"], "--tensor 3 does not divide --devices 4"),
    ]
    for args, message in cases:
        assert cli.main(["sample", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
