"""`tfds:NAME[/CONFIG][:VERSION]`: a dataset the user prepared with TFDS (ArrayRecord format)."""

from __future__ import annotations

import gptjax.data.documents as documents
from gptjax.config import DataConfig


def open(argument: str, cfg: DataConfig) -> documents.Documents:  # noqa: A001 - the source API
    return documents.open_tfds(
        argument, documents.tfds_data_dir(cfg.tfds_data_dir), cfg.val_fraction
    )
