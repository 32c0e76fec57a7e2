"""The architectures llama.cpp knows, and the tensor layout of those whose layout is checked.

llama.cpp refuses a model of an architecture it does not know, and one whose tensors are
missing or not in the shapes its metadata implies; `gguf_model` refuses both before a
load, with a sentence.
"""

from __future__ import annotations

from collections.abc import Callable

from hsmdifd.placement.gguf_header import Tensor

# The architectures the llama.cpp built into llama-cpp-python 0.3.36 knows (LLM_ARCH_NAMES
# in src/llama-arch.cpp); it refuses any other with "unknown model architecture".
_ARCHITECTURE_NAMES = """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert
    modern-bert nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom
    stablelm qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35
    qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm
    minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2
    mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2
    olmoe muse-glimmer openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4
    chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h
    nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe
    granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe
    hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream
    smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2
    minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2
    step35 spark2_5 llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum
    nanbeige qwen3tts pockettts
"""
LLAMA_ARCHITECTURES = frozenset(_ARCHITECTURE_NAMES.split())


# The tensors of architectures whose layout is checked, by name (in a layer: after
# "blk.N."), as ggml shapes over E (embedding), V (vocabulary), K (head width), and per
# layer Q (query width), KV (key width), VV (value width), O (attention output) and F
# (feed-forward width); "?" marks an optional tensor.
_LLAMA_LAYER = {
    "attn_norm.weight": ("E",),
    "attn_q.weight": ("E", "Q"),
    "attn_k.weight": ("E", "KV"),
    "attn_v.weight": ("E", "VV"),
    "attn_output.weight": ("O", "E"),
    "ffn_norm.weight": ("E",),
    "ffn_gate.weight": ("E", "F"),
    "ffn_up.weight": ("E", "F"),
    "ffn_down.weight": ("F", "E"),
}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER,
    "attn_q_norm.weight": ("K",),
    "attn_k_norm.weight": ("K",),
    "post_attention_norm.weight": ("E",),
    "post_ffw_norm.weight": ("E",),
}
_GLOBAL = {
    "token_embd.weight": ("E", "V"),
    "output_norm.weight": ("E",),
    "output.weight?": ("E", "V"),
}
_CHECKED = {"llama": _LLAMA_LAYER, "gemma3": _GEMMA3_LAYER}
# A llama model with experts has these in place of ffn_gate, ffn_up and ffn_down.
_LLAMA_DENSE_FFN = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def check_tensors(
    refuse: Callable[[str], Exception],
    arch: str,
    *,
    tensors: list[Tensor],
    n_layer: int,
    dims: dict[str, int],
    heads: list[int],
    heads_kv: list[int],
    n_ffs: list[int],
    value_length: int,
) -> None:
    """The tensors llama.cpp needs for `arch`, in the shapes its metadata implies."""
    layer = _CHECKED.get(arch)
    if layer is None:
        return
    by_name = {t.name: t.dims for t in tensors}
    has_experts = any(".ffn_gate_inp." in name for name in by_name)

    def check(name: str, symbols: tuple[str, ...], values: dict[str, int], optional: bool) -> None:
        found = by_name.get(name)
        if found is None:
            if optional:
                return
            raise refuse(f"it lacks the tensor {name!r}, which a {arch} model needs")
        expected = tuple(values[s] for s in symbols)
        if found != expected:
            raise refuse(
                f"its tensor {name!r} has the shape {list(found)} where its metadata implies "
                f"{list(expected)}"
            )

    for name, symbols in _GLOBAL.items():
        check(name.rstrip("?"), symbols, dims, name.endswith("?"))
    for il in range(n_layer):
        values = {
            **dims,
            "Q": heads[il] * dims["K"],
            "KV": heads_kv[il] * dims["K"],
            "VV": heads_kv[il] * value_length,
            "O": heads[il] * value_length,
            "F": n_ffs[il],
        }
        for name, symbols in layer.items():
            optional = has_experts and name in _LLAMA_DENSE_FFN
            check(f"blk.{il}.{name}", symbols, values, optional)
