"""The one compiled part: the relays' TLS and copy loop (hsmdifd/engine/relay/_native.c).

Everything else is in pyproject.toml. It links the system's OpenSSL (libssl-dev),
the same library Python's own ssl module uses.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hsmdifd.engine.relay._native",
            sources=["hsmdifd/engine/relay/_native.c"],
            libraries=["ssl", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
