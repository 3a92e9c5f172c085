"""The KL autoencoder: shapes and f, the posterior against closed forms, its losses and measures
against independent references, and its train step (overfitting, the GAN switching on)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffjax import ae_losses, ae_steps, sharding, steps, train_state
from diffjax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from diffjax.models.discriminator import PatchDiscriminator
from diffjax.models.layers import ShapeError


def _tiny(levels=2, channels=1, z=4):
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=z,
        num_groups=4,
    )


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shapes_and_factor(levels):
    model = _tiny(levels, channels=3, z=2)
    x = jnp.ones((2, 16, 16, 3))
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
    f = 2 ** (levels - 1)
    assert model.factor == f
    recon, post = shapes
    assert recon.shape == (2, 16, 16, 3)
    assert post.mean.shape == post.logvar.shape == (2, 16 // f, 16 // f, 2)
    assert model.latent_shape((16, 16, 3)) == (16 // f, 16 // f, 2)


def test_shape_errors_name_the_setting():
    with pytest.raises(ShapeError) as e:
        _tiny(3).check_shapes((18, 18, 1))
    assert e.value.field == "input" and "f = 4" in e.value.message
    with pytest.raises(ShapeError) as e:
        _tiny(2).check_shapes((16, 16, 3))
    assert e.value.field == "in_channels"


def test_kl_against_numerical_integration():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 2, 1, 3)).astype(np.float32)
    logvar = rng.uniform(-3, 1.5, size=mean.shape).astype(np.float32)
    kl = np.asarray(DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar)).kl())
    # KL(q ‖ p) = ∫ q log(q / p) per dimension, on a fine grid, summed over dimensions.
    grid = np.linspace(-15, 15, 200_001)
    expected = np.zeros(2)
    for idx in np.ndindex(mean.shape):
        m, s = float(mean[idx]), float(np.exp(0.5 * logvar[idx]))
        q = np.exp(-0.5 * ((grid - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
        p = np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi)
        integrand = np.where(q > 0, q * (np.log(np.maximum(q, 1e-300)) - np.log(p)), 0.0)
        expected[idx[0]] += np.trapezoid(integrand, grid)
    np.testing.assert_allclose(kl, expected, rtol=1e-4)


def test_posterior_sample_moments_and_logvar_clamp():
    mean = jnp.asarray([[-1.0, 0.5, 2.0]])
    logvar = jnp.log(jnp.asarray([[0.25, 1.0, 4.0]]))
    post = DiagonalGaussian(mean, logvar)
    z = jax.vmap(post.sample)(jax.random.split(jax.random.key(0), 20_000))
    n = z.shape[0]
    np.testing.assert_allclose(z.mean(0)[0], mean[0], atol=4 * 2.0 / np.sqrt(n))
    np.testing.assert_allclose(z.var(0)[0], jnp.exp(logvar[0]), rtol=0.05)
    clamped = DiagonalGaussian.from_moments(jnp.asarray([[0.0, 0.0, -100.0, 100.0]]))
    np.testing.assert_array_equal(clamped.logvar, [[-30.0, 20.0]])


def test_hinge_and_generator_losses_by_hand():
    real = jnp.asarray([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2
    fake = jnp.asarray([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2
    np.testing.assert_allclose(ae_losses.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 1.0))
    np.testing.assert_allclose(ae_losses.generator_loss(fake), 1.0 / 3, rtol=1e-6)


def test_psnr_and_ssim_against_scikit_image():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 24, 24, 3)).astype(np.float32)
    x[:, :12] = np.linspace(-1, 1, 24)[None, None, :, None]  # some structure
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    ours_psnr = np.asarray(ae_losses.psnr(x, y))
    ours_ssim = np.asarray(ae_losses.ssim(x, y))
    for i in range(3):
        a, b = (x[i] + 1) / 2, (y[i] + 1) / 2
        ref = structural_similarity(
            a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        np.testing.assert_allclose(ours_ssim[i], ref, atol=2e-5)
        np.testing.assert_allclose(
            ours_psnr[i], peak_signal_noise_ratio(x[i], y[i], data_range=2.0), rtol=1e-5
        )


def test_last_layer_gradient_and_adaptive_weight_match_autodiff():
    """λ from the cheap last-layer VJP equals the formula on gradients that full autodiff takes
    w.r.t. the decoder's conv_out kernel."""
    model = _tiny(2)
    disc = PatchDiscriminator(channels=8, num_layers=1, num_groups=4)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), minval=-1, maxval=1)
    params = model.init(jax.random.key(0), x)["params"]
    d_params = disc.init(jax.random.key(2), x)["params"]
    z = model.apply({"params": params}, x, method="encode").mean
    rec_of = lambda img: jnp.mean(ae_losses.reconstruction_loss(x, img))
    gan_of = lambda img: ae_losses.generator_loss(disc.apply({"params": d_params}, img))

    def full(loss_of):
        def f(p):
            return loss_of(model.apply({"params": p}, z, method="decode"))

        return jax.grad(f)(params)["decoder"]["conv_out"]["kernel"]

    x_hat, feats = model.apply({"params": params}, z, True, method="decode")
    kernel = params["decoder"]["conv_out"]["kernel"]
    g_rec = ae_steps.last_layer_grad(feats, kernel, jax.grad(rec_of)(x_hat))
    g_gan = ae_steps.last_layer_grad(feats, kernel, jax.grad(gan_of)(x_hat))
    np.testing.assert_allclose(g_rec, full(rec_of), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_gan, full(gan_of), rtol=1e-4, atol=1e-7)
    a, b = np.asarray(full(rec_of), np.float64), np.asarray(full(gan_of), np.float64)
    expected = 0.5 * min(np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4), 1e4)
    np.testing.assert_allclose(ae_losses.adaptive_weight(g_rec, g_gan, 0.5), expected, rtol=1e-4)


