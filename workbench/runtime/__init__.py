"""Paged-KV runtime (block manager, scheduler, executor): built in the runtime issue."""
