"""`tfds:NAME[/CONFIG][:VERSION]`: a dataset the user prepared with TFDS (ArrayRecord format)."""

from __future__ import annotations

import gptjax.data.array_records as array_records
from gptjax.config import DataConfig


def open(argument: str, cfg: DataConfig) -> array_records.Documents:  # noqa: A001 - the source API
    return array_records.open_tfds(
        argument, array_records.tfds_data_dir(cfg.tfds_data_dir), cfg.val_fraction
    )
