"""The bounds of a request, checked by hsmdifctl before sending and by hsmdifd on arrival.

One figure for each, written once: the CLI refuses early with the option's name, and the
daemon refuses whatever reaches it otherwise (another client, an older CLI) with the
same figure. This module imports nothing from either side.
"""

from __future__ import annotations

# Tokens one answer may generate (GenerateRequest.max_tokens; the context bounds it too).
MAX_TOKENS = 1 << 20
# Context length a load or plan may ask for (--max-seq-len). llama.cpp keeps it in 32 bits;
# memory refuses far smaller figures on any device there is, with its own sentence.
MIN_CONTEXT = 16
MAX_CONTEXT = 1 << 24
# Threads for the engine. The daemon also refuses more than the device's CPUs.
MAX_THREADS = 1024
# Sampling temperature.
MIN_TEMPERATURE = 0.0
MAX_TEMPERATURE = 5.0
# The sampler's seed is 32 bits.
MAX_SEED = (1 << 32) - 1
# `plan --num-parameters`: a hypothetical model between 100 million and 100 trillion.
MIN_PARAMETERS = 1e8
MAX_PARAMETERS = 1e14
# Bytes of a model path (PATH_MAX on Linux) and of a device name, address or node id.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 4096
# Devices one `devices --priority` may name.
MAX_DEVICES = 1024
# Bytes of one prompt, all chat messages together. A fixed bound for now: the context
# (at most MAX_CONTEXT tokens of a few bytes each) is what it stands for, and tokenizing
# a megabyte takes llama.cpp about a second. The daemon may be given a smaller one.
MAX_PROMPT_BYTES = 1 << 20
# Messages one chat request may carry.
MAX_MESSAGES = 10_000
# Characters of user input echoed back in a message.
ECHO_CHARS = 80


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` for echoing in a message: at most `limit` characters, then "…".

    Undecodable bytes (which Python's argv carries as lone surrogates) are shown as
    \\xNN escapes, so the result always prints.
    """
    if len(text) > limit:
        text = text[:limit] + "…"
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8; lone surrogates count as the bytes they stand for."""
    return len(text.encode("utf-8", "surrogatepass"))


def is_utf8(text: str) -> bool:
    """Whether `text` can be sent as a protobuf string (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def quoted(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` shortened and in quotes, for a message (undecodable bytes as \\xNN)."""
    return f"'{shorten(text, limit)}'"
