"""mmfw-callback-example: the ``csv-log`` callback, a run's rows as CSV files."""

from .csv_log import CSVLog, CSVLogOptions

__all__ = ["CSVLog", "CSVLogOptions"]
