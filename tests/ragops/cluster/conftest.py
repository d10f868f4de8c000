"""Fixtures for ragops.cluster: the vendored KubeRay CRD schemas, and a real local Ray head.

The CRDs live outside the repository (``../shared/kuberay-crds`` from its root, see that
folder's README): tests that need them skip with the reason when the folder is absent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ragops.cluster._helpers import CRD_DIR, CRD_FILES, CrdValidator


@pytest.fixture(scope="session")
def crds() -> CrdValidator:
    """The CRD validators (skips when the vendored CRDs or jsonschema are missing)."""
    pytest.importorskip("jsonschema", reason="jsonschema is needed to validate manifests (pip install jsonschema)")
    if not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()):
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (expected the shared/kuberay-crds folder beside the repository)")
    return CrdValidator(CRD_DIR)


@contextlib.contextmanager
def local_head(num_cpus: int) -> Iterator[Any]:
    """A real local Ray head with the Jobs API and token auth, started by ``ragops cluster up``'s
    code on free ports and its own short temp dir, so it never touches the test session's
    in-process Ray; stopped (its processes only) at the end. Yields ``(head, env)``."""
    from ragops.cluster.localhead import _free_port, start_head, stop_head

    registry = Path(tempfile.mkdtemp(prefix="rgh-"))
    temp = Path(tempfile.mkdtemp(prefix="rgt-", dir="/tmp"))
    env = {**os.environ, "RAGOPS_HEADS_DIR": str(registry)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    port = _free_port()
    head, _ = start_head(port, num_cpus=num_cpus, temp_dir=temp, timeout_s=150, environ=env)
    try:
        # The CLI finds the head's token through the registry named by RAGOPS_HEADS_DIR. The
        # session's in-process ray.init() sets RAY_AUTH_MODE=token in os.environ (Ray 2.60
        # enables token auth for new local clusters): unset it so no other token is picked up.
        unset = dict.fromkeys(("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"))
        yield head, {"RAGOPS_HEADS_DIR": str(registry), **unset}
    finally:
        stop_head(head, environ=env)
        shutil.rmtree(registry, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Any]:
    """A 2-CPU local head (see :func:`local_head`)."""
    with local_head(2) as head:
        yield head
