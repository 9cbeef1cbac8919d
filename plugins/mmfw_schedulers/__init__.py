"""Built-in stage schedulers (LR schedules; staged freezing comes with three-stage)."""
