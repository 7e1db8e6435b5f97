"""Performance-critical operations with backend-specific implementations.

This package owns layers whose stock XLA lowering is slow on some backend, each with a fallback
to plain XLA where XLA is already fast (chosen at trace time).

Synopsis::

    from gen_jax.ops import FastConv, conv2d
    layer = FastConv(64, (3, 3), padding="SAME", use_bias=False)   # nn.Conv drop-in
"""
from gen_jax.ops.conv import (CONV_IMPLS, FastConv, conv2d, conv2d_xla, normalize_padding,
                              use_custom_vjp)

__all__ = ["CONV_IMPLS", "FastConv", "conv2d", "conv2d_xla", "normalize_padding", "use_custom_vjp"]
