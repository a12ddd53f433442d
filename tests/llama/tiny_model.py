"""A tiny llama model in GGUF, written from fixed random weights: 2 layers, 4 heads, 64-dim embeddings and a
SentencePiece vocabulary of 260 tokens (3 control tokens, the 256 byte tokens, and the word boundary). What it says is
gibberish; the runtime that serves it speaks the real protocol. About 200 KB, written in milliseconds."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

EMBEDDING = 64
LAYERS = 2
HEADS = 4
FEED_FORWARD = 128
CONTEXT = 512
UNK, BOS, EOS = 0, 1, 2


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a byte-fallback SentencePiece vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL]
    scores = [0.0] * len(tokens)
    return tokens, scores, [int(t) for t in types]


def write(path: Path, seed: int = 7) -> Path:
    """Write the model to `path`; the same seed gives the same file."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()

    def matrix(rows: int, columns: int) -> np.ndarray:
        # (out, in), as a linear layer's weight; stored as float16 to keep the file small.
        return (rng.standard_normal((rows, columns)) * 0.05).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(EMBEDDING, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBEDDING)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(EMBEDDING // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)

    writer.add_tensor("token_embd.weight", matrix(len(tokens), EMBEDDING))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", matrix(EMBEDDING, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(f"{block}.ffn_down.weight", matrix(EMBEDDING, FEED_FORWARD))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", matrix(len(tokens), EMBEDDING))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
