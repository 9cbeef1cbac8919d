"""Built-in schedulers: LR schedules (constant, warmup-cosine, onecycle) and staged ones
(three-stage, progressive-unfreeze) that also freeze, set LR multipliers and switch losses."""
