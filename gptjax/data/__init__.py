"""Data: documents (TFDS ArrayRecord), the SentencePiece tokenizer, packed windows on disk and
step-indexed batches. Importing this package is light: TFDS and grain load when first used.

Modules inside the package import each other as `import gptjax.data.X as X`, never
`from gptjax.data import X`: the latter names this package, which imports `pipeline`, and would
make an import cycle."""

from gptjax.data.corpus import DataError
from gptjax.data.mixture import load_dataset
from gptjax.data.pipeline import Dataset, prepare

__all__ = ["DataError", "Dataset", "load_dataset", "prepare"]
