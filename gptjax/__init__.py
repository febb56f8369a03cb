"""gptjax: pretrain GPT models with JAX, Flax NNX, Optax and Orbax."""

__version__ = "0.1.0"
