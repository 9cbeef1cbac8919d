"""Parallelism: torch.distributed helpers, FSDP sharding, and the strategy objects that hide
them from the training loop (single process, DDP, FSDP)."""
