"""A recipe is input, not code: a recipe value that would run code on this machine (a ``pipe:``
shard URL runs a shell command, ``trust_remote_code`` runs Python from a model's repository) is
refused unless the user allows code for this process, with ``mmfw --allow-code`` or
``MMFW_ALLOW_CODE=1``.

The rule matters because recipes travel: ``mmfw eval``, :func:`mmfw.load_run` and a distill
teacher rebuild models and datasets from the recipe in someone else's run directory. A plugin
calls :func:`require_code` where it validates such a value, before anything runs, so the refusal
is a :class:`~mmfw.spi.RecipeError` naming the key. The environment variable is inherited, so
torchrun ranks and sweep subprocesses follow the choice made on the command line.
"""

from __future__ import annotations

import os
import sys

from .errors import RecipeError

__all__ = ["ALLOW_ENV", "code_allowed", "require_code"]

#: the environment variable that allows a recipe's code (``--allow-code`` sets it to 1)
ALLOW_ENV = "MMFW_ALLOW_CODE"

_said: set[str] = set()  # what was announced in this process: each thing once


def code_allowed() -> bool:
    """True when ``MMFW_ALLOW_CODE`` is 1, true or yes (``mmfw --allow-code`` sets it)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def require_code(what: str, key: str, given: object) -> None:
    """Refuse ``what`` (code a recipe value would run) unless code is allowed.

    Refused: a :class:`RecipeError` at ``key`` with the value ``given``. Allowed: one line on
    stderr (once per process and thing, from rank 0) saying what will run.
    """
    if not code_allowed():
        raise RecipeError(
            f"{what} runs code on this machine (a shell command / code from the model's "
            "repository); a recipe or run directory is code only if you allow it: pass "
            f"--allow-code to mmfw (or set {ALLOW_ENV}=1)",
            key=key,
            given=given,
        )
    if what not in _said:
        _said.add(what)
        if os.environ.get("RANK", "0") == "0":
            print(f"mmfw: running code from the recipe: {what}", file=sys.stderr, flush=True)
