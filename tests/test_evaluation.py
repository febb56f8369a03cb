"""Task evaluation (gptjax/evaluation/), against transformers and lm-evaluation-harness.

The model is test_interop_hf's tiny random GPT-2 with a byte-level BPE tokenizer, imported as a
gptjax run and exported back (`gptjax export --format hf`): transformers scores the exported
directory, gptjax the run."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_interop_hf import bpe_tokenizer, hf_model  # noqa: E402

from gptjax import cli  # noqa: E402
from gptjax.evaluation import loglik, run, tasks  # noqa: E402
from gptjax.inference import generate  # noqa: E402
from gptjax.inference.completions import token_name  # noqa: E402
from gptjax.interop import hf  # noqa: E402
from gptjax.training import runs  # noqa: E402

ATOL = 1e-4  # as tests/test_interop_hf.py: f32 on both sides, measured differences ~6e-6

WORDS = "the cat sat on a mat while dogs ran past red doors and blue windows".split()


def make_examples(n: int, seed: int) -> list[dict]:
    """Multiple-choice rows of short English-like text (4 choices of 1-3 words)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))
        choices = [" ".join(rng.choice(WORDS, size=rng.integers(1, 4))) for _ in range(4)]
        rows.append(
            {"context": context.capitalize(), "choices": choices, "label": int(rng.integers(4))}
        )
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """(gptjax run dir, exported HF dir, transformers model on the export)."""
    root = tmp_path_factory.mktemp("evaluation")
    tokenizer = bpe_tokenizer()
    source = root / "hf"
    hf_model(tokenizer.get_vocab_size()).save_pretrained(source)
    tokenizer.save(str(source / "tokenizer.json"))
    run_dir = hf.import_run(source, root / "run")
    assert cli.main(["export", str(run_dir), "--format", "hf", "--out", str(root / "export")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "export").eval()
    return run_dir, root / "export", model


def transformers_logprob(model, context, continuation):
    """Sum of log p(continuation | context) and greedy-match by transformers (same ids); the
    context cut from the left to the model's window, as lm-eval's hf backend does."""
    window = model.config.n_positions
    context = (context + continuation)[-(window + 1) : -len(continuation)]
    ids = torch.tensor([(context + continuation)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
    n = len(continuation)
    rows = np.arange(len(context) - 1, len(context) - 1 + n)
    token = logp[rows, continuation]
    return token.sum(), bool((logp[rows].argmax(-1) == continuation).all())


@pytest.mark.parametrize("mesh", [None, {"data": 2, "fsdp": 2, "tensor": 2}], ids=["1", "2x2x2"])
def test_loglikelihoods_equal_transformers(model_run, mesh):
    run_dir, _, model = model_run
    devices = jax.devices()[:8] if mesh else None
    setup, params, tokenizer = runs.load_run(run_dir, devices=devices, mesh=mesh)
    task = tasks.Task("t", "choice", [tasks.Example(**r) for r in make_examples(4, 0)])
    requests = []
    for shots in (0, 3):
        for i, example in enumerate(task.examples):
            for choice in example.choices:
                requests.append(
                    loglik.encode_pair(tokenizer, task.prompt(i, shots, 0), " " + choice)
                )
    assert max(len(c) + len(x) for c, x in requests) > 16  # more than one length bucket
    scorer = loglik.Scorer(setup, params, tokens_per_call=256)
    scores = scorer.score(requests)
    assert len({length for _, length, _ in scorer.compiled_buckets}) > 1
    for (context, continuation), score in zip(requests, scores, strict=True):
        expected, greedy = transformers_logprob(model, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=ATOL)
        assert score.tokens == len(continuation)
        assert score.truncated == (len(context) + len(continuation) > 65)
        assert score.greedy == greedy


def test_a_context_past_the_window_is_cut_from_the_left(model_run):
    run_dir, _, model = model_run
    setup, params, tokenizer = runs.load_run(run_dir)
    window = setup.cfg.model.seq_len
    context = list(range(5, 5 + window + 10))
    continuation = [7, 8, 9]
    (score,) = loglik.Scorer(setup, params).score([(context, continuation)])
    expected, _ = transformers_logprob(model, context, continuation)
    assert score.truncated and score.logprob == pytest.approx(expected, abs=ATOL)
    with pytest.raises(loglik.ScoringError, match="does not fit"):
        loglik.Scorer(setup, params).score([([1], list(range(window + 1)))])


def test_bad_task_files_are_one_line(model_run, tmp_path, capsys):
    cases = [
        ('{"context": "a", "choices": ["x"], "label": 0}\n{"context": "b"', ":2: not valid JSON"),
        ('{"context": "a", "choices": [], "label": 0}', ':1: "choices" must be a non-empty list'),
        ('{"context": "a", "choices": ["x", ""], "label": 0}', ":1: every choice must be"),
        ('{"context": "a", "choices": ["x"], "label": 3}', ":1: label 3 is not an index of its 1"),
        ('{"context": "a"}', ':1: needs "choices" and "label"'),
        (
            '{"context": "a", "target": "b"}\n{"context": "a", "choices": ["x"], "label": 0}',
            "mixes",
        ),
    ]
    for k, (text, message) in enumerate(cases):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text(text)
        with pytest.raises(tasks.TaskError, match=message):
            tasks.read_task(path)
    assert cli.main(["eval", str(model_run[0]), "--tasks", "no_such_task"]) == 2
    assert "unknown task 'no_such_task': built-in tasks are stdlib_names" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", make_examples(2, 0))
    with pytest.raises(tasks.TaskError, match="5 shots but only 1 examples"):
        tasks.read_task(good).prompt(0, 5, 0)


def test_few_shot_prompts_are_seeded_and_exclude_the_example(tmp_path):
    task = tasks.read_task(write_jsonl(tmp_path / "t.jsonl", make_examples(20, 1)))
    first = [task.prompt(i, 3, seed=7) for i in range(20)]
    assert first == [task.prompt(i, 3, seed=7) for i in range(20)]
    assert first != [task.prompt(i, 3, seed=8) for i in range(20)]
    for i, prompt in enumerate(first):
        parts = prompt.split("\n\n")
        assert len(parts) == 4 and parts[-1] == task.examples[i].context
        shown = [e.context + " " + e.answer for e in task.examples]
        assert all(p in shown and p != shown[i] for p in parts[:-1])


def test_acc_equals_lm_eval_hf_backend(model_run, tmp_path):
    """gptjax's own evaluation, lm-eval's hf backend on the exported model and lm-eval through
    the in-process adapter choose the same answer for every example."""
    pytest.importorskip("lm_eval")
    from gptjax.evaluation import harness

    run_dir, export, _ = model_run
    path = write_jsonl(tmp_path / "words.jsonl", make_examples(24, 2))
    task = tasks.read_task(path)
    setup, params, tokenizer = runs.load_run(run_dir)
    ours, records = run.evaluate_task(loglik.Scorer(setup, params), tokenizer, task)

    import lm_eval
    import lm_eval.tasks

    name = harness.task_yaml(task, path, tmp_path)
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},dtype=float32",
        tasks=[name],
        task_manager=manager,
        device="cpu",
        batch_size=8,
        log_samples=True,
        bootstrap_iters=0,
    )
    adapter = harness.evaluate(harness.make_lm(setup, params, tokenizer), [str(path)])
    for other in (theirs, adapter):
        samples = sorted(other["samples"][name], key=lambda s: s["doc_id"])
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert [s[metric] for s in samples] == [r[metric] for r in records], metric
            assert other["results"][name][f"{metric},none"] == ours[metric]
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # the metrics are not trivial


def test_eval_command_prints_and_logs(model_run, tmp_path, capsys):
    run_dir = model_run[0]
    directory = tmp_path / "words"
    directory.mkdir()
    write_jsonl(directory / "test.jsonl", make_examples(6, 3))
    write_jsonl(directory / "train.jsonl", make_examples(4, 4))
    (directory / "task.json").write_text('{"description": "Words.\\n\\n"}')
    assert cli.main(["eval", str(run_dir), "--tasks", str(directory), "--shots", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    setup, params, tokenizer = runs.load_run(run_dir)
    task = tasks.read_task(directory)
    assert task.prompt(0, 2, 1234).startswith("Words.\n\n") and len(task.pool) == 4
    expected, records = run.evaluate_task(loglik.Scorer(setup, params), tokenizer, task, 2)
    assert printed == {"step": 0, "tasks": {"words": json.loads(json.dumps(expected))}}
    log = run_dir / "evaluations" / "words-2shot-step0.jsonl"
    assert [json.loads(line) for line in log.read_text().splitlines()] == records


# --- gptjax serve's /v1/completions with echo and logprobs, and lm-eval's local-completions ---


@pytest.fixture(scope="module")
def server(model_run):
    """`gptjax serve RUN_DIR --port 0` on the imported run, in a subprocess; its base URL."""
    from conftest import served

    with served(model_run[0], {"XLA_FLAGS": ""}) as url:
        yield url


def post(url, body) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_completion_logprobs_are_the_scorers(model_run, server):
    """echo + logprobs + max_tokens 0 (text prompt), and two token-id prompts with one greedy
    token each, against the scorer and the generator run here."""
    run_dir = model_run[0]
    setup, params, tokenizer = runs.load_run(run_dir)
    scorer = loglik.Scorer(setup, params)
    text = "The cat sat on a mat while dogs ran past"
    ids = tokenizer.encode(text)
    status, out = post(
        f"{server}/v1/completions",
        {"prompt": text, "echo": True, "max_tokens": 0, "logprobs": 2},
    )
    assert status == 200, out
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(ids)
    assert lp["text_offset"] == [len(tokenizer.decode(ids[:k])) for k in range(len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    (score,) = scorer.score([(ids[:1], ids[1:])], per_token=True, top_k=2)
    assert lp["token_logprobs"][1:] == pytest.approx(score.token_logprobs.tolist(), abs=1e-5)
    for top, ranked, values in zip(
        lp["top_logprobs"][1:], score.top_ids, score.top_logprobs, strict=True
    ):
        assert list(top) == [token_name(tokenizer.decode, t) for t in ranked.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(score.logprob, abs=1e-4)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                            "total_tokens": len(ids)}  # fmt: skip

    prompts = [ids[:5], tokenizer.encode("red doors and blue")]
    body = {"prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 2}
    status, out = post(f"{server}/v1/completions", body)
    assert status == 200, out
    greedy = [([], "")] * 2
    for piece in generate.generate(setup, params, tokenizer, prompts, 1, temperature=0.0):
        ids_so_far, text_so_far = greedy[piece.row]
        greedy[piece.row] = (ids_so_far + list(piece.ids), text_so_far + piece.text)
    for i, choice in enumerate(out["choices"]):
        new, new_text = greedy[i]
        assert choice["index"] == i and choice["text"] == new_text and len(new) == 1
        assert len(choice["logprobs"]["tokens"]) == 1
        (value,) = choice["logprobs"]["token_logprobs"]
        (top,) = choice["logprobs"]["top_logprobs"]
        (expected,) = scorer.score([(prompts[i], new)], per_token=True, top_k=2)
        assert value == pytest.approx(expected.logprob, abs=1e-5) and expected.greedy
        # greedy: the token is the likeliest
        assert list(top)[0] == token_name(tokenizer.decode, new[0])
        assert list(top.values())[0] == pytest.approx(value, abs=1e-6)
    assert out["usage"]["completion_tokens"] == 2

    # several greedy tokens: the generator's, then scored given the prompt
    body = {"prompt": prompts[1], "max_tokens": 3, "temperature": 0, "logprobs": 2}
    status, out = post(f"{server}/v1/completions", body)
    assert status == 200, out
    new = [t for p in generate.generate(setup, params, tokenizer, [prompts[1]], 3, 0.0)
           for t in p.ids]  # fmt: skip
    (expected,) = scorer.score([(prompts[1], new)], per_token=True, top_k=2)
    lp = out["choices"][0]["logprobs"]
    assert len(new) == 3 and lp["token_logprobs"] == pytest.approx(
        expected.token_logprobs.tolist(), abs=1e-5
    )
    assert [max(top.values()) for top in lp["top_logprobs"]] == pytest.approx(
        lp["token_logprobs"], abs=1e-6
    )  # greedy: each token is its position's likeliest


def test_bad_completion_requests_are_one_400_error(server):
    url = f"{server}/v1/completions"
    cases = [
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": [], "max_tokens": 0}, "prompt"),
        ({"prompt": [[1, 2], []], "max_tokens": 0, "echo": True}, "prompt"),
        ({"prompt": [10**9], "max_tokens": 0}, "prompt"),
        ({"prompt": ["a", "b"], "stream": True}, "stream"),
        ({"prompt": [5] * 65, "max_tokens": 0, "echo": True, "logprobs": 0}, "prompt"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ]
    for body, param in cases:
        status, out = post(url, body)
        assert status == 400, (body, out)
        error = out["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, out
        assert "\n" not in error["message"]
    status, out = post(url, {"prompt": [5] * 64, "max_tokens": 0, "logprobs": 0, "echo": True})
    assert status == 200 and len(out["choices"][0]["logprobs"]["token_logprobs"]) == 64


def test_lm_eval_local_completions_against_serve_equals_the_adapter(model_run, server, tmp_path):
    pytest.importorskip("lm_eval")
    import lm_eval
    import lm_eval.tasks

    from gptjax.evaluation import harness

    run_dir = model_run[0]
    path = write_jsonl(tmp_path / "served.jsonl", make_examples(10, 5))
    name = harness.task_yaml(tasks.read_task(path), path, tmp_path)
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server}/v1/completions,model=gptjax,max_length=64,batch_size=16",
        tasks=[name],
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    setup, params, tokenizer = runs.load_run(run_dir)
    local = harness.evaluate(harness.make_lm(setup, params, tokenizer), [str(path)])
    for metric in ("acc", "acc_norm"):
        assert served["results"][name][f"{metric},none"] == local["results"][name][f"{metric},none"]
    ours = sorted(local["samples"][name], key=lambda s: s["doc_id"])
    theirs = sorted(served["samples"][name], key=lambda s: s["doc_id"])
    for a, b in zip(ours, theirs, strict=True):
        assert a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
        lls_a = [float(r[0][0]) for r in a["resps"]]
        lls_b = [float(r[0][0]) for r in b["resps"]]
        assert lls_a == pytest.approx(lls_b, abs=1e-4)
