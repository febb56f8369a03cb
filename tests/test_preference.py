"""Preference pairs, DPO and reward models (issue 24): the pairs' rows and masks, the DPO loss
and gradient against transformers + torch on the exported policy and reference, ln 2 at the
start, a DPO run on a 2x2x2 mesh against one device, kill -9 and resume, pairs built from
conversations, a reward model that learns a marker and not shuffled labels."""

import json
import math
import os
import signal
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, slowed_train, tiny_config
from test_checkpoint import finish, losses, start, wait_until
from test_interop_families import random_params

from gptjax import cli
from gptjax.config import ConfigError
from gptjax.core import model, preference
from gptjax.data import DataError, chat, load_dataset, prefs
from gptjax.data import tokenizer as tok
from gptjax.interop import hf, hf_families
from gptjax.training import align, loop


def pair_lines(n: int = 40, seed: int = 0) -> list[dict]:
    """Sums asked and answered: chosen the right one, rejected a wrong one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 30, 2))
        messages = [{"role": "user", "content": f"what is {a} plus {b}?"}]
        if i % 4 == 0:
            messages = [{"role": "system", "content": "Answer briefly."}, *messages]
        wrong = a + b + int(rng.integers(1, 9))
        out.append({"messages": messages, "chosen": f"{a + b}.", "rejected": f"it is {wrong}"})
    return out


def write_pairs(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small SentencePiece BPE with the role pieces, trained on the pairs' text."""
    texts = [m["content"] for x in pair_lines(200) for m in x["messages"]]
    texts += [x[k] for x in pair_lines(200) for k in ("chosen", "rejected")]
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    tok.Tokenizer(tok.train(texts * 5, 300)).save(path)
    return path


def test_pairs_are_rendered_reply_masked_and_kept_together(tmp_path, tokenizer):
    lines = pair_lines()
    path = write_pairs(tmp_path / "pairs.jsonl", lines)
    cfg = tiny_config(
        tmp_path, tmp_path, f"data.source=prefs:{path}", f"data.tokenizer={tokenizer}"
    )
    data = load_dataset(cfg.data, cfg.model.seq_len)
    assert data.train.pairs + data.val.pairs == len(lines) and data.val.pairs >= 1
    template = chat.Template(data.tokenizer)
    by_prompt = {json.dumps(x["messages"]): x for x in lines}
    batch = data.train_batch(cfg.seed, 3, 8, 0, 8)
    T = cfg.model.seq_len
    for i in range(4):
        rows = []
        for k in range(2):
            r = 2 * i + k
            ids = np.concatenate([batch["inputs"][r, :1], batch["targets"][r]])
            mask = np.concatenate([[0], batch["loss_mask"][r]])
            rows.append((ids, mask))
        # the chosen and rejected rows share the prompt: find the pair by decoding it
        (ids_c, mask_c), (ids_r, mask_r) = rows
        start_c = int(np.argmax(mask_c))
        assert start_c == int(np.argmax(mask_r))
        np.testing.assert_array_equal(ids_c[:start_c], ids_r[:start_c])
        prompt_ids = ids_c[:start_c].tolist()
        pair = next(x for x in by_prompt.values() if template.prompt(x["messages"]) == prompt_ids)
        for (ids, mask), kind in zip(rows, prefs.KINDS, strict=True):
            reply = data.tokenizer.encode(pair[kind]) + template.end
            expected = prompt_ids + reply
            np.testing.assert_array_equal(ids[: len(expected)], expected)
            assert mask.tolist() == [0] * len(prompt_ids) + [1] * len(reply) + [0] * (
                T + 1 - len(expected)
            )
            assert (ids[len(expected) :] == data.tokenizer.eod_id).all()  # padding
    assert (batch["positions"] == np.arange(T)).all() and (batch["segment_ids"] == 1).all()
    # a batch is a function of (seed, step) alone, read in any row ranges
    halves = [data.train_batch(cfg.seed, 3, 8, a, b) for a, b in ((0, 3), (3, 8))]
    for key, value in batch.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)

    # appending pairs never moves a pair between the splits
    more = write_pairs(tmp_path / "more.jsonl", lines + pair_lines(30, seed=1))
    bigger = prefs.split(prefs.read(str(more)), cfg.data.val_fraction)
    old = prefs.split(prefs.read(str(path)), cfg.data.val_fraction)
    key = lambda p: json.dumps([p.messages, p.chosen, p.rejected])
    assert {key(p) for p in old[1]} <= {key(p) for p in bigger[1]}
    assert {key(p) for p in old[0]} <= {key(p) for p in bigger[0]}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", ":2: not valid JSON"),
        ('{"chosen": "a", "rejected": "b"}', ":2: no 'messages' list"),
        ('{"messages": [{"role": "robot", "content": "x"}], "chosen": "a"}', ":2: .*'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}], "chosen": "a"}', ":2: no string 're"),
        (
            '{"messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "a"}',
            "same",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}',
            ":2: the last message must be the user's",
        ),
    ],
)
def test_bad_pair_lines_are_one_error_naming_the_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair_lines(1)[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"{path}{message}" if message[0] == ":" else message):
        prefs.read(str(path))


