"""Built-in experiment trackers and in-run profiling: the ``tensorboard``, ``mlflow`` and
``wandb`` callbacks (``run.report_to``, options in ``[report.<name>]``) and ``profiler``
(``run.profile``)."""
