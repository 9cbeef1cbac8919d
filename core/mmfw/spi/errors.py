"""Errors a user can cause. The CLI prints them as one clear message, never a traceback."""

from __future__ import annotations

_UNSET = object()


class MmfwError(Exception):
    """Base of every error that is the user's to fix (recipe, data, plugin names)."""


class RecipeError(MmfwError):
    """A recipe is wrong: names the file, the key path, what was expected and what was given."""

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        key: str | None = None,
        expected: str | None = None,
        given: object = _UNSET,
    ) -> None:
        self.reason, self.file, self.key = reason, file, key
        self.expected, self.given = expected, given
        where = ", ".join(p for p in (file and f"recipe {file}", key and f"key '{key}'") if p)
        text = f"{where}: {reason}" if where else reason
        if expected is not None:
            text += f"\n  expected: {expected}"
        if given is not _UNSET:
            text += f"\n  given:    {given!r}"
        super().__init__(text)

    def within(self, *, file: str | None = None, prefix: str | None = None) -> RecipeError:
        """The same error located in a file and under a key prefix, filled in as it bubbles up."""
        key = ".".join(p for p in (prefix, self.key) if p) or None
        return RecipeError(
            self.reason,
            file=self.file or file,
            key=key,
            expected=self.expected,
            given=self.given,
        )


class PluginError(MmfwError):
    """An unknown plugin name, a name registered twice, or a plugin that failed to load."""


class DataError(MmfwError):
    """Bad data found before or during a run: says which file or row, and how many."""


class ResumeError(MmfwError):
    """A run cannot be resumed as asked (no checkpoint, or a recipe that changed)."""

__all__ = ['DataError', 'MmfwError', 'PluginError', 'RecipeError', 'ResumeError']
