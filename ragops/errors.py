"""Error types whose message is meant for the user.

Everything the CLI or the HTTP layer shows a user derives from :class:`RagopsError`: the
message is complete on its own (what went wrong, what to do), so callers print it as is and
never a traceback.
"""

from __future__ import annotations


class RagopsError(Exception):
    """Base class of errors that carry a user-facing message."""

    #: Exit status the CLI uses for this error.
    exit_code: int = 1


class ConfigError(RagopsError):
    """A configuration key or value is wrong (unknown key, bad type, bad YAML)."""

    exit_code = 2


class ModelNotFoundError(RagopsError):
    """A model name does not resolve to loadable weights (unknown, or a hub id offline)."""


class CollectionError(RagopsError):
    """A collection is missing, or incompatible with the configured embedder."""


class StoreLockedError(RagopsError):
    """The embedded Qdrant shard is open in another process."""


class InputError(RagopsError):
    """A user-supplied input (file, query, request field) is invalid."""

    exit_code = 2
