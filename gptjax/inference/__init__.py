"""Inference beside the training core: the facts of generation stated once (`settings`: sampling
defaults, tokens per device call, the context check, finish reasons), the KV-cache generator
(`generate`), a run as a chat model (`chatbot`), the terminal chat (`terminal`) and the
OpenAI-compatible server (`serve`)."""
