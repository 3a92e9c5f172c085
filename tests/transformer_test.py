"""Cross-attention and the Stable Diffusion transformer block against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from diffjax.cond import Cond
from diffjax.models.transformer import Attention, FeedForward, SpatialTransformer
from diffjax.models.unet import UNet

RNG = np.random.default_rng(0)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def ref_attention(p, x, context, mask, heads):
    b, n, _ = x.shape
    split = lambda a: a.reshape(b, a.shape[1], heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (
        split(y @ p[f"to_{w}"]["kernel"]) for w, y in (("q", x), ("k", context), ("v", context))
    )
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
    return out @ p["to_out"]["kernel"] + p["to_out"]["bias"]


def ref_layer_norm(p, x, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_ff(p, x):
    h = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    value, gate = np.split(h, 2, axis=-1)
    gelu = 0.5 * gate * (1 + erf(gate / np.sqrt(2)))
    return (value * gelu) @ p["out"]["kernel"] + p["out"]["bias"]


def ref_spatial_transformer(p, x, context, mask, heads, groups):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
    normed = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, h * w, c)
    y = normed * p["norm"]["scale"] + p["norm"]["bias"]
    y = y @ p["proj_in"]["kernel"] + p["proj_in"]["bias"]
    blk = p["transformer_blocks_0"]
    y = y + ref_attention(
        blk["attn1"],
        ref_layer_norm(blk["norm1"], y),
        ref_layer_norm(blk["norm1"], y),
        np.ones(y.shape[:2], bool),
        heads,
    )
    y = y + ref_attention(blk["attn2"], ref_layer_norm(blk["norm2"], y), context, mask, heads)
    y = y + ref_ff(blk["ff"], ref_layer_norm(blk["norm3"], y))
    y = y @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    return x + y.reshape(b, h, w, c)


def _randomize(params):
    """Every parameter random (proj_out starts at zero, which would hide the block)."""
    leaves, tree = jax.tree.flatten(params)
    return tree.unflatten([jnp.asarray(RNG.normal(0, 0.3, a.shape), jnp.float32) for a in leaves])


def _context(b=3, length=5, width=12):
    context = RNG.normal(size=(b, length, width)).astype(np.float32)
    mask = np.ones((b, length), bool)
    mask[0, 3:] = False  # padded prompts of different lengths
    mask[1, 1:] = False
    return context, mask


def test_cross_attention_matches_numpy_and_ignores_padding():
    x = RNG.normal(size=(3, 7, 16)).astype(np.float32)
    context, mask = _context()
    attn = Attention(heads=4, head_dim=4)
    params = _randomize(attn.init(jax.random.key(0), x, context, mask)["params"])
    out = np.asarray(attn.apply({"params": params}, x, context, mask))
    expected = ref_attention(_np(params), x.astype(np.float64), context.astype(np.float64), mask, 4)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    # Whatever sits at padded positions changes nothing.
    noisy = np.where(mask[..., None], context, 1e3 * RNG.normal(size=context.shape)).astype(
        np.float32
    )
    np.testing.assert_array_equal(attn.apply({"params": params}, x, noisy, mask), out)


def test_geglu_feed_forward_matches_numpy():
    x = RNG.normal(size=(2, 5, 8)).astype(np.float32)
    ff = FeedForward()
    params = _randomize(ff.init(jax.random.key(0), x)["params"])
    assert params["proj"]["kernel"].shape == (8, 64)  # value and gate, 4·D each
    np.testing.assert_allclose(
        ff.apply({"params": params}, x),
        ref_ff(_np(params), x.astype(np.float64)),
        rtol=2e-5,
        atol=2e-5,
    )


def test_spatial_transformer_matches_numpy():
    x = RNG.normal(size=(3, 4, 4, 16)).astype(np.float32)
    context, mask = _context()
    block = SpatialTransformer(heads=2, head_dim=8, num_groups=4)
    params = _randomize(block.init(jax.random.key(0), x, context, mask)["params"])
    assert set(params["transformer_blocks_0"]) == {
        "norm1",
        "attn1",
        "norm2",
        "attn2",
        "norm3",
        "ff",
    }
    out = block.apply({"params": params}, x, context, mask)
    expected = ref_spatial_transformer(
        _np(params), x.astype(np.float64), context.astype(np.float64), mask, 2, 4
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_text_conditioned_unet_shapes_and_errors():
    model = UNet(
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_groups=4,
        num_heads=2,
        context_dim=12,
    )
    x = jnp.zeros((3, 8, 8, 1))
    t = jnp.array([1, 5, 9])
    context, mask = _context()
    c = Cond(context=jnp.asarray(context), context_mask=jnp.asarray(mask))
    params = model.init(jax.random.key(0), x, t, c)["params"]
    sites = [k for k in params if k.startswith("SpatialTransformer_")]  # 1 + middle + 2
    assert len(sites) == 4 and not any(k.startswith("AttentionBlock") for k in params)
    assert model.apply({"params": params}, x, t, c).shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="context_dim > 0"):
        model.apply({"params": params}, x, t)
    with pytest.raises(ValueError, match="context_dim: 12, but the context has width 5"):
        model.apply({"params": params}, x, t, Cond(context=jnp.zeros((3, 4, 5))))
    with pytest.raises(ValueError, match="context_dim=0"):
        UNet(base_channels=16, channel_mults=(1,), num_groups=4, attention_resolutions=()).init(
            jax.random.key(0), x, t, c
        )


def test_pooled_context_reads_only_real_tokens():
    model = UNet(
        base_channels=16,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        num_groups=4,
        context_dim=12,
        pooled_context=True,
    )
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
    t = jnp.array([1, 5, 9])
    context, mask = _context()
    c = Cond(context=jnp.asarray(context), context_mask=jnp.asarray(mask))
    params = _randomize(model.init(jax.random.key(0), x, t, c)["params"])
    assert params["context_embed"]["kernel"].shape == (12, 64)  # to the time embedding
    out = model.apply({"params": params}, x, t, c)
    noisy = np.where(mask[..., None], context, 1e3 * RNG.normal(size=context.shape))
    again = model.apply(
        {"params": params}, x, t, c.replace(context=jnp.asarray(noisy, jnp.float32))
    )
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-5)
    other = model.apply({"params": params}, x, t, c.replace(context=c.context + 1.0))
    assert not np.allclose(other, out)
