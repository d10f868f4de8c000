"""Errors raised by :mod:`ragops.cluster`; each message is complete on its own."""

from __future__ import annotations

from ragops.errors import RagopsError


class ClusterError(RagopsError):
    """A cluster cannot be reached, started, stopped or asked something."""


class AuthError(ClusterError):
    """The Ray dashboard refused the request: a token is missing or wrong."""


class JobRefused(RagopsError):
    """A job was not submitted because it could not work on the target cluster."""

    exit_code = 2
