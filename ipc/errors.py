"""Errors shared by every layer."""


class UsageError(ValueError):
    """Bad input (CLI, scenario file, ZeroMQ frame contents): one-line message, exit code 2."""
