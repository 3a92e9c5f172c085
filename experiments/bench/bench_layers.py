"""Layer choices of diffjax's U-Net against the textbook forms, forward and forward+backward.

    python experiments/bench/bench_layers.py

- GroupNorm: diffjax's `GroupNorm` (sums over positions, then over each group's channels on the
  small [N, C] array) against flax's `nn.GroupNorm` (one reduction over each group's positions and
  channels), on activations of the two benchmark networks.
- Attention: diffjax's `attention` (the softmax normalised after the value product) against the
  weights normalised first, on the benchmark networks' attention shapes.
Each row is compiled with diffjax's compiler options; times are medians of --reps calls, taken
alternately so that machine noise hits both columns alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import steps
from diffjax.models.layers import GroupNorm, attention

# (what, shape): activations normalised in the ddpm-cifar (batch 16) and small (batch 64) networks.
NORM_SHAPES = [
    ("ddpm-cifar 32x32x128", (16, 32, 32, 128)),
    ("ddpm-cifar 32x32x384", (16, 32, 32, 384)),
    ("ddpm-cifar 16x16x256", (16, 16, 16, 256)),
    ("small 16x16x32", (64, 16, 16, 32)),
    ("small 16x16x96", (64, 16, 16, 96)),
    ("small 8x8x64", (64, 8, 8, 64)),
]
# (what, [B·heads, L, d]): one head of 256 at 16x16 (ddpm-cifar), 8 heads of 8 at 8x8 (small).
ATTN_SHAPES = [("ddpm-cifar 16x16, 1 head", (16, 256, 256)), ("small 8x8, 8 heads", (512, 64, 8))]


def weights_first(q, k, v):
    """The textbook order: softmax weights [N, L, L] normalised, then the value product."""
    logits = jnp.einsum("nqd,nkd->nqk", q * q.shape[-1] ** -0.5, k)
    return jnp.einsum("nqk,nkd->nqd", jax.nn.softmax(logits, axis=-1), v)


def _fwd_bwd(f, n_args):
    """Compiled (args..., cotangent) -> f's output and its vector-Jacobian product with respect to
    all n_args arguments: one forward and one backward pass."""

    def run(*args):
        out, vjp = jax.vjp(f, *args[:n_args])
        return out, vjp(args[n_args])

    return jax.jit(run, compiler_options=steps.compiler_options())


def _pair(fa, fb, args, reps):
    """Median seconds of fa(*args) and fb(*args), called alternately after warm-up."""
    for f in (fa, fb):
        jax.block_until_ready(f(*args))
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    opts = steps.compiler_options()

    print(
        "| GroupNorm (32 groups) | flax fwd ms | diffjax fwd ms | speed-up | flax fwd+bwd ms | "
        "diffjax fwd+bwd ms | speed-up |\n|" + "---|" * 7
    )
    for what, shape in NORM_SHAPES:
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        c = shape[-1]
        params = {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}
        mods = nn.GroupNorm(32, epsilon=1e-6), GroupNorm(32, 1e-6)
        fwd = [
            jax.jit(lambda p, x, m=m: m.apply({"params": p}, x), compiler_options=opts)
            for m in mods
        ]
        both = [_fwd_bwd(lambda p, x, m=m: m.apply({"params": p}, x), 2) for m in mods]
        f0, f1 = _pair(*fwd, (params, x), args.reps)
        b0, b1 = _pair(*both, (params, x, x[..., ::-1]), args.reps)
        print(
            f"| {what} | {f0 * 1e3:.2f} | {f1 * 1e3:.2f} | {f0 / f1:.2f}x | {b0 * 1e3:.2f} | "
            f"{b1 * 1e3:.2f} | {b0 / b1:.2f}x |",
            flush=True,
        )

    print(
        "\n| attention | weights first fwd ms | diffjax fwd ms | speed-up | weights first "
        "fwd+bwd ms | diffjax fwd+bwd ms | speed-up |\n|" + "---|" * 7
    )
    for what, shape in ATTN_SHAPES:
        q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
        fwd = [jax.jit(f, compiler_options=opts) for f in (weights_first, attention)]
        both = [_fwd_bwd(f, 3) for f in (weights_first, attention)]
        f0, f1 = _pair(*fwd, (q, k, v), args.reps)
        b0, b1 = _pair(*both, (q, k, v, v[..., ::-1] if shape[-1] > 1 else v), args.reps)
        print(
            f"| {what} | {f0 * 1e3:.2f} | {f1 * 1e3:.2f} | {f0 / f1:.2f}x | {b0 * 1e3:.2f} | "
            f"{b1 * 1e3:.2f} | {b0 / b1:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
