"""Helpers for the ragops.cluster tests: the CRD validator, a CLI with the cluster sub-apps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import typer
import yaml

REPO = Path(__file__).resolve().parents[3]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def cluster_cli() -> typer.Typer:
    """A CLI with the three sub-apps, so these tests do not depend on cli.py registering them."""
    from ragops.commands.cluster import cluster_app, job_app, kuberay_app

    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(job_app, name="job")
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(kuberay_app, name="kuberay")
    return app


def strictify(schema: Any) -> Any:
    """``additionalProperties: false`` wherever ``properties`` is listed without it (rejects typos)."""
    if isinstance(schema, list):
        return [strictify(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strictify(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class CrdValidator:
    """Validates manifests against the v1 openAPIV3Schema of each KubeRay CRD (Draft 7)."""

    def __init__(self, crd_dir: Path) -> None:
        from jsonschema import Draft7Validator

        self.validators: dict[str, tuple[Any, Any]] = {}
        for kind, file in CRD_FILES.items():
            crd = yaml.load((crd_dir / file).read_text(), Loader=_Loader)
            schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
            self.validators[kind] = (Draft7Validator(schema), Draft7Validator(strictify(copy.deepcopy(schema))))

    def errors(self, manifest: dict[str, Any]) -> list[str]:
        """Problems of one manifest: apiVersion/kind (the schema does not check them), then the
        plain schema and the strict copy (unknown fields)."""
        kind = manifest.get("kind")
        if manifest.get("apiVersion") != "ray.io/v1":
            return [f"apiVersion is {manifest.get('apiVersion')!r}, expected 'ray.io/v1'"]
        if kind not in self.validators:
            return [f"kind {kind!r} is not one of {sorted(self.validators)}"]
        out = []
        for label, validator in zip(("schema", "strict"), self.validators[kind]):
            for e in validator.iter_errors(manifest):
                out.append(f"[{label}] {'/'.join(map(str, e.absolute_path))}: {e.message}")
        return out
