"""Estimate what llama.cpp allocates for a model on one device.

The estimate follows llama.cpp as llama-cpp-python 0.3.36 drives it on the CPU with its
defaults: n_batch = n_ubatch = 512, f16 KV cache, flash attention off (the Llama default),
one sequence, and a full-size SWA cache: llama-cpp-python leaves swa_full at llama.cpp's
default, true, so Gemma 3's sliding-window layers get n_ctx cells like the others
(swa_full=False would give them pad(window + n_ubatch, 256) cells).

Measured on x86-64 (AVX2, AVX-512), MiB. "logged" sums the model, KV, output and compute
buffers llama.cpp reports with verbose=True; "RSS" is the growth of the process from
after `import llama_cpp` to after evaluating a prompt that fills the context:

    model                     n_ctx  weights        KV  compute  logged  estimate    RSS
    tiny llama 2x64 f16         512    0.35        0.12    5.76     6.23     12.37   13.4
    synthetic 16x1024 f32      2048  358.72       32      79.01   469.73    506.87  505.7
    same, n_ff 2048            2048  550.72       32      79.01   661.73    698.87  697.8
    same, Q4_0 blocks          2048   79.93+76.50 32      79.01   267.44    304.57  303.6
    Gemma 3 270M Q4_K_M        2048  235.16+12.66 36     515.50   799.32    855.32  378.5
    Gemma 3 270M Q4_K_M        4096  235.16+12.66 72     515.50   835.32    899.32  458.8

What the logs do not show: (1) the CPU backend copies Q4_0 and Q4_K matrices into a
repacked layout (the "+" above), so a Q4_0 model takes about twice its file size; (2) the
CPU backend's work buffer holds the attention scores once more as f16 (32 MiB for the
synthetic models); (3) the vocabulary tables take about 170 bytes per token (44 MiB for
Gemma). And one thing the logs overstate: the compute buffer is sized for logits of all
n_ubatch tokens (512 MiB for Gemma's 262k vocabulary) but llama-cpp-python asks for one
row, so that part stays untouched and Gemma's RSS is half the logged sum. The estimate
keeps it: it is what llama.cpp reserves, and a batch asking for every row touches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsmdifd.placement.gguf_model import ModelShape

MIB = 1 << 20

# llama.cpp rounds the context up to a whole number of 256-cell pages (llama_context, and
# the KV cache is allocated for the rounded size).
CTX_PAD = 256
# f32 activations, in units of one n_embd-wide row per token, that stay live beside the
# attention scores at the attention peak of the compute graph (layer input, residual,
# Q, K, V, attention output). Fitted to the logged compute buffers: 5.5 (16x1024) to 6 (2x64).
ATTENTION_ROWS = 6
# llama.cpp's memory outside the buffers it logs and outside the vocabulary: contexts,
# graph metadata, thread pool, batch and sampler arrays. Measured 3.7-5.7 MiB of RSS;
# rounded up, as an estimate that plans memory had better be.
# The host process itself (Python, numpy, the llama.cpp shared libraries: about 45 MiB
# of RSS) is not part of any estimate.
RUNTIME_OVERHEAD = 6 * MIB
# Vocabulary tables (token strings, token-to-id map, merge tables): measured 166 bytes per
# token with Gemma 3's 262,144 tokens (44 MiB); rounded up.
VOCAB_BYTES_PER_TOKEN = 176


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes llama.cpp allocates on one device, by purpose."""

    weights: int
    kv_cache: int
    compute: int
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.margin


def estimate_memory(
    shape: ModelShape,
    n_ctx: int,
    n_ubatch: int = 512,
    n_layers: int | None = None,
    computes_logits: bool = True,
    *,
    repacks: bool = True,
) -> MemoryEstimate:
    """Estimate the memory of running `shape` with a context of `n_ctx` tokens (0: the trained one).

    With `n_layers` set, the figure is for a device holding that many layers (the largest
    ones) and, if `computes_logits`, the output layer; the token embedding, which stays on
    the root, is then not included. `repacks` is false for RPC servers, which keep the
    weights as they are.
    """
    if n_ctx < 0 or n_ubatch < 1:
        raise ValueError("n_ctx must be >= 0 and n_ubatch >= 1")
    layers = shape.n_layer if n_layers is None else n_layers
    if not 0 <= layers <= shape.n_layer:
        raise ValueError(f"n_layers must be between 0 and {shape.n_layer}")
    n_ctx = n_ctx or shape.n_ctx_train
    cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    tokens = min(n_ubatch, n_ctx)  # llama.cpp caps the batch at the context size

    if n_layers is None:
        weights = shape.weight_bytes
    else:
        weights = sum(sorted(shape.layer_bytes)[shape.n_layer - layers :])
        weights += shape.output_bytes if computes_logits else 0
    if repacks:
        weights += shape.repack_bytes * layers // shape.n_layer
    return MemoryEstimate(
        weights=weights,
        kv_cache=layers * cells * shape.kv_bytes_per_token_per_layer,
        compute=_compute_bytes(shape, cells, tokens, layers > 0, computes_logits),
        margin=RUNTIME_OVERHEAD + VOCAB_BYTES_PER_TOKEN * shape.n_vocab,
    )


def _compute_bytes(
    shape: ModelShape, cells: int, tokens: int, has_layers: bool, computes_logits: bool
) -> int:
    """The compute buffer (the peak of the worst-case graph) plus the CPU backend's work buffer."""
    f32 = 4
    peak = work = 0
    if has_layers:
        # Without flash attention the scores are an f32 [cells, tokens, n_head] tensor, next
        # to one f32 [cells, tokens] mask per attention kind (SWA models have two).
        scores = shape.n_head * cells * tokens * f32
        masks = (2 if shape.sliding_window else 1) * cells * tokens * f32
        rows = ATTENTION_ROWS * max(shape.n_embd, shape.n_head * shape.key_length) * tokens * f32
        ffn = (2 * shape.n_ff + 2 * shape.n_embd) * tokens * f32
        peak = max(scores + masks + rows, ffn)
        # The softmaxed scores are converted to f16 to be multiplied by the f16 V cache.
        work = shape.n_head * cells * tokens * 2
    if computes_logits:
        # Logits for every token of the ubatch, beside the final norm's input and output,
        # plus the output buffer for the one row llama-cpp-python asks for.
        peak = max(peak, (shape.n_vocab + 2 * shape.n_embd) * tokens * f32)
        peak += shape.n_vocab * f32
    return peak + work
