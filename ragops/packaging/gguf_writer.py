"""Write a llama-family transformers model (base, or base with a merged LoRA) as a GGUF file.

Why the file is written here rather than by llama.cpp's ``convert_hf_to_gguf.py``: that script
is not shipped on PyPI (neither in ``gguf`` nor in ``llama-cpp-python``), and the model to
write is often not a folder on disk at all but torch weights in memory — the base with a LoRA
adapter merged into it. The ``gguf`` package (the writer and tensor-name tables that script
uses) is enough for the llama architecture: name the tensors, permute the q/k projections into
llama.cpp's rotary layout, encode each tensor (:mod:`ragops.packaging.quantize`), and write the
hyper-parameters and the tokenizer as GGUF metadata.

Metadata comes from one of two places:

* the source GGUF, when the base was one (the packaged SmolLM2): every key/value is copied but
  the architecture, the file type and the ``GGUF.*`` header fields, so its tokenizer, chat
  template and names carry over exactly;
* the HF folder otherwise: llama hyper-parameters from ``config.json`` and a GPT-2-style
  byte-level BPE tokenizer from ``tokenizer.json`` (tokens, types, merges, special ids, chat
  template), as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ragops.errors import InputError
from ragops.packaging.quantize import encode_tensor, file_type

#: ``config.model_type`` values this writer is tested with (llama.cpp's LLAMA architecture).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama",)
#: Source GGUF keys not copied: the writer sets the architecture and the file type itself.
_SKIPPED_KEYS = ("general.architecture", "general.file_type")

ProgressFn = Callable[[int, int], None]


def check_architecture(config: Any) -> None:
    """Refuse models the writer cannot convert faithfully.

    Raises:
        InputError: not a llama-family model, or one with rope scaling the writer does not write.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"cannot package a '{model_type}' model as GGUF: the packager writes llama-family models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}) only"
        )
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise InputError(f"cannot package a model with '{rope['rope_type']}' rope scaling as GGUF (only plain RoPE)")


def _rope_parameters(config: Any) -> dict[str, Any]:
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x had rope_theta / rope_scaling.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def permute_for_rope(x: Any, n_head: int) -> Any:
    """Reorder a q/k projection's rows from HF's rotate-half layout to llama.cpp's interleaved one.

    HF llama applies RoPE to the two halves of each head; llama.cpp (like the original Meta
    weights) to adjacent pairs. transformers' GGUF loader applies the inverse on reading.
    """
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_gguf(
    model: Any,
    out: Path,
    *,
    quant: str,
    name: str,
    tokenizer_dir: Path | None = None,
    source_gguf: Path | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Write ``model`` to the GGUF file ``out``.

    Args:
        model: A transformers llama causal LM in float32 (adapters already merged).
        out: The file to write.
        quant: ``f16`` or ``q8_0`` (``q4_k_m`` is requantized from f16 by llama.cpp afterwards).
        name: ``general.name`` when the metadata is built from the config.
        tokenizer_dir: The HF folder with ``tokenizer.json`` (needed without ``source_gguf``).
        source_gguf: A GGUF file whose metadata (tokenizer included) is copied.
        progress: Called with ``(tensors done, tensors total)``.

    Returns:
        The number of tensors written.

    Raises:
        InputError: an unsupported architecture or tokenizer.
    """
    import gguf

    config = model.config
    check_architecture(config)
    writer = gguf.GGUFWriter(str(out), "llama")
    try:
        if source_gguf is not None:
            _copy_metadata(writer, source_gguf)
        else:
            if tokenizer_dir is None:
                raise InputError("packaging a model without a source GGUF needs its tokenizer folder")
            _add_hparams(writer, config, name)
            _add_tokenizer(writer, tokenizer_dir, config.vocab_size)
        writer.add_file_type(file_type(quant))
        n = _add_tensors(writer, model, quant, progress)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return n


def _add_tensors(writer: Any, model: Any, quant: str, progress: ProgressFn | None) -> int:
    import gguf

    config = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v for k, v in model.state_dict().items() if not (tied and k.startswith("lm_head."))}
    # llama.cpp reads a tied output from token_embd when output.weight is absent (SmolLM2's GGUF
    # has none); writing both would store the largest matrix twice.
    total = len(state)
    for i, (hf_name, tensor) in enumerate(state.items(), start=1):
        gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"cannot map tensor '{hf_name}' to a GGUF llama tensor name")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_for_rope(data, config.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_for_rope(data, config.num_key_value_heads)
        encoded, raw_dtype = encode_tensor(data, quant)
        if raw_dtype is None:
            writer.add_tensor(gguf_name, encoded)
        else:
            writer.add_tensor(gguf_name, encoded, raw_shape=encoded.shape, raw_dtype=raw_dtype)
        if progress is not None:
            progress(i, total)
    return total


def _copy_metadata(writer: Any, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in _SKIPPED_KEYS:
            continue
        sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)


def _add_hparams(writer: Any, config: Any, name: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # llama.cpp assumes hidden/heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the tokenizer's pre-tokenization regex."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex split, then bytes to unicode (llama.cpp spells it "gpt-2")
    raise InputError(
        f"cannot package this tokenizer as GGUF: pre-tokenizer {json.dumps(pre)[:120]} is not the GPT-2 "
        "byte-level one (package a GGUF-based model instead, e.g. smollm2-135m-instruct)"
    )


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """A GPT-2-style BPE vocabulary, the way llama.cpp's ``convert_hf_to_gguf.py`` writes one."""
    import gguf
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder}: no tokenizer.json (a byte-level BPE tokenizer is needed to package as GGUF)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise InputError(f"{path}: only byte-level BPE tokenizers can be packaged as GGUF (found {model.get('type')})")
    pre = _bpe_pre_tokenizer(tj)
    tok = AutoTokenizer.from_pretrained(str(folder))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:  # the embedding has rows the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, bos/eos/pad ids, add_bos/eos flags and the chat template (tokenizer_config.json or
    # chat_template.jinja) are read by gguf's SpecialVocab, the same code the converter uses.
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
