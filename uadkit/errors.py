"""User-facing errors: one class, so the CLI can print a clean one-line message and exit non-zero."""


class UadkitError(Exception):
    """An error caused by the user's input (file, config value, model dir), not by a bug."""
