"""Validation of ``tracking.mlflow_uri`` at start-up (no MLflow import needed)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

# The stores MLflow itself resolves; anything else fails later, deep inside a run, so refuse it here.
SCHEMES = ("sqlite", "http", "https", "file", "databricks", "postgresql", "mysql", "mssql")


def check_tracking_uri(value: str) -> str:
    """Return ``value`` as MLflow expects it (a bare folder becomes a ``file:`` URI).

    Raises:
        ValueError: an unknown scheme, or an http(s) URI without a host.
    """
    value = value.strip()
    parsed = urlparse(value)
    scheme = parsed.scheme.lower()
    if not scheme or (len(scheme) == 1 and value[1:3] in (":\\", ":/")):  # a path (a Windows drive letter too)
        return Path(value).expanduser().resolve().as_uri()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2://
    if base not in SCHEMES:
        raise ValueError(f"unknown MLflow tracking URI scheme '{scheme}' (supported: {', '.join(SCHEMES)}, or a folder path)")
    if base in ("http", "https") and not parsed.netloc:
        raise ValueError(f"MLflow tracking URI '{value}' has no host (e.g. http://mlflow:5000)")
    return value
