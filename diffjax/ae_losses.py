"""The autoencoder's losses and measures as pure functions: L1 + β·KL, the hinge GAN, LDM's
adaptive weight, PSNR and SSIM."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jnp.ndarray

ADAPTIVE_DELTA = 1e-4  # δ of the adaptive weight's denominator (LDM)
ADAPTIVE_MAX = 1e4  # and its clamp


def _per_example_mean(a: Array) -> Array:
    return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def reconstruction_loss(x: Array, x_hat: Array) -> Array:
    """Mean |x − x̂| per example [B] (LDM's L1 term divided by the pixel count)."""
    return _per_example_mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def kl_per_pixel(kl: Array, image_shape: tuple[int, ...]) -> Array:
    """The posterior's KL [B] (summed over the latent) divided by the image's H·W·C: with the L1
    term also per pixel, β has LDM's meaning (its loss is both sums, β = 1e-6)."""
    return kl / float(math.prod(image_shape))


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """The discriminator's hinge loss (Lim & Ye 2017): ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]),
    a scalar."""
    return 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )


def generator_loss(logits_fake: Array) -> Array:
    """The generator's side of the hinge GAN: −E[D(x̂)], a scalar."""
    return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad: Array, gan_grad: Array, scale: float = 1.0) -> Array:
    """λ = scale · ‖∇_w L_rec‖ / (‖∇_w L_GAN‖ + δ), clamped to [0, 10⁴], for w the decoder's last
    layer (Esser et al. 2021, eq. 7): the GAN term's gradient is kept at the reconstruction's
    scale. A constant to autodiff."""
    ratio = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + ADAPTIVE_DELTA)
    return jax.lax.stop_gradient(scale * jnp.clip(ratio, 0.0, ADAPTIVE_MAX))


def psnr(x: Array, x_hat: Array) -> Array:
    """Peak signal-to-noise ratio [B] in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = _per_example_mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Array:
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * jnp.square(r / sigma))
    return g / g.sum()


def ssim(x: Array, x_hat: Array, size: int = 11, sigma: float = 1.5) -> Array:
    """Structural similarity [B] (Wang et al. 2004) of images in [-1, 1], measured on [0, 1]:
    an 11x11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, population covariances, averaged
    over the positions where the window fits and over channels."""
    c1, c2 = 0.01**2, 0.03**2
    a = (x.astype(jnp.float32) + 1.0) / 2.0
    b = (x_hat.astype(jnp.float32) + 1.0) / 2.0
    g = _gaussian_window(size, sigma)
    channels = a.shape[-1]
    # Separable filtering, each channel on its own: a depthwise ("valid") convolution.
    kh = jnp.tile(g[:, None, None, None], (1, 1, 1, channels))
    kw = jnp.tile(g[None, :, None, None], (1, 1, 1, channels))

    def blur(u):
        spec = ("NHWC", "HWIO", "NHWC")
        u = jax.lax.conv_general_dilated(u, kh, (1, 1), "VALID", dimension_numbers=spec,
                                         feature_group_count=channels)  # fmt: skip
        return jax.lax.conv_general_dilated(u, kw, (1, 1), "VALID", dimension_numbers=spec,
                                            feature_group_count=channels)  # fmt: skip

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return _per_example_mean(num / den)
