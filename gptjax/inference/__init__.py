"""Inference beside the training core: the KV-cache generator (`generate`), a run as a chat
model (`chatbot`), the terminal chat (`terminal`) and the OpenAI-compatible server (`serve`)."""
