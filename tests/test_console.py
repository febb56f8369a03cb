"""What a user sees: debug mode's few steps, plain progress lines in a log file, no run directory
left by a failed start, sampling that says why it stopped and labels batch samples, and a chat
that echoes piped input and warns about a model that never saw the chat template."""

import io
import json
import logging
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import pytest
import yaml
from conftest import ROOT, tiny_config

from gptjax import cli, config
from gptjax.core import steps
from gptjax.data import DataError
from gptjax.inference import generate
from gptjax.training import checkpoint, debug, loop, runs


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, cache_dir):
    """A tiny run at step 0 on the standard library (no conversations), 64-token context: its
    config, tokenizer and initial parameters, written as a run directory (no training needed)."""
    run = tmp_path_factory.mktemp("plain")
    cfg = tiny_config(run, cache_dir)
    data = runs.load_data(cfg, run)
    (run / "config.yaml").write_text(cfg.to_yaml())
    data.tokenizer.save(run / data.tokenizer.filename)
    setup = steps.build(cfg, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(run, keep=1, async_save=False)
    try:
        ckpt.save(0, steps.init_state(setup), cfg.to_dict())
    finally:
        ckpt.close()
    return run


@pytest.fixture
def gptjax_log():
    """What gptjax's logger says during a test (the CLI's own handler may write elsewhere)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("gptjax")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


# --- a debug run logged to a file ------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """`gptjax train configs/debug.yaml --debug ... > out.log 2> err.log` (no train.steps given)
    on a fresh cache: (run directory, stdout bytes, stderr bytes)."""
    root = tmp_path_factory.mktemp("logged")
    text = root / "library.txt"  # one file, cut into pieces at line ends
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text.write_text("".join(p.read_text() for p in sorted((stdlib / "json").glob("*.py"))) * 3)
    settings = [f"data.source=text:{text}", f"data.cache_dir={root / 'cache'}", "data.workers=1"]
    settings += ["train.log_every=5", "debug.nans=false"]
    with open(root / "out.log", "w") as out, open(root / "err.log", "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "gptjax", "train", "configs/debug.yaml", "--debug"]
            + [f"run_dir={root / 'run'}", *settings],
            stdout=out,
            stderr=err,
            cwd=ROOT,
            timeout=600,
        )
    stdout, stderr = (root / "out.log").read_bytes(), (root / "err.log").read_bytes()
    assert done.returncode == 0, stderr.decode()[-2000:]
    return root / "run", stdout, stderr, settings


def test_debug_without_train_steps_stops_at_its_default_and_says_so(logged):
    run, stdout, stderr, _ = logged
    assert config.DebugConfig().steps == 10 < config.load(ROOT / "configs/debug.yaml").train.steps
    err = stderr.decode()
    assert "debug mode: stopping after 10 of the config's 20 steps (debug.steps)" in err
    assert "debug mode stopped at step 10 of 20; checkpoint saved" in err
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in lines) == 10
    assert json.loads(stdout)["final_step"] == 10
    # the schedule is the config's 20 steps: the run is the first half of the full one
    saved = config.load(run / "config.yaml")
    assert (saved.train.steps, saved.train.stop_at) == (20, 10)


def test_debug_steps_given_on_the_command_line_are_not_capped():
    cfg = tiny_config("unused", "unused", "debug.enabled=true")
    for given in ({"train.steps"}, {"train.stop_at"}):
        assert debug.cap_steps(cfg, given) == (cfg, None)
    assert debug.cap_steps(cfg.model_copy(update={"debug": config.DebugConfig()}), set())[1] is None
    short = tiny_config("unused", "unused", "debug.enabled=true", "train.steps=5")
    assert debug.cap_steps(short, set()) == (short, None)  # already a handful


def test_output_to_a_file_has_plain_lines_and_no_carriage_returns(logged, tmp_path):
    """No progress bars in a file: a plain line every few steps, the data preparation's lines,
    JAX's compile log as gptjax's information; a second run on the same cache says it is
    cached."""
    _, stdout, stderr, settings = logged
    assert b"\r" not in stdout and b"\r" not in stderr
    err = stderr.decode()
    assert "step 5/20: loss " in err and "step 10/20: loss " in err
    assert "documents: " in err and "tokenize: " in err and " doc in " in err
    assert "gptjax: INFO: Compiling jit(step_fn)" in err and "WARNING:jax" not in err
    assert max(len(line) for line in err.splitlines()) < 400
    cfg = tiny_config(tmp_path / "again", "unused", *settings)
    stream = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, stream  # not a terminal either
    try:
        runs.load_data(cfg, tmp_path / "again", progress=True)
    finally:
        sys.stderr = sys_stderr
    assert "gptjax: data: cached, nothing to prepare" in stream.getvalue()
    assert "\r" not in stream.getvalue()


# --- a failed start -------------------------------------------------------------------------


def test_a_failed_start_leaves_no_run_directory(tmp_path, cache_dir):
    run = tmp_path / "runs" / "new"
    cfg = tiny_config(run, cache_dir, f"data.source=text:{tmp_path / 'missing.txt'}")
    with pytest.raises(DataError, match="data file not found"):
        loop.train(cfg, progress=False)
    assert not (tmp_path / "runs").exists()  # nor the parent it created
    kept = tmp_path / "kept"  # a directory that was there before stays, with what it held
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        loop.train(cfg.model_copy(update={"run_dir": str(kept)}), progress=False)
    assert (kept / "notes.txt").read_text() == "mine" and len(list(kept.iterdir())) == 1


# --- sampling -------------------------------------------------------------------------------


def oracle(run, prompts, **settings):
    """Each row's text and finish reason, from the library the CLI calls."""
    setup, params, tokenizer = runs.load_run(run)
    texts, finish = [""] * len(prompts), [None] * len(prompts)
    for piece in generate.generate(setup, params, tokenizer, prompts, **settings):
        texts[piece.row] += piece.text
        finish[piece.row] = finish[piece.row] or piece.finish
    return texts, finish


LONG = "def main():\n    return parse(value, 'x') + other.value\n" * 2  # most of 64 tokens


def test_a_sample_ended_by_the_context_says_so(plain_run, capsys):
    args = ["sample", str(plain_run), "--prompt", LONG, "--temperature", "0"]
    texts, finish = oracle(plain_run, [LONG], max_new_tokens=500, temperature=0.0)
    assert finish == ["context"]  # the oracle: this prompt runs into the 64-token context
    assert cli.main([*args, "--max-new-tokens", "500"]) == 0
    out, err = capsys.readouterr()
    assert out == LONG + texts[0] + "\n"
    assert "gptjax: the 64-token context (model.seq_len, the prompt included) ended the " in err
    # a sample that gets all the tokens it asked for says nothing
    assert cli.main([*args, "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().err == ""


def test_batch_samples_are_labelled_with_prompt_and_sample_numbers(plain_run, tmp_path, capsys):
    prompts = ["import ", LONG.replace("\n", " ")]  # the second runs into the context
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    rows = [p for p in prompts for _ in range(2)]
    texts, finish = oracle(plain_run, rows, max_new_tokens=40, temperature=0.8, seed=3)
    args = ["sample", str(plain_run), "--prompt-file", str(tmp_path / "prompts.txt")]
    assert cli.main([*args, "--num-samples", "2", "--max-new-tokens", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    labels = [line for line in out.splitlines() if line.startswith("--- ")]
    numbers = [f"prompt {p}, sample {n}" for p in (1, 2) for n in (1, 2)]
    assert [label[4:].split(" (")[0].removesuffix(" ---") for label in labels] == numbers
    assert finish[2:] == ["context", "context"] and "context" not in finish[:2]
    for row, label in enumerate(labels):  # each sample's own text, in order, after its label
        assert out.split(label + "\n", 1)[1].startswith(rows[row] + texts[row] + "\n")
        assert ("context (model.seq_len" in label) == (finish[row] == "context")


# --- chat -----------------------------------------------------------------------------------


def chat(run, monkeypatch, capsys, typed: str) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))  # piped: not a terminal
    assert cli.main(["chat", str(run), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    return capsys.readouterr()


def test_piped_chat_echoes_its_input_and_warns_about_a_plain_model(
    plain_run, monkeypatch, capsys, gptjax_log
):
    out, _ = chat(plain_run, monkeypatch, capsys, "Hello there\n/reset\nBye\n")
    assert "you> Hello there\nbot> " in out
    assert "you> /reset\n(conversation forgotten)\nyou> Bye\nbot> " in out
    warned = gptjax_log.getvalue()
    assert warned.count("has not learned the chat template") == 1, warned
    assert str(plain_run) in warned


def test_a_chat_model_gets_no_template_warning(
    plain_run, tmp_path, monkeypatch, capsys, gptjax_log
):
    """The same weights in a run whose config says it trained on conversations (chitchat)."""
    chat_run = tmp_path / "chat"
    shutil.copytree(plain_run, chat_run)
    saved = yaml.safe_load((chat_run / "config.yaml").read_text())
    saved["data"].update(source="chitchat", packing="segments")
    (chat_run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert runs.learned_chat(chat_run) and not runs.learned_chat(plain_run)
    out, _ = chat(chat_run, monkeypatch, capsys, "Hello there\n")
    assert "you> Hello there\nbot> " in out
    assert "chat template" not in gptjax_log.getvalue()
