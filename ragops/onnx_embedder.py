"""ONNX Runtime int8 backend for :class:`ragops.embeddings.TextEmbedder` (``embedder.backend: onnx``).

Why a hand-rolled export rather than sentence-transformers' own ``backend="onnx"``: that path
(``SentenceTransformer(..., backend="onnx")``, ``export_dynamic_quantized_onnx_model``) needs
``optimum-onnx``, whose only release pins ``transformers<4.58`` and would downgrade this
project's transformers 5. So the transformer is exported with ``torch.onnx.export`` (the
TorchScript exporter, ``dynamo=False``: the dynamo exporter needs ``onnxscript`` and gains
nothing for an encoder), quantized with ``onnxruntime.quantization.quantize_dynamic``, and the
sentence-transformers head (pooling, normalize) is re-done in numpy from the settings that
sentence-transformers itself read from the model's config at export time (stored in the cache
manifest), so CLS (BGE) vs mean (MiniLM), prompts and ``include_prompt`` match exactly.

Quantization recipe (measured on all-MiniLM-L6-v2 against float32 torch, 128 texts): plain
``quantize_dynamic`` (per-tensor QInt8) gave mean cosine 0.948; per-channel weights 0.993;
keeping the FFN down-projections (the MatMuls whose weight shrinks the width, 4h -> h, fed by
the long-tailed GELU output) in float32 gives 0.9965 (min 0.994) for ~15% of the speed-up.
Activation x activation MatMuls (QK^T, attention x V) stay float32 (``MatMulConstBOnly``).

Cache: ``<root>/<sha256-prefix>/`` where the hash covers every file of the source model plus
:data:`RECIPE`, and root is ``embedder.onnx_cache_dir``, else ``$RAGOPS_ONNX_CACHE``, else
``$XDG_CACHE_HOME/ragops/onnx`` (``~/.cache/ragops/onnx``). Not next to the source model: the
packaged model lives in site-packages, which may be read-only. Not under the project's
``data_dir``: the export depends on the model alone, so every project (and every Ray worker on
a node) shares one copy. An export is written to a temporary folder and renamed into place, so
concurrent exporters are safe: processes of one machine take turns on a lock file (the
first exports, the others find its entry), and where that lock does not reach (a cache on a
volume shared by several nodes) the first rename wins and the others discard their copy. A cache
entry whose ``model.onnx`` does not match the manifest's sha256 (a crash mid-copy, a truncated
file) is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ragops.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

#: Bump when the export or quantization changes: it is part of the cache key.
RECIPE = "ragops-onnx-int8/1: torchscript-export opset17; quantize_dynamic QInt8 per-channel, const-B MatMuls, down-projections float32"
MODEL_FILE = "model.onnx"
MANIFEST = "manifest.json"
_POOLING = {"cls", "mean", "max", "mean_sqrt_len_tokens"}
#: How many times this process exported a model (tests check a second load reuses the cache).
EXPORTS = 0
_export_lock = threading.Lock()


def require_onnxruntime() -> Any:
    """Import onnxruntime or fail with the install command."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            "embedder.backend 'onnx' needs ONNX Runtime: pip install 'onnxruntime>=1.18' 'onnx>=1.16' "
            "(or set embedder.backend=torch)"
        ) from exc
    return onnxruntime


