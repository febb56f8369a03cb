"""Chat fine-tuning: the template's loss mask, conversation sources, packed conversations, and
`train.init_from`."""

import json

import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_config
from test_model import random_params, small_cfg

from gptjax import cli, config
from gptjax.config import ConfigError
from gptjax.core import model, steps
from gptjax.data import DataError, chat, load_dataset
from gptjax.data import tokenizer as tok
from gptjax.data.batching import from_windows
from gptjax.data.packed import PackedWindows, WindowWriter
from gptjax.data.sources import chitchat
from gptjax.training import loop, runs

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "what is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "and 2 plus 2?"},
    {"role": "assistant", "content": "4, of course."},
]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Small arithmetic dialogues of 1-3 exchanges, some with a system message."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        for _ in range(rng.integers(1, 4)):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            messages.append({"role": "user", "content": f"what is {a} plus {b}?"})
            messages.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
        out.append(messages)
    return out


def write_jsonl(path, items):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in items))
    return path


@pytest.fixture(scope="module")
def tokenizers():
    """(with role pieces, without them): small BPEs trained on conversation text."""
    texts = [chat.plain_text(chat.to_json(m)) for m in conversations(400)]
    texts += ["You are terse. Answer briefly, of course."] * 20
    plain = dict(tok.TRAINER_SETTINGS)
    del plain["control_symbols"]
    with_roles = tok.Tokenizer(tok.train(texts, 320))
    old_settings = tok.TRAINER_SETTINGS
    try:
        tok.TRAINER_SETTINGS = plain
        without = tok.Tokenizer(tok.train(texts, 320))
    finally:
        tok.TRAINER_SETTINGS = old_settings
    return with_roles, without


def test_trained_tokenizers_reserve_the_role_pieces(tokenizers):
    tokenizer, _ = tokenizers
    ids = [tokenizer.piece_id(p) for p in tok.ROLE_PIECES]
    assert ids == [2, 3, 4, 5]
    assert all(tokenizer.sp.is_control(i) for i in ids)
    # text never produces them: a user cannot forge a turn
    assert not set(tokenizer.encode("<|user|> hi <|end|><|assistant|>")) & set(ids)
    assert tokenizer.token_bytes()[ids].tolist() == [0, 0, 0, 0]


def test_loss_mask_covers_exactly_the_assistant_spans(tokenizers):
    tokenizer, _ = tokenizers
    system, user, assistant, end = (tokenizer.piece_id(p) for p in tok.ROLE_PIECES)
    enc = tokenizer.encode
    c = [m["content"] for m in CONVERSATION]
    expected_ids = (
        [system, *enc(c[0]), end]
        + [user, *enc(c[1]), end]
        + [assistant, *enc(c[2]), end]
        + [user, *enc(c[3]), end]
        + [assistant, *enc(c[4]), end]
    )
    expected_mask = (
        [0] * (len(enc(c[0])) + 2)
        + [0] * (len(enc(c[1])) + 2)
        + [0]
        + [1] * (len(enc(c[2])) + 1)
        + [0] * (len(enc(c[3])) + 2)
        + [0]
        + [1] * (len(enc(c[4])) + 1)
    )
    ids, mask = chat.Template(tokenizer).render(CONVERSATION)
    assert ids == expected_ids
    assert mask == expected_mask
    assert tokenizer.decode(ids) == "".join(c)  # markers are control pieces: decode to nothing


