"""Native CPU kernels for decode (native/moeinf_kernels.c): fused SwiGLU experts and matrix-vector
products with fp32 / bf16 / f16 weights, fp32 accumulation. build.py compiles and loads the
library; ops.py is the torch-facing API. When the library is unavailable, `available()` is False
and callers use torch.
"""

from moeinf.kernels.ops import (
    MAX_TOKENS,
    accepts,
    available,
    decode_threads,
    describe,
    expert_forward,
    keeps_half,
    linear,
    set_simd,
    try_expert_forward,
    try_linear,
    try_moe_forward,
)

__all__ = [
    "MAX_TOKENS",
    "accepts",
    "available",
    "decode_threads",
    "describe",
    "expert_forward",
    "keeps_half",
    "linear",
    "set_simd",
    "try_expert_forward",
    "try_linear",
    "try_moe_forward",
]
