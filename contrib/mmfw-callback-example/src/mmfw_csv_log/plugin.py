"""The module the entry point names: mmfw calls its hooks to find this package's components."""

from mmfw.spi import hookimpl

from .csv_log import csv_log


@hookimpl
def mmfw_callbacks() -> dict:
    return {"csv-log": csv_log}
