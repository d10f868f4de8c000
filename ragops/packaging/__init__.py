"""Packaging models as GGUF artifacts: a base model, or a base with a LoRA adapter merged in.

* :mod:`ragops.packaging.gguf_writer` — a llama-family transformers model → a GGUF file;
* :mod:`ragops.packaging.quantize` — the ``--quant`` choices (f16, q8_0, q4_k_m) per tensor;
* :mod:`ragops.packaging.package` — NAME → artifact in the registry, with lineage.

Heavy imports (torch, transformers, gguf) happen inside the functions, so importing this
package is cheap.
"""

from ragops.packaging.package import PackageSource, check_new_name, package_model, resolve_source, sha256_file
from ragops.packaging.quantize import DEFAULT_QUANT, QUANTS, check_quant

__all__ = [
    "DEFAULT_QUANT", "QUANTS", "PackageSource", "check_new_name", "check_quant", "package_model", "resolve_source",
    "sha256_file",
]  # fmt: skip
