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
) -> Path:
    """Write the model to ``path`` once (atomically); reuse it after."""
    import gguf
    import numpy as np

    path = Path(path)
    if path.exists():
        return path
    ff = ff or hidden * 2
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
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("modelmora tiny llama (random weights)")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", w(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", w(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(ff, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(ff, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(hidden, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


__all__ = ["make_tiny_gguf"]
