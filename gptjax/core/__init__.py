"""The model and its step: parameters, attention, loss, sharding, optimiser, FLOPs."""
