"""Write small random-weight GGUF models (and broken files) for the tests.

`write_tiny_llama` makes a llama-architecture model with a SentencePiece-style vocabulary
(byte fallback, so any text tokenizes) that llama.cpp loads and runs in milliseconds.
Tensors are generated and written one at a time, so a model of several hundred MB
needs only a few MB of memory to write.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Control tokens first, then the 256 byte tokens, then the chat markers, then text pieces.
_CONTROL = ("<unk>", "<s>", "</s>")
_CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_WORDS = """
the of and to in is that it was for on are as with his they at be this from have or by
one had not but what all were when we there can an your which their said if do will each
about how up out them then she many some so these would other into has more her two like
him see time could no make than first been its who now people my made over did down only
way find use may water long little very after words called just where most know hello
world model token answer question device memory layer
"""
_SPACE = "\u2581"  # SentencePiece's word-boundary marker


def _text_pieces() -> list[str]:
    """Single characters plus every prefix of each word, with and without the space marker."""
    pieces = dict.fromkeys([_SPACE, *string.ascii_letters, *string.digits, *string.punctuation])
    for word in _WORDS.split():
        for text in (word, _SPACE + word):
            for end in range(2, len(text) + 1):
                pieces[text[:end]] = None
    return list(pieces)


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = list(_CONTROL)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += _CHAT_MARKERS
    types += [gguf.TokenType.CONTROL] * len(_CHAT_MARKERS)
    n_special = len(tokens)
    pieces = _text_pieces()
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # The SentencePiece tokenizer merges the highest-scoring pair first: prefer long pieces.
    scores = [0.0] * n_special + [len(piece) - index / 1e4 for index, piece in enumerate(pieces)]
    return tokens, scores, [int(t) for t in types]


def _tensor_shapes(
    *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int, tied: bool
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of each tensor, in file order; numpy shapes are ggml's reversed."""
    head_dim = n_embd // n_head
    yield "token_embd.weight", (n_vocab, n_embd)
    for i in range(n_layer):
        yield f"blk.{i}.attn_norm.weight", (n_embd,)
        yield f"blk.{i}.attn_q.weight", (n_head * head_dim, n_embd)
        yield f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd)
        yield f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd)
        yield f"blk.{i}.attn_output.weight", (n_embd, n_head * head_dim)
        yield f"blk.{i}.ffn_norm.weight", (n_embd,)
        yield f"blk.{i}.ffn_gate.weight", (n_ff, n_embd)
        yield f"blk.{i}.ffn_up.weight", (n_ff, n_embd)
        yield f"blk.{i}.ffn_down.weight", (n_embd, n_ff)
    yield "output_norm.weight", (n_embd,)
    if not tied:
        yield "output.weight", (n_vocab, n_embd)


N_VOCAB = len(_vocabulary()[0])


def write_tiny_llama(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    dtype: str = "f16",
    seed: int = 0,
    chat_template: str | None = DEFAULT_TEMPLATE,
    tied_output: bool = False,
    architecture: str = "llama",
) -> Path:
    """Write a random-weight llama model to `path`; the same arguments give the same bytes.

    `architecture` names another one in the header, over the same llama tensors (for a
    file whose header reads well but which llama.cpp refuses).

    Matrices are stored as `dtype` ("f16" or "f32"), norm weights always as f32 (as the
    converters do). With `tied_output` there is no output.weight and llama.cpp reuses
    the token embedding for the logits.
    """
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be 'f16' or 'f32', not {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    matrix_dtype = np.dtype(np.float16 if dtype == "f16" else np.float32)
    tokens, scores, token_types = _vocabulary()

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"tiny-llama-{n_layer}x{n_embd}-{dtype}")
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    shapes = list(
        _tensor_shapes(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=n_ff,
            n_vocab=len(tokens),
            tied=tied_output,
        )
    )
    for name, shape in shapes:
        item = np.dtype(np.float32) if len(shape) == 1 else matrix_dtype
        writer.add_tensor_info(name, shape, item, int(np.prod(shape)) * item.itemsize)

    rng = np.random.default_rng(seed)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, shape in shapes:
            if len(shape) == 1:
                writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            else:
                # Small weights keep the activations finite through every layer.
                weights = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
                writer.write_tensor_data(weights.astype(matrix_dtype, copy=False))
    finally:
        writer.close()
    return path


def write_garbage(path: Path, size: int, seed: int = 0) -> Path:
    """Write `size` random bytes to `path`."""
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def write_truncated(src: Path, dst: Path, keep_fraction: float) -> Path:
    """Copy the first `keep_fraction` of `src` to `dst`, as an interrupted download leaves it."""
    remaining = int(src.stat().st_size * keep_fraction)
    with src.open("rb") as fin, dst.open("wb") as fout:
        while remaining > 0:
            chunk = fin.read(min(remaining, 1 << 20))
            fout.write(chunk)
            remaining -= len(chunk)
    return dst
