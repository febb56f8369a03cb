"""Other tools' formats: Hugging Face GPT-2 import and export (gptjax/interop/hf.py, with the
tokenizer side in gptjax/interop/hf_tokenizer.py). Importing this package is light; the `[hf]`
extra (safetensors, tokenizers, transformers, torch) loads only when a conversion runs."""

from gptjax.errors import UserError


class InteropError(UserError, ValueError):
    """A directory or checkpoint gptjax cannot import or export; the message is one line."""


INSTALL_HINT = "pip install 'gptjax[hf]'"
