"""Typer sub-applications of the ragops CLI, one module per command group.

``cli.py`` at the repository root assembles them; each module only parses options, calls one
library function and renders its result (shared helpers in :mod:`.common`).
"""
