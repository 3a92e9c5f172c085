"""The U-Net: parameter counts of the reference configurations, shapes, conditioning hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.cond import Cond
from diffjax.models.layers import timestep_embedding
from diffjax.models.unet import UNet


def n_params(model, shape, **kw):
    variables = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32), **kw
        )
    )
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def test_ddpm_cifar10_parameter_count():
    # DDPM's CIFAR-10 network; diffusers' UNet2DModel of the same design has 35,746,307.
    assert n_params(UNet(), (1, 32, 32, 3)) == 35_746_307


def test_small_benchmark_network_parameter_count():
    model = UNet(
        base_channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_dim=8,
        dropout=0.0,
    )
    assert n_params(model, (1, 16, 16, 1)) == 1_112_801  # diffusers' count for this design


def test_timestep_embedding_formula():
    t = jnp.array([0, 7, 999])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = 10000.0 ** (-np.arange(4) / 3)
    expected = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], 1)
    np.testing.assert_allclose(emb, expected, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return dict(
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_groups=8,
        dropout=0.1,
    )


def test_shapes_conditioning_and_dropout(tiny):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([3, 500])
    model = UNet(**tiny, num_classes=10, out_channels=6)
    params = model.init(
        jax.random.key(1), x, t, Cond(label=jnp.array([1, 10]), concat=jnp.zeros((2, 8, 8, 2)))
    )["params"]
    out = model.apply(
        {"params": params}, x, t, Cond(label=jnp.array([1, 10]), concat=jnp.ones((2, 8, 8, 2)))
    )
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    # Dropout is active only with train=True, and then depends on the dropout key.
    c = Cond(label=jnp.array([1, 2]), concat=jnp.ones((2, 8, 8, 2)))
    ev = [model.apply({"params": params}, x, t, c) for _ in range(2)]
    np.testing.assert_array_equal(ev[0], ev[1])
    with pytest.raises(ValueError, match="num_classes"):
        model.apply({"params": params}, x, t, Cond(concat=jnp.ones((2, 8, 8, 2))))


def test_bfloat16_compute_keeps_float32_params(tiny):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 500])
    model = UNet(**tiny, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(1), x, t)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out32 = UNet(**tiny).apply({"params": params}, x, t)
    out16 = model.apply({"params": params}, x, t)
    assert out16.dtype == jnp.float32
    assert np.isfinite(np.asarray(out16)).all()
    np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()) + 1e-3)


@pytest.mark.parametrize("head_dim", [None, 4])
def test_attention_block_matches_numpy_reference(head_dim):
    """GroupNorm → multi-head softmax attention → projection, written out in float64 NumPy."""
    from diffjax.models.layers import AttentionBlock

    b, s, c, groups = 2, 4, 8, 4
    x = np.random.default_rng(0).standard_normal((b, s, s, c)).astype(np.float32)
    block = AttentionBlock(head_dim=head_dim, num_groups=groups)
    params = block.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(  # the output projection starts at ~0: give it real values
        lambda p: np.random.default_rng(1).standard_normal(p.shape).astype(np.float32), params
    )
    out = np.asarray(block.apply({"params": params}, x), np.float64)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    g = x.astype(np.float64).reshape(b, s * s, groups, c // groups)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    h = g.reshape(b, s * s, c) * p["GroupNorm_0"]["scale"] + p["GroupNorm_0"]["bias"]
    heads = 1 if head_dim is None else c // head_dim
    d = c // heads
    qkv = np.einsum("blc,cthd->btlhd", h, p["qkv"]["kernel"]) + p["qkv"]["bias"][None, :, None]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, L, heads, d]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    o = np.einsum("bqhd,hdc->bqc", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, x + o.reshape(b, s, s, c), rtol=1e-4, atol=1e-4)


def test_group_norm_matches_numpy_and_flax_gradients():
    """diffjax's GroupNorm (sums over positions, then over each group's channels) against the
    definition in float64 NumPy, and its gradients against flax's independent nn.GroupNorm."""
    import flax.linen as nn

    from diffjax.models.layers import GroupNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 4, 4, 12)) * 3 + 5).astype(np.float32)  # offset: E[x²] - E[x]²
    params = {
        "scale": rng.standard_normal(12).astype(np.float32),
        "bias": rng.standard_normal(12).astype(np.float32),
    }
    out = GroupNorm(4, 1e-6).apply({"params": params}, x)
    g = x.astype(np.float64).reshape(2, 16, 4, 3)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    np.testing.assert_allclose(
        out, g.reshape(x.shape) * params["scale"] + params["bias"], rtol=1e-4, atol=1e-4
    )

    r = rng.standard_normal(x.shape).astype(np.float32)
    grad = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x) * r), argnums=(0, 1))(
        params, x
    )
    ours, ref = grad(GroupNorm(4, 1e-6)), grad(nn.GroupNorm(4, epsilon=1e-6))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not divisible"):
        GroupNorm(5).init(jax.random.key(0), x)


def _fold_numpy(x, p):
    """Independent space-to-depth: channel index (i * p + j) * C + c holds pixel (p·y+i, p·x+j)."""
    b, h, w, c = x.shape
    out = np.zeros((b, h // p, w // p, p * p * c), x.dtype)
    for i in range(p):
        for j in range(p):
            out[..., (i * p + j) * c : (i * p + j + 1) * c] = x[:, i::p, j::p, :]
    return out


def test_patch_size_is_a_unet_on_folded_patches(tiny):
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
    t = jnp.array([3, 500])
    patched = UNet(**tiny, patch_size=2)  # levels at 8 and 4: attention at 4 as in `tiny`
    params = patched.init(jax.random.key(1), x, t)["params"]
    assert params["Conv_0"]["kernel"].shape[-2] == 12  # 2x2x3 folded channels in
    # The final convolution starts at zero: give it weights so the comparison means something.
    params = jax.tree.map(lambda a: a + 0.01 * jnp.cos(jnp.arange(a.size)).reshape(a.shape), params)
    out = np.asarray(patched.apply({"params": params}, x, t))
    plain = UNet(**tiny, out_channels=12)  # the same parameters, on the folded image
    folded = np.asarray(plain.apply({"params": params}, _fold_numpy(x, 2), t))
    assert out.shape == x.shape
    np.testing.assert_allclose(_fold_numpy(out, 2), folded, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size \\* 2\\^\\(levels-1\\) = 4"):
        patched.init(jax.random.key(1), x[:, :6, :6], t)
