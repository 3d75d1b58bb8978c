"""Tiny GGUF models for llama.cpp tests, written locally (no model hub is needed).

A llama-architecture model with random weights and an SPM vocabulary of byte-fallback
tokens: the llama.cpp server loads it, serves completions (noise), and exits cleanly.
Grow ``hidden``/``layers`` when a test needs real memory to move.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_gguf(
    path: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ff: int | None = None,
    seed: int = 0,
    kv_heads: int | None = None,
    weight_type: str = "F32",
    context: int = 256,
    arch: str = "llama",
    sliding_window: int = 0,
) -> Path:
    """Write the model to ``path`` once (atomically); reuse it after.

    ``kv_heads`` below ``heads`` makes it grouped-query attention; ``weight_type`` (``F32``,
    ``F16``, ``Q8_0``, ...: a ``gguf.GGMLQuantizationType`` name) is the matrices' type
    (norms stay F32); ``context`` the trained context; ``arch`` and ``sliding_window`` write
    another architecture's keys (llama.cpp may not load those: for estimate tests)."""
    import gguf
    import numpy as np

    path = Path(path)
    if path.exists():
        return path
    ff = ff or hidden * 2
    kv_heads = kv_heads or heads
    head_dim = hidden // heads
    qtype = gguf.GGMLQuantizationType[weight_type.upper()]
    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    for word in ("\u2581", "\u2581the", "\u2581a", "e", "t", "o", "n", "s"):
        tokens.append(word.encode())
        types.append(gguf.TokenType.NORMAL)
    vocab = len(tokens)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name("modelmora tiny llama (random weights)")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if sliding_window:
        writer.add_sliding_window(sliding_window)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(
        qtype.name, f"MOSTLY_{qtype.name}"
    )
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def matrix(name: str, *shape: int) -> None:
        data = gguf.quants.quantize(w(*shape), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)  # quantised: a byte shape, converted back

    writer.add_tensor("token_embd.weight", w(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    matrix("output.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", ff, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ff, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


__all__ = ["make_tiny_gguf"]