def cache_root(configured: str | None = None) -> Path:
    """The folder holding exported models (see the module docstring for the order)."""
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("RAGOPS_ONNX_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ragops" / "onnx"


def source_hash(source: Path) -> str:
    """sha256 over the recipe and every file of the model folder (names and contents)."""
    h = hashlib.sha256(RECIPE.encode())
    for f in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(source)).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # quantize_dynamic logs "consider pre-processing" on the root logger at WARNING every call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (a no-op where fcntl is missing: Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_onnx(source: Path, dest_dir: Path, *, quantize: bool = True) -> dict[str, Any]:
    """Export the sentence-transformers model in ``source`` to ``dest_dir/model.onnx``.

    Args:
        source: The model folder (a sentence-transformers model: Transformer, Pooling and
            optionally Normalize).
        dest_dir: An existing, empty folder.
        quantize: int8-quantize the weights (False keeps float32; tests compare it exactly).

    Returns:
        The manifest (also written to ``dest_dir/manifest.json``).

    Raises:
        ConfigError: the model has modules this backend does not re-implement (Dense, ...).
    """
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(source), device="cpu", local_files_only=True)
    modules = [type(m).__name__ for m in st]
    if modules[:2] != ["Transformer", "Pooling"] or any(m != "Normalize" for m in modules[2:]):
        raise ConfigError(
            f"embedder.backend 'onnx' supports Transformer + Pooling (+ Normalize) models; {source} has "
            f"{' + '.join(modules)}. Use embedder.backend=torch for it"
        )
    pooling = st[1]
    modes = [pooling.pooling_mode] if isinstance(pooling.pooling_mode, str) else list(pooling.pooling_mode)
    if unknown := [m for m in modes if m not in _POOLING]:
        raise ConfigError(f"embedder.backend 'onnx' does not implement pooling {unknown} ({source}); use backend torch")
    hf = st[0].auto_model.eval()
    tokenizer = st.tokenizer
    # The inputs the tokenizer produces and the model reads (BERT: ids, mask, token types).
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    class _Hidden(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    sample = tokenizer(["a short one", "a somewhat longer sample sentence to trace"], padding=True, return_tensors="pt")
    fp32 = dest_dir / ("model.fp32.onnx" if quantize else MODEL_FILE)
    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about shape-dependent Python branches in transformers' mask code: the
        # branches taken are the batch/seq-independent ones (checked by the exactness test).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Hidden(hf), tuple(sample[n] for n in names), str(fp32), dynamo=False, opset_version=17,
            input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
        )
    if quantize:
        _quantize(fp32, dest_dir / MODEL_FILE)
        fp32.unlink()
    manifest = {
        "recipe": RECIPE,
        "quantized": quantize,
        "source": str(source),
        "inputs": names,
        "pooling": modes,
        "include_prompt": bool(getattr(pooling, "include_prompt", True)),
        "normalize": "Normalize" in modules,
        "dim": int(st.get_embedding_dimension()),
        "max_seq_length": int(st.max_seq_length),
        "prompts": dict(getattr(st, "prompts", None) or {}),
        "onnx_sha256": _file_sha256(dest_dir / MODEL_FILE),
    }
    (dest_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {w.name: tuple(w.dims) for w in graph.initializer}
    # Down-projections (weight (in, out) with in > out) stay float32: see the module docstring.
    keep_fp32 = [
        n.name for n in graph.node
        if n.op_type == "MatMul" and len(weights.get(n.input[1], ())) == 2 and weights[n.input[1]][0] > weights[n.input[1]][1]
    ]
    with _quiet_root_logger():
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep_fp32, extra_options={"MatMulConstBOnly": True},
        )


