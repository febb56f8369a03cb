"""Training on preference pairs: `train.objective=dpo | reward` around the training loop.

`check` (before anything is written) refuses a mismatch of objective and data and resolves
DPO's reference run; `objective` builds the step's objective once the run directory exists; its
`evaluate` scores the held-out pairs at every evaluation (eval_pref_acc, eval_pref_margin,
eval_pref_loss, eval_reward_chosen, eval_reward_rejected; eval_logp_acc and eval_logp_margin:
the policy's own log π(chosen) − log π(rejected), without the reference).

The reference's checkpoint step is resolved when the run starts and recorded in
run_dir/reference.json, so a resumed run reloads exactly the same reference parameters (they are
never part of the run's own checkpoints) even if the reference run has saved newer ones since.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np

from gptjax import atomic
from gptjax.config import Config, ConfigError
from gptjax.core import preference, steps
from gptjax.data import loader as data_loader
from gptjax.training import checkpoint, runs

RECORD = "reference.json"


def _is_pairs(cfg: Config) -> bool:
    return cfg.data.mixture is None and cfg.data.source.partition(":")[0] == "prefs"


def check(cfg: Config) -> tuple[Path, int | None] | None:
    """The reference (run directory, step or None: newest) of a DPO run; None for the other
    objectives. One ConfigError for a mismatch, before anything is written."""
    objective = cfg.train.objective
    if objective == "lm":
        if _is_pairs(cfg):
            raise ConfigError(
                f"data.source={cfg.data.source} holds preference pairs: set train.objective=dpo "
                "(or reward)"
            )
        return None
    if not _is_pairs(cfg):
        raise ConfigError(
            f"train.objective={objective} trains on preference pairs: set "
            "data.source=prefs:PATH (docs/preference.md)"
        )
    if objective != "dpo":
        return None
    spec = cfg.train.reference or cfg.train.init_from
    if not spec:
        raise ConfigError(
            "train.objective=dpo needs a frozen reference: set train.reference=RUN_DIR "
            "(or train.init_from, its default)"
        )
    path, at, step = spec.rpartition("@")
    if not (at and step.isdigit()):
        path, step = spec, None
    try:
        saved = runs.read_config(path)
    except ConfigError as error:
        raise ConfigError(f"train.reference={spec}: {error}") from None
    differ = runs.shape_changes(saved, cfg)
    if differ:
        raise ConfigError(
            f"train.reference={spec} has different parameter shapes: {'; '.join(differ)}"
        )
    return Path(path), None if step is None else int(step)


def _reference_step(run_dir: Path, source: Path, step: int | None, lead: bool) -> int:
    """The reference's checkpoint step: as recorded by this run's start, else resolved now."""
    record = run_dir / RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        if Path(saved["run"]).resolve() != source.resolve():
            raise ConfigError(
                f"{run_dir} was trained against the reference {saved['run']}, not {source}; "
                "use a new run_dir"
            )
        return int(saved["step"])
    if step is None:
        reader = checkpoint.Checkpointer(source, async_save=False, read_only=True)
        try:
            step = reader.latest_step()
        finally:
            reader.close()
        if step is None:
            raise ConfigError(f"train.reference={source} holds no checkpoint")
    if lead:
        text = json.dumps({"run": str(source.absolute()), "step": int(step)})
        atomic.write_file(record, text)
    return int(step)


class Objective:
    """The step objective (for steps.make_train_step) and the held-out pair evaluation."""

    def __init__(self, cfg: Config, setup: steps.Setup, run_dir: Path, reference, lead, data):
        self.cfg, self.setup = cfg, setup
        if cfg.train.objective == "dpo":
            source, step = reference
            self.reference_step = _reference_step(run_dir, source, step, lead)
            params = runs.restore_params(source, self.reference_step, setup)
            settings = preference.Settings(
                cfg.train.dpo_beta, cfg.train.dpo_label_smoothing, cfg.train.dpo_loss
            )
            self.step = preference.DPO(setup, params, settings)
        else:  # reward: the head row of the end-of-document id scores
            self.step = preference.Reward(setup, data.tokenizer.eod_id)
        self._eval = self.step.make_eval()

    def evaluate(self, params, data) -> dict[str, float]:
        """The DPO loss, accuracy, margin and implicit rewards over every held-out pair once."""
        B = self.cfg.train.batch_size
        P, n = B // 2, data.val.pairs
        totals: dict[str, float] = {}
        for k in range(math.ceil(n / P)):
            batch = data_loader.assemble(
                self.setup.batch_sharding,
                (B, self.cfg.model.seq_len),
                lambda a, b, k=k: data.val_batch(k, B, a, b),
            )
            valid = k * P + np.arange(P) < n
            sums = jax.device_get(self._eval(params, batch, valid))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        pairs = max(totals.pop("pairs"), 1.0)
        names = {
            "loss": "eval_pref_loss",
            "accuracy": "eval_pref_acc",
            "margin": "eval_pref_margin",
            "reward_chosen": "eval_reward_chosen",
            "reward_rejected": "eval_reward_rejected",
            "logp_margin": "eval_logp_margin",
            "logp_accuracy": "eval_logp_acc",
        }
        return {names[key]: value / pairs for key, value in totals.items()}


def score(run_dir, pairs_path: str, step: int | None = None, batch_size: int = 32) -> dict:
    """`gptjax score RUN PAIRS`: a reward model's scores of every pair of a JSONL file: the
    share of pairs it ranks chosen over rejected, the mean margin and scores, and each pair's
    two scores."""
    from gptjax.data import chat, prefs

    setup, params, tokenizer = runs.load_run(run_dir, step)
    if setup.cfg.train.objective != "reward":
        raise ConfigError(f"{run_dir} is not a reward model (train.objective=reward)")
    pairs = prefs.read(pairs_path)
    tokens, masks, _ = prefs.render(chat.Template(tokenizer), pairs, setup.cfg.model.seq_len)
    scorer = preference.Reward(setup, tokenizer.eod_id).make_scores()
    rows = tokens.reshape(-1, tokens.shape[-1]), masks.reshape(-1, masks.shape[-1])
    B = batch_size - batch_size % 2 or 2
    scores = []
    for start in range(0, len(rows[0]), B):
        part = [a[start : start + B] for a in rows]
        n = len(part[0])
        padded = [np.concatenate([a, np.repeat(a[-1:], B - n, 0)]) for a in part]  # one shape
        batch = data_loader.assemble(
            setup.batch_sharding,
            (B, setup.cfg.model.seq_len),
            lambda a, b, p=padded: _rows(p, a, b),
        )
        scores.append(np.asarray(jax.device_get(scorer(params, batch)))[:n])
    s = np.concatenate(scores).reshape(-1, 2)
    margin = s[:, 0] - s[:, 1]
    return {
        "pairs": len(pairs),
        "accuracy": float((margin > 0).mean()),
        "margin": float(margin.mean()),
        "reward_chosen": float(s[:, 0].mean()),
        "reward_rejected": float(s[:, 1].mean()),
        "scores": s.tolist(),
    }


def _rows(padded, start, stop):
    from gptjax.data import prefs

    return prefs.from_rows(padded[0][start:stop], padded[1][start:stop])


def objective(cfg: Config, setup: steps.Setup, run_dir: Path, reference, lead: bool, data):
    """The objective of cfg.train.objective (None: the language-model loss)."""
    if cfg.train.objective == "lm":
        return None
    return Objective(cfg, setup, run_dir, reference, lead, data)
