"""Quantization choices for packaged GGUF models: what each tensor is stored as.

Three quantizations are offered (``--quant``):

* ``f16`` — every matrix in float16: the reference, about half the float32 size;
* ``q8_0`` — matrices in 8-bit blocks of 32 (one f16 scale per block): about a quarter of
  float32, logits within a few tenths of the source; written in Python by the ``gguf`` package;
* ``q4_k_m`` — llama.cpp's 4-bit K-quant mix: the ``gguf`` package cannot write K-quants, so an
  f16 GGUF is written first and quantized by llama.cpp itself (``llama-cpp-python``).

One-dimensional tensors (norm weights) always stay float32, as llama.cpp's converter keeps them:
they are tiny, and quantizing them costs accuracy for no size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ragops.errors import InputError
from ragops.retrieval.llamacpp_engine import LLAMACPP_INSTALL

#: Supported values of ``--quant``, in the order the error message lists them.
QUANTS: tuple[str, ...] = ("f16", "q8_0", "q4_k_m")
DEFAULT_QUANT = "q8_0"
LLAMA_CPP_HINT = "q4_k_m is quantized by llama.cpp: " + LLAMACPP_INSTALL


def check_quant(quant: str) -> str:
    """Normalise ``quant`` (case-insensitive) and check it is supported.

    Raises:
        InputError: an unsupported quantization (the message lists the supported ones).
    """
    q = quant.strip().lower()
    if q not in QUANTS:
        raise InputError(f"unsupported quantization '{quant}'; supported: {', '.join(QUANTS)}")
    return q


def python_quant(quant: str) -> str:
    """The quantization the Python writer produces for ``quant`` (``q4_k_m`` goes through f16)."""
    return "f16" if quant == "q4_k_m" else quant


def file_type(quant: str) -> int:
    """The ``general.file_type`` value (llama.cpp's ``LLAMA_FTYPE_*``) of a file written as ``quant``."""
    import gguf

    return int({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[quant])  # fmt: skip


def encode_tensor(data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """Encode one float32 tensor for the Python writer.

    Args:
        data: The tensor in float32 (already permuted for llama.cpp where needed).
        quant: ``f16`` or ``q8_0``.

    Returns:
        ``(array, raw_dtype)``: ``raw_dtype`` is None for plain float arrays (the writer infers
        F32/F16 from the dtype) or the ``GGMLQuantizationType`` of quantized bytes.
    """
    import gguf

    if data.ndim <= 1:
        return data.astype(np.float32), None
    if quant == "q8_0":
        qtype = gguf.GGMLQuantizationType.Q8_0
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        # A row that does not split into whole blocks cannot be Q8_0; f16 is the lossless-enough
        # fallback llama.cpp's converter uses too.
        if data.shape[-1] % block == 0:
            return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    return data.astype(np.float16), None


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, or None when it cannot be imported."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - a broken native build raises more than ImportError
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


def require_llama_cpp(quant: str) -> None:
    """Fail early (before any conversion) when ``quant`` needs llama.cpp and it is missing.

    Raises:
        InputError: ``q4_k_m`` without an importable ``llama_cpp``.
    """
    if quant == "q4_k_m" and llama_cpp_version() is None:
        raise InputError(LLAMA_CPP_HINT)


def llama_cpp_quantize(src: Path, dst: Path, quant: str, *, nthread: int = 2) -> None:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp (``llama_model_quantize``).

    Tensors whose rows do not split into K-quant super-blocks (256) get llama.cpp's own fallback
    type, so tiny test models quantize too.

    Raises:
        InputError: llama-cpp-python is not installed, or llama.cpp reported a failure.
    """
    require_llama_cpp(quant)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise InputError(f"llama.cpp could not quantize {src.name} to {quant} (llama_model_quantize returned {rc})")