def _valid(entry: Path) -> dict[str, Any] | None:
    """The entry's manifest when its model file is intact, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("recipe") == RECIPE and _file_sha256(entry / MODEL_FILE) == manifest["onnx_sha256"]:
            return manifest
    except (OSError, ValueError, KeyError):
        pass
    return None


def ensure_exported(source: Path, root: Path) -> tuple[Path, dict[str, Any]]:
    """Return ``(entry_dir, manifest)`` for ``source``, exporting it on the first call.

    Raises:
        ModelNotFoundError: the export failed (the message names the model and the cache).
    """
    global EXPORTS
    entry = root / source_hash(source)[:16]
    if (manifest := _valid(entry)) is not None:
        return entry, manifest
    if entry.exists():
        log.warning("ONNX cache entry %s is incomplete or corrupt; rebuilding it", entry)
    try:
        (root / ".locks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot create the ONNX cache {root}: {exc}; set embedder.onnx_cache_dir") from exc
    # Threads of a process (a lock) and processes of a node (flock: Ray actors starting
    # together) export once; the others wait and reuse it. The temp folder + rename below is
    # what keeps the entry whole where flock does not reach (other nodes on a shared volume).
    with _export_lock, _file_lock(root / ".locks" / f"{entry.name}.lock"):
        if (manifest := _valid(entry)) is not None:
            return entry, manifest
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        try:
            log.info("exporting %s to ONNX int8 under %s (once per model)", source, entry)
            export_onnx(source, tmp)
            EXPORTS += 1
            if entry.exists():  # corrupt (checked above): move it aside, then take its place
                trash = Path(tempfile.mkdtemp(prefix=f".trash-{entry.name}-", dir=root))
                try:
                    os.replace(entry, trash / "old")
                except OSError:  # another process replaced it first: the rename below decides
                    log.debug("corrupt ONNX cache entry %s was already replaced", entry)
            try:
                os.rename(tmp, entry)
            except OSError:
                if _valid(entry) is None:  # lost the race to an exporter whose copy is bad
                    raise
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - surface as a model error naming model and cache
            raise ModelNotFoundError(f"could not export embedder {source} to ONNX under {root}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for trash in root.glob(f".trash-{entry.name}-*"):
                shutil.rmtree(trash, ignore_errors=True)
    manifest = _valid(entry)
    if manifest is None:
        raise ModelNotFoundError(f"ONNX cache entry {entry} is unreadable after export; delete it and retry")
    return entry, manifest


def default_threads() -> int:
    """torch's intra-op thread count: under Ray it follows the actor's CPUs (OMP_NUM_THREADS,
    or the EmbedStage's ``torch.set_num_threads``), so both backends use the same cores.
    ONNX Runtime's own default (every physical core) would ignore the reservation."""
    import torch

    return max(1, int(torch.get_num_threads()))


class OnnxSentenceModel:
    """The subset of ``SentenceTransformer`` that :class:`TextEmbedder` uses, on ONNX Runtime.

    Args:
        source: The source model folder (its tokenizer is used as is).
        entry: The cache entry holding ``model.onnx`` and ``manifest.json``.
        manifest: The entry's manifest.
        threads: ONNX Runtime intra-op threads; None: :func:`default_threads`.
    """

    def __init__(self, source: Path, entry: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        ort = require_onnxruntime()
        from transformers import AutoTokenizer

        self.manifest = manifest
        self.entry = entry
        self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        self.max_seq_length = int(manifest["max_seq_length"])
        self.prompts: dict[str, str] = dict(manifest.get("prompts") or {})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(entry / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - the file passed its checksum: name it
            raise ModelNotFoundError(f"ONNX Runtime could not load {entry / MODEL_FILE}: {exc}; delete {entry} to rebuild") from exc
        self._prompt_lengths: dict[str, int] = {}

    @classmethod
    def load(cls, source: Path, cache_dir: str | None = None, threads: int | None = None) -> "OnnxSentenceModel":
        """Export (once) and open the int8 model for ``source``."""
        require_onnxruntime()
        entry, manifest = ensure_exported(source, cache_root(cache_dir))
        return cls(source, entry, manifest, threads)

    @property
    def max_seq_length(self) -> int:
        """Token limit (settable, like ``SentenceTransformer.max_seq_length``)."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self._max_seq_length = int(value)
        self.tokenizer.model_max_length = int(value)

    def get_embedding_dimension(self) -> int:
        """Embedding size."""
        return int(self.manifest["dim"])

    def _prompt_length(self, prompt: str) -> int:
        # As sentence-transformers: the prompt's tokens without a trailing special token.
        if prompt not in self._prompt_lengths:
            ids = self._tokenize([prompt])["input_ids"][0]
            n = len(ids) - (1 if int(ids[-1]) in set(self.tokenizer.all_special_ids) else 0)
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def _tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(texts, padding=True, truncation="longest_first", max_length=self.max_seq_length, return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}

    def encode(
        self,
        texts: Sequence[str],
        prompt: str | None = None,
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        **_: Any,
    ) -> np.ndarray:
        """Embed ``texts`` (``prompt`` prefixed), float32 ``(n, dim)``; extra ST kwargs ignored."""
        texts = [prompt + t for t in texts] if prompt else list(texts)
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        # Longest first, like sentence-transformers: batches of similar length pad less.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        skip = self._prompt_length(prompt) if prompt and not self.manifest["include_prompt"] else 0
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = self._tokenize([texts[i] for i in idx])
            hidden = self.session.run(None, {n: enc[n] for n in self.manifest["inputs"]})[0]
            mask = enc["attention_mask"].copy()
            if skip:
                mask[:, :skip] = 0  # right padding: the prompt is the first tokens
            out[idx] = self._pool(hidden, mask, normalize_embeddings)
        return out

    def _pool(self, hidden: np.ndarray, mask: np.ndarray, normalize: bool) -> np.ndarray:
        vectors = []
        m = mask[..., None].astype(np.float32)
        for mode in self.manifest["pooling"]:
            if mode == "cls":
                vectors.append(hidden[np.arange(len(hidden)), mask.argmax(axis=1)])
            elif mode == "max":
                vectors.append(np.where(m > 0, hidden, -np.inf).max(axis=1))
            else:  # mean, mean_sqrt_len_tokens
                count = np.clip(m.sum(axis=1), 1e-9, None)
                vectors.append((hidden * m).sum(axis=1) / (count if mode == "mean" else np.sqrt(count)))
        v = np.concatenate(vectors, axis=-1).astype(np.float32)
        if normalize or self.manifest["normalize"]:
            # torch.nn.functional.normalize: x / max(||x||, 1e-12)
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v