def test_objective_and_data_must_agree(tmp_path, capsys):
    path = write_pairs(tmp_path / "pairs.jsonl", pair_lines(4))
    run = tmp_path / "run"
    cases = [
        ([f"data.source=prefs:{path}"], "set train.objective=dpo"),
        (["train.objective=dpo"], "set data.source=prefs:PATH"),
        (["train.objective=dpo", f"data.source=prefs:{path}"], "needs a frozen reference"),
        (["train.objective=dpo", "train.batch_size=6", "train.micro_batches=2"], "multiple of 4"),
    ]
    for overrides, message in cases:
        assert cli.main(["train", "configs/debug.yaml", f"run_dir={run}", *overrides]) != 0
        assert message in capsys.readouterr().err
        assert not run.exists()


# --- the loss against transformers + torch -----------------------------------------------------


def dpo_oracle(policy_model, reference_model, batch, beta, smoothing, loss="sigmoid"):
    """The paper's formula (Rafailov et al. eq. 7; cDPO's smoothing; IPO) in float64 torch on
    log-probabilities computed by transformers."""
    import torch

    def logps(m):
        logits = m(input_ids=torch.tensor(batch["inputs"], dtype=torch.long)).logits.double()
        logp = torch.log_softmax(logits, -1)
        targets = torch.tensor(batch["targets"], dtype=torch.long)
        picked = logp.gather(-1, targets[..., None])[..., 0]
        return (picked * torch.tensor(batch["loss_mask"], dtype=torch.float64)).sum(-1)

    pol, ref = logps(policy_model), logps(reference_model).detach()
    h = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        sig = torch.nn.functional.logsigmoid
        losses = -(1 - smoothing) * sig(beta * h) - smoothing * sig(-beta * h)
    return losses.mean()


def hf_gpt2(cfg, params):
    """transformers' GPT-2 holding `params`, exported as `gptjax export --format hf` does."""
    import torch
    import transformers

    family = hf_families.family_of_model(cfg)
    config = transformers.GPT2Config.from_dict(hf.hf_config(cfg, family, cfg.vocab_size, 0))
    m = transformers.GPT2LMHeadModel(config)
    tensors = hf.to_hf(params, cfg, family, cfg.vocab_size)
    state = {k: torch.tensor(v) for k, v in tensors.items()}
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all(
        k.endswith(("attn.bias", "masked_bias", "lm_head.weight")) for k in missing
    )
    return m.double(), family