def _state_and_step(model, disc, shape, *, disc_start_steps=0, lr=3e-3):
    mesh = sharding.make_mesh(-1, 1)
    tx_ae = train_state.make_optimizer(lr, 1, 0.0, 0.9, 0.999, 0.0)
    tx_d = train_state.make_optimizer(lr, 1, 0.0, 0.5, 0.9, 0.0) if disc else None
    tx = ae_steps.make_optimizer(tx_ae, tx_d)
    init = ae_steps.init_params_fn(model, disc, shape)
    kw = dict(num_timesteps=2, init_params=init)
    abstract = train_state.abstract_train_state(model, tx, shape, mesh, **kw)
    state = train_state.create_train_state(model, tx, shape, jax.random.key(0), mesh, **kw)
    step = ae_steps.make_train_step(
        model, disc, tx, mesh, abstract, disc_start_steps=disc_start_steps, ema_decay=0.0
    )
    return mesh, state, step


def _digit_batch(n=16, size=8):
    from sklearn.datasets import load_digits

    images = load_digits().images[:n] / 16.0 * 2 - 1
    return images[..., None].astype(np.float32)[:, :size, :size]


def test_a_tiny_autoencoder_overfits_a_batch():
    model = _tiny(2)
    x = _digit_batch()
    mesh, state, step = _state_and_step(model, None, x.shape[1:])
    batch = sharding.global_batch({"image": x}, mesh)
    key = jax.random.key(3)
    first, in_flight = None, steps.InFlight()  # 150 steps queued would deadlock XLA:CPU
    for _ in range(150):
        state, metrics = step(state, batch, key, None)
        in_flight.add(metrics["rec"])
        first = float(metrics["rec"]) if first is None else first
    recon, _ = model.apply({"params": state.params["autoencoder"]}, x)
    l1 = float(np.mean(np.abs(np.asarray(recon) - x)))
    assert first > 0.5 and l1 < 0.12, (first, l1)  # measured: 0.87 at the start, 0.093 after


def test_the_discriminator_learns_only_from_its_start_step():
    model = _tiny(2)
    disc = PatchDiscriminator(channels=8, num_layers=1, num_groups=4)
    x = _digit_batch()
    mesh, state, step = _state_and_step(model, disc, x.shape[1:], disc_start_steps=2)
    batch = sharding.global_batch({"image": x}, mesh)
    d0 = jax.device_get(state.params["discriminator"])
    for i in range(4):
        state, metrics = step(state, batch, jax.random.key(0), None)
        d = jax.device_get(state.params["discriminator"])
        changed = any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(d), strict=True)
        )
        # Steps 0 and 1 run before disc_start_steps=2: the GAN terms weigh 0.
        assert changed == (i >= 2), i
        assert np.isfinite(float(metrics["loss"])) and float(metrics["adaptive_weight"]) >= 0
    assert optax.global_norm(state.params["autoencoder"]) > 0
