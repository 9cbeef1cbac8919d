"""Built-in export formats (``mmfw export RUN_DIR --format <name>``)."""
