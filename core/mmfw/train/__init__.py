"""Training: the loop, the contrastive step, optimisation and the checkpointer."""
