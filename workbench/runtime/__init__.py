"""Paged-KV runtime: the block manager and scheduler (pure bookkeeping), the executor (the one module that owns
the device), sampling, and the offline and asynchronous engines over them."""