def test_without_role_pieces_markers_are_text_and_the_mask_stays_exact(tokenizers):
    _, tokenizer = tokenizers
    template = chat.Template(tokenizer)
    assert not template.dedicated and template.end_id is None
    ids, mask = template.render(CONVERSATION)
    assert tokenizer.decode(ids) == (
        "<|system|>You are terse.<|end|><|user|>what is 3 plus 4?<|end|>"
        "<|assistant|>3 plus 4 is 7.<|end|><|user|>and 2 plus 2?<|end|>"
        "<|assistant|>4, of course.<|end|>"
    )
    scored = [i for i, m in zip(ids, mask, strict=True) if m]
    enc = tokenizer.encode
    assert scored == enc("3 plus 4 is 7.") + enc("<|end|>") + enc("4, of course.") + enc("<|end|>")
    assert tokenizer.decode(template.prompt(CONVERSATION[:2])).endswith("4?<|end|><|assistant|>")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "1: not valid JSON"),
        ('{"text": "hi"}', "1: no 'messages' list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "has role 'robot'"),
        ('{"messages": [{"role": "user"}]}', "no string 'content'"),
        ('{"messages": []}', "non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
            "system message may only come first",
        ),
    ],
)
def test_bad_chat_jsonl_is_one_clear_error(tmp_path, cache_dir, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(line + "\n")
    cache = tmp_path / "cache"
    cfg = tiny_config(tmp_path, cache, f"data.source=chat:{path}", "data.packing=segments")
    with pytest.raises(DataError, match=message):
        load_dataset(cfg.data, cfg.model.seq_len)
    assert not cache.exists()  # checked before anything is written


def test_conversation_sources_need_segment_packing(tmp_path, capsys):
    """The data side's rule (the config knows no sources): one line before anything is written."""
    cfg = config.load(ROOT / "configs" / "debug.yaml", [f"data.source=chat:{tmp_path}"])
    with pytest.raises(DataError, match="set data.packing=segments"):
        load_dataset(cfg.data, cfg.model.seq_len)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    overrides = [f"data.source=chat:{tmp_path}", f"run_dir={run_dir}", f"data.cache_dir={cache}"]
    assert cli.main(["train", "configs/debug.yaml", *overrides]) != 0
    assert "set data.packing=segments" in capsys.readouterr().err
    assert not run_dir.exists() and not cache.exists()


def test_chitchat_source_alternates_user_and_assistant():
    docs = list(chitchat.documents("")())
    assert len(docs) == 7168  # the package's documented count
    name, text = docs[0]
    messages = chat.from_json(text)
    assert name == "a07edb12-6b91-4138-b11e-02421888d699"
    assert messages[0] == {"role": "user", "content": "Hello How are you doing today?"}
    assert messages[1]["role"] == "assistant"
    for _, text in docs[:500]:
        roles = [m["role"] for m in chat.from_json(text)]
        assert roles == [("user", "assistant")[i % 2] for i in range(len(roles))]


def test_prepared_chat_windows_store_the_template_mask(tmp_path, cache_dir, tokenizers):
    tokenizer, _ = tokenizers
    tokenizer.save(tmp_path / "tok.model")
    items = conversations(60)
    path = write_jsonl(tmp_path / "chats.jsonl", items)
    cfg = tiny_config(
        tmp_path,
        cache_dir,
        f"data.source=chat:{path}",
        "data.packing=segments",
        f"data.tokenizer={tmp_path / 'tok.model'}",
        "model.seq_len=32",
    )
    data = load_dataset(cfg.data, cfg.model.seq_len)
    assert data.meta["loss_mask"] and data.train_mask is not None
    # the train split is the conversations not held out, in order: rebuild its stream by hand
    names = [f"chats.jsonl:{i + 1}" for i in range(len(items))]
    held = [n for n in names if chat_is_validation(n, cfg)]
    template = chat.Template(tokenizer)
    ids, mask = [], []
    for name, messages in zip(names, items, strict=True):
        if name in held:
            continue
        i, m = template.render(messages)
        ids += [*i, tokenizer.eod_id]
        mask += [*m, 0]
    n = len(data.train)
    W = cfg.model.seq_len + 1
    np.testing.assert_array_equal(data.train.read(np.arange(n)).ravel(), ids[: n * W])
    np.testing.assert_array_equal(data.train_mask.read(np.arange(n)).ravel(), mask[: n * W])
    assert data.meta["train"]["scored_tokens"] == sum(mask)
    batch = data.train_batch(0, 0, 4, 0, 4)
    rows = data.train_indices(0, 0, 4, 0, 4)
    np.testing.assert_array_equal(batch["loss_mask"], data.train_mask.read(rows)[:, 1:])


def test_plain_text_prepared_after_conversations_in_one_process_is_text(tmp_path, tokenizers):
    """The serial path keeps its tokenizer and template in the process: conversations prepared
    first must not make the next (plain) corpus be read as conversations."""
    tokenizer, _ = tokenizers
    tokenizer.save(tmp_path / "tok.model")
    chats = write_jsonl(tmp_path / "chats.jsonl", conversations(30))
    book = tmp_path / "book.txt"
    book.write_text("".join(f"line {i} of a plain book, no JSON here\n" for i in range(400)))
    common = [f"data.tokenizer={tmp_path / 'tok.model'}", "model.seq_len=32", "data.workers=1"]
    cache = tmp_path / "cache"  # fresh: both are prepared here, in this order
    cfg = tiny_config(
        tmp_path, cache, f"data.source=chat:{chats}", "data.packing=segments", *common
    )
    assert load_dataset(cfg.data, cfg.model.seq_len).meta["loss_mask"]
    cfg = tiny_config(tmp_path, cache, f"data.source=text:{book}", *common)
    data = load_dataset(cfg.data, cfg.model.seq_len)
    assert not data.meta["loss_mask"] and data.train_mask is None
    text = data.tokenizer.decode(data.train.read(np.arange(len(data.train))).ravel().tolist())
    assert "line 7 of a plain book, no JSON here" in text


def chat_is_validation(name, cfg):
    from gptjax.data import corpus

    return corpus.is_validation(name, cfg.data.val_fraction)


def test_pretraining_data_scores_every_target(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir)
    data = load_dataset(cfg.data, cfg.model.seq_len)
    assert data.train_mask is None and not data.meta["loss_mask"]
    assert not list(data.directory.glob("*.mask.array_record"))
    batch = data.train_batch(0, 3, 8, 0, 8)
    assert (batch["loss_mask"] == 1).all()
    assert (data.val_batch(0, 8, 0, 8)["loss_mask"] == 1).all()


def test_packed_and_unpacked_masked_losses_are_equal(tmp_path, tokenizers):
    """Conversations packed into one window with segments give the same masked mean loss (and
    gradient) as each conversation alone in its own padded row."""
    tokenizer, _ = tokenizers
    rendered = chat.Template(tokenizer).render_many(conversations(6, seed=3))
    eod = tokenizer.eod_id
    window = sum(len(ids) + 1 for ids, _ in rendered)
    writer = WindowWriter(tmp_path / "w.ar", window, eod, tmp_path / "m.ar")
    writer.add([ids for ids, _ in rendered], [mask for _, mask in rendered])
    writer.close()
    assert writer.windows == 1
    windows = PackedWindows(tmp_path / "w.ar", window).read(np.array([0]))
    masks = PackedWindows(tmp_path / "m.ar", window, np.uint8).read(np.array([0]))
    packed = from_windows(windows, eod, "segments", masks)

    rows = np.full((len(rendered), window), eod, np.int32)
    row_masks = np.zeros((len(rendered), window), np.int32)
    for r, (ids, mask) in enumerate(rendered):
        rows[r, : len(ids)], row_masks[r, : len(mask)] = ids, mask
    alone = from_windows(rows, eod, "concat", row_masks)
    assert packed["loss_mask"].sum() == alone["loss_mask"].sum() > 0

    cfg = small_cfg(vocab_size=tokenizer.vocab_size, seq_len=window - 1)
    params = random_params(cfg)
    graphdef = model.abstract(cfg)[0]
    run = jax.jit(steps.loss_and_grads, static_argnums=(0, 3), static_argnames="segments")
    loss_p, grads_p, count_p, _ = run(graphdef, params, packed, 1, segments=True)
    loss_a, grads_a, count_a, _ = run(graphdef, params, alone, 1, segments=False)
    assert float(count_p) == float(count_a)
    np.testing.assert_allclose(float(loss_p), float(loss_a), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_p, grads_a)


# --- init_from ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, cache_dir):
    """A tiny run pretrained for 3 steps on the standard library."""
    run = tmp_path_factory.mktemp("source")
    loop.train(tiny_config(run, cache_dir, "train.steps=3", "checkpoint.every=2"), progress=False)
    return run


def test_init_from_loads_the_source_parameters_and_continues_from_them(
    tmp_path, cache_dir, source_run
):
    path = write_jsonl(tmp_path / "chats.jsonl", conversations(300))
    cfg = tiny_config(
        tmp_path / "tuned",
        cache_dir,
        f"train.init_from={source_run}@2",
        f"data.source=chat:{path}",
        "data.packing=segments",
        "train.steps=1",
        "train.log_every=1",
        "mesh.fsdp=2",  # another mesh than the source's
    )
    setup = steps.build(cfg)
    loaded = runs.restore_params(*runs.init_source(cfg), setup)
    source_setup, source_params, _ = runs.load_run(source_run, step=2)
    assert runs.flatten(loaded).keys() == runs.flatten(source_params).keys()
    for name, array in runs.flatten(loaded).items():
        np.testing.assert_array_equal(array, runs.flatten(source_params)[name], err_msg=name)
    newest = runs.flatten(runs.load_run(source_run)[1])  # step 3 differs: @2 was honoured
    assert any(not np.array_equal(a, newest[k]) for k, a in runs.flatten(loaded).items())

    result = loop.train(cfg, progress=False)
    tuned = tmp_path / "tuned"
    assert (tuned / "tokenizer.model").read_bytes() == (source_run / "tokenizer.model").read_bytes()
    lines = [json.loads(x) for x in (tuned / "metrics.jsonl").read_text().splitlines()]
    first = next(x for x in lines if x["step"] == 1 and "loss" in x)
    before = next(x for x in lines if x["step"] == 0)  # evaluated before any update

    # oracle: the source's parameters evaluated (masked) on the fine-tuning batch of step 0
    data = runs.load_data(cfg, tuned)
    batch = data.train_batch(cfg.seed, 0, cfg.train.batch_size, 0, cfg.train.batch_size)
    assert 0 < batch["loss_mask"].sum() < batch["loss_mask"].size  # only assistant tokens
    # (the source's model on one device, with the fine-tuning's data settings: segments)
    one = steps.build(source_setup.cfg.model_copy(update={"data": cfg.data}), jax.devices()[:1])
    evaluate = steps.make_eval_step(one, data.token_bytes)
    loss_sum, count, _ = (float(x) for x in evaluate(source_params, batch))
    assert first["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert first["scored_tokens"] == count
    assert result["final_step"] == 1
    reference = steps.evaluate(one, evaluate, source_params, data, cfg.train.eval_steps)
    assert before["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)

    # `gptjax data prepare` of a new fine-tuning config uses the source's tokenizer too
    overrides = [f"data.cache_dir={cache_dir}", f"run_dir={tmp_path / 'other'}"]
    overrides += [f"train.init_from={source_run}", f"data.source=chat:{path}"]
    prepared = run_cli("data", "prepare", "configs/debug.yaml", *overrides, "data.packing=segments")
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads(prepared.stdout)["directory"] == str(data.directory)


def test_init_from_refuses_other_shapes_and_missing_runs(tmp_path, cache_dir, source_run):
    init = f"train.init_from={source_run}"
    bad = tiny_config(tmp_path / "new", cache_dir, init, "model.n_layer=3")
    with pytest.raises(ConfigError, match=r"different parameter shapes: blocks\.fc_b \[2, 256\]"):
        loop.train(bad, progress=False)
    assert not (tmp_path / "new").exists()  # refused before anything was written
    missing = tiny_config(tmp_path / "new", cache_dir, f"train.init_from={tmp_path}/nothing")
    with pytest.raises(ConfigError, match="is not a run directory"):
        loop.train(missing, progress=False)