def pair_batch(cfg, n_pairs=4, seed=0):
    """Random pairs: each pair's rows share a prompt, then replies of random lengths."""
    rng = np.random.default_rng(seed)
    T = cfg.seq_len
    tokens = rng.integers(0, cfg.vocab_size, (n_pairs, 2, T + 1)).astype(np.int32)
    masks = np.zeros((n_pairs, 2, T + 1), np.uint8)
    for i in range(n_pairs):
        cut = int(rng.integers(2, T // 2))
        tokens[i, 1, :cut] = tokens[i, 0, :cut]
        for k in range(2):
            masks[i, k, cut : cut + int(rng.integers(1, T + 1 - cut))] = 1
    return prefs.from_rows(tokens.reshape(2 * n_pairs, T + 1), masks.reshape(2 * n_pairs, T + 1))


@pytest.fixture(scope="module")
def tiny():
    from gptjax import config

    cfg = config.ModelConfig(vocab_size=97, seq_len=16, n_layer=2, n_head=2, d_model=32)
    return cfg, model.abstract(cfg)[0], random_params(cfg, 0), random_params(cfg, 1)


# graphdef and the micro-batch count static; the settings' beta and smoothing traced
DPO = jax.jit(preference.dpo_loss_and_grads, static_argnums=(0, 4))


def test_dpo_loss_and_gradient_equal_the_formula_on_transformers(tiny):
    cfg, graphdef, policy, reference = tiny
    batch = pair_batch(cfg)
    policy_hf, family = hf_gpt2(cfg, policy)
    reference_hf, _ = hf_gpt2(cfg, reference)
    for beta, smoothing, loss in [(0.5, 0.0, "sigmoid"), (0.1, 0.2, "sigmoid"), (0.3, 0, "ipo")]:
        settings = preference.Settings(beta, smoothing, loss)
        value, grads, count, stats = DPO(graphdef, policy, reference, batch, 1, settings)
        assert float(count) == batch["loss_mask"].sum()
        policy_hf.zero_grad()
        expected = dpo_oracle(policy_hf, reference_hf, batch, beta, smoothing, loss)
        expected.backward()
        assert float(value) == pytest.approx(expected.item(), abs=1e-5, rel=1e-6)
        hf_grads = {
            k.removeprefix(family.prefix): p.grad.numpy() for k, p in policy_hf.named_parameters()
        }
        theirs = model.by_name(hf.to_gptjax(hf_grads, cfg, cfg.vocab_size, family))
        scale = max(1.0, max(float(np.abs(g).max()) for g in theirs.values()))  # IPO's are ~20
        for name, g in model.by_name(grads).items():
            np.testing.assert_allclose(np.asarray(g), theirs[name], atol=1e-5 * scale, err_msg=name)

    # whole pairs per micro-batch: two micro-batches give the same loss, gradient and figures
    value, grads, _, stats = DPO(graphdef, policy, reference, batch, 1, preference.Settings())
    value2, grads2, _, stats2 = DPO(graphdef, policy, reference, batch, 2, preference.Settings())
    assert float(value2) == pytest.approx(float(value), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads2, grads)
    for name in preference.PAIR_STATS:
        # (a reward is beta x a difference of log-probabilities near -50: f32 keeps ~1e-6)
        assert float(stats2[name]) == pytest.approx(float(stats[name]), abs=1e-5)


def test_dpo_loss_is_ln2_when_the_policy_is_the_reference(tiny):
    cfg, graphdef, policy, _ = tiny
    value, _, _, stats = DPO(graphdef, policy, policy, pair_batch(cfg), 1, preference.Settings())
    assert float(value) == float(np.float32(math.log(2)))  # exactly: every margin is 0
    assert float(stats["margin"]) == 0.0 and float(stats["accuracy"]) == 0.0


# --- training runs -----------------------------------------------------------------------------

STEPS = 6
MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer):
    """A 'fine-tuned' run at step 0 (random weights written as a run) and its pairs file."""
    root = tmp_path_factory.mktemp("dpo")
    cfg = tiny_config(root / "sft", root / "cache")
    tokens = tok.load(tokenizer)
    hf.write_run(cfg, tokens, random_params(cfg.model, 3), root / "sft")
    pairs = write_pairs(root / "pairs.jsonl", pair_lines(80))
    return root, pairs


def dpo_overrides(root, pairs, *more):
    return [
        f"train.init_from={root / 'sft'}",
        "train.objective=dpo",
        f"data.source=prefs:{pairs}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=3",
        "train.dpo_beta=0.5",
        *more,
    ]


@pytest.fixture(scope="module")
def dpo_reference(sft_run, cache_dir):
    """The uninterrupted DPO run on a 2x2x2 mesh: (run_dir, losses, metrics lines)."""
    root, pairs = sft_run
    run = root / "dpo-222"
    loop.train(tiny_config(run, cache_dir, *dpo_overrides(root, pairs, *MESH_222)), progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return run, losses(run), lines


def test_dpo_run_logs_pairs_and_starts_at_ln2(dpo_reference):
    run, found, lines = dpo_reference
    assert sorted(found) == list(range(1, STEPS + 1))
    assert found[1] == float(np.float32(math.log(2)))  # the policy starts as the reference
    before = next(x for x in lines if x["step"] == 0)
    assert before["eval_pref_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert before["eval_pref_margin"] == 0.0 and before["eval_pref_acc"] == 0.0
    last = [x for x in lines if x["step"] == STEPS and "eval_pref_acc" in x][-1]
    assert last["eval_pref_loss"] < math.log(2)  # it learns the preference
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(lines[1])
    assert json.loads((run / "reference.json").read_text())["step"] == 0


def test_dpo_on_one_device_equals_the_2x2x2_mesh(dpo_reference, sft_run, cache_dir):
    root, pairs = sft_run
    _, expected, _ = dpo_reference
    run = root / "dpo-1"
    one_device = ["debug.enabled=true", "debug.nans=false", "debug.log_compiles=false"]
    overrides = dpo_overrides(root, pairs, *one_device, f"train.stop_at={STEPS // 2}")
    loop.train(tiny_config(run, cache_dir, *overrides), progress=False)
    got = losses(run)
    assert sorted(got) == [1, 2, 3]
    for step, value in got.items():
        assert value == pytest.approx(expected[step], rel=1e-6), step


SLOW_PAIRS = slowed_train("gptjax.data.prefs:PairData", "train_batch")  # test-only


@pytest.mark.slow
def test_kill_9_mid_dpo_resumes_exactly(dpo_reference, sft_run, cache_dir, tmp_path):
    root, pairs = sft_run
    _, expected, _ = dpo_reference
    run, log = tmp_path / "run", tmp_path / "train"
    overrides = dpo_overrides(root, pairs, *MESH_222)
    argv = [sys.executable, "-c", SLOW_PAIRS, str(ROOT / "configs" / "debug.yaml")]
    process = start(run, cache_dir, *overrides, f"train.steps={STEPS}", log=log, argv=argv)
    saved = run / "checkpoints" / "3"
    wait_until(lambda: saved.is_dir() and len(losses(run)) >= 4, process, 300, "step 4")
    os.kill(process.pid, signal.SIGKILL)
    assert finish(process, timeout=30) == -signal.SIGKILL
    loop.train(tiny_config(run, cache_dir, *overrides), progress=False)
    assert losses(run) == expected  # same mesh: bit for bit; the reference reloaded


def test_a_missing_reference_is_refused_before_anything_is_written(sft_run, tmp_path, cache_dir):
    root, pairs = sft_run
    reference = f"train.reference={tmp_path / 'nothing'}"
    cfg = tiny_config(tmp_path / "r", cache_dir, *dpo_overrides(root, pairs, reference))
    with pytest.raises(ConfigError, match="train.reference=.*is not a run directory"):
        loop.train(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_pairs_built_from_conversations(tmp_path):
    """Chosen: the real reply after the conversation so far; rejected: another conversation's
    reply; the file is what data.source=prefs reads."""
    rng = np.random.default_rng(0)
    convs = []
    for c in range(30):
        messages = [{"role": "system", "content": "Be kind."}] if c % 5 == 0 else []
        for t in range(int(rng.integers(1, 5))):
            messages.append({"role": "user", "content": f"c{c} user {t}"})
            messages.append({"role": "assistant", "content": f"c{c} reply {t}"})
        convs.append(messages)
    convs.append([{"role": "user", "content": "nobody answers"}])  # no pair
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    built = prefs.from_conversations(prefs.conversations_of(f"chat:{path}"), seed=1, history=3)
    assert len(built) == 30
    assert built == prefs.from_conversations(convs, seed=1, history=3)  # seeded
    for pair in built:
        c = int(pair["chosen"].split()[0][1:])
        messages = convs[c]
        turn = next(i for i, m in enumerate(messages) if m["content"] == pair["chosen"])
        system = messages[:1] if c % 5 == 0 else []
        kept = pair["messages"][len(system) :]
        assert pair["messages"][: len(system)] == system
        assert kept == messages[turn - len(kept) : turn] and 1 <= len(kept) <= 3
        assert kept[0]["role"] == "user" and kept[-1]["role"] == "user"
        assert pair["rejected"].endswith(tuple(f"reply {t}" for t in range(4)))
        assert not pair["rejected"].startswith(f"c{c} ")  # another conversation's
    out = prefs.write(tmp_path / "pairs.jsonl", built)
    assert [p.chosen for p in prefs.read(str(out))] == [p["chosen"] for p in built]


# --- reward models -----------------------------------------------------------------------------


def marker_pairs(n: int, shuffled: bool, seed: int = 0) -> list[dict]:
    """The chosen reply always carries the marker word `ok` (before its answer, so the last
    token does not give it away); `shuffled`: chosen and rejected swapped at random."""
    rng = np.random.default_rng(seed)
    out = []
    for x in pair_lines(n, seed):
        answer = x["chosen"]
        chosen, rejected = f"ok {answer}", answer
        if shuffled and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        out.append({**x, "chosen": chosen, "rejected": rejected})
    return out


@pytest.mark.parametrize("shuffled", [False, True])
def test_reward_model_learns_a_marker_and_not_shuffled_labels(sft_run, cache_dir, shuffled):
    root, _ = sft_run
    pairs = write_pairs(root / f"marker-{shuffled}.jsonl", marker_pairs(160, shuffled))
    run = root / f"reward-{shuffled}"
    overrides = [
        f"train.init_from={root / 'sft'}",
        "train.objective=reward",
        f"data.source=prefs:{pairs}",
        "data.val_fraction=0.25",
        "train.steps=40",
        "train.batch_size=16",
        "train.eval_every=0",
        "train.log_every=10",
    ]
    result = loop.train(tiny_config(run, cache_dir, *overrides), progress=False)
    held_out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    before = next(x for x in held_out if x["step"] == 0)
    assert before["eval_pref_loss"] > 0
    print("held-out pair accuracy", result["eval_pref_acc"], "margin", result["eval_pref_margin"])
    if shuffled:
        assert 0.25 <= result["eval_pref_acc"] <= 0.75  # chance: ~40 held-out pairs
    else:
        assert result["eval_pref_acc"] >= 0.95 and result["eval_pref_margin"] > 1.0
    # `gptjax score` on the held-out pairs agrees with the run's own evaluation
    val = prefs.split(prefs.read(str(pairs)), 0.25)[1]
    held = write_pairs(
        root / f"held-{shuffled}.jsonl",
        [{"messages": p.messages, "chosen": p.chosen, "rejected": p.rejected} for p in val],
    )
    scored = align.score(run, str(held))
    assert scored["pairs"] == len(val)
    assert scored["accuracy"] == pytest.approx(result["eval_pref_acc"], abs=1e-9)
    assert scored["margin"] == pytest.approx(result["eval_pref_margin"], rel=1e-4, abs=1e-5)
