"""Data: corpora, the SentencePiece tokenizer, packed sequences and step-indexed batches."""

from gptjax.data.corpus import DataError
from gptjax.data.pipeline import Dataset, load_dataset, prepare

__all__ = ["DataError", "Dataset", "load_dataset", "prepare"]
