"""The autoencoder's compiled steps: training (L1 + β·KL + the adaptive hinge GAN, the
discriminator in the same state) and evaluation (PSNR, SSIM, KL per example)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffjax import ae_losses, sharding
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.layers import conv2d
from diffjax.steps import apply_gradients, jit_eval_step, jit_train_step
from diffjax.train_state import TrainState

Array = jnp.ndarray

AE, DISC = "autoencoder", "discriminator"  # the two halves of the trained params


def init_params_fn(model: AutoencoderKL, discriminator: Any, image_shape: tuple[int, ...]):
    """`key -> {"autoencoder": ..., "discriminator": ...}` (no discriminator entry when None)."""

    def init(key):
        ae_key, d_key, z_key = jax.random.split(key, 3)
        x = jnp.zeros((1, *image_shape), jnp.float32)
        params = {AE: model.init(ae_key, x, z_key)["params"]}
        if discriminator is not None:
            params[DISC] = discriminator.init(d_key, x)["params"]
        return params

    return init


def make_optimizer(ae_tx: optax.GradientTransformation, disc_tx=None):
    """Each half of the params with its own optimizer (and optimizer state)."""
    if disc_tx is None:
        return optax.multi_transform({AE: ae_tx}, {AE: AE})
    return optax.multi_transform({AE: ae_tx, DISC: disc_tx}, {AE: AE, DISC: DISC})


def last_layer_grad(features: Array, kernel: Array, cotangent: Array) -> Array:
    """∂L/∂W of the decoder's `conv_out` (x̂ = conv(h, W) + b) for a cotangent ∂L/∂x̂."""
    h = jax.lax.stop_gradient(features)
    _, vjp = jax.vjp(lambda w: conv2d(h, w, 1, "SAME"), kernel)
    return vjp(cotangent.astype(h.dtype))[0]


def make_train_step(
    model: AutoencoderKL,
    discriminator: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    abstract_state: TrainState,
    *,
    kl_weight: float = 1e-6,
    disc_weight: float = 0.5,
    disc_start_steps: int = 0,
    ema_decay: float = 0.999,
):
    """Builds the compiled step `(state, batch, key, frozen) -> (state, metrics)`.

    Loss per pixel (Rombach et al. 2022, appendix G, with both sums divided by H·W·C):
    |x − x̂| + β KL(q(z|x) ‖ N(0, I)) + f_t · λ · (−D(x̂)), x̂ decoded from a posterior sample,
    λ the adaptive weight at the decoder's last layer times `disc_weight`, f_t = 1 from step
    `disc_start_steps` on (0 before). The discriminator minimises f_t times the hinge loss on x
    against x̂ (held fixed). Both halves update in the same step, each with its own optimizer.
    Keys, sharding and donation as `steps.make_train_step`.
    """
    gan = discriminator is not None and disc_weight > 0

    def disc_logits(d_params, x):
        return discriminator.apply({"params": d_params}, x)

    def step(state: TrainState, batch: dict, key: Array, frozen: Any):
        z_key = jax.random.fold_in(key, state.step)
        x = batch["image"]
        factor = (state.step >= disc_start_steps).astype(jnp.float32)
        d_params = state.params.get(DISC)

        def ae_loss(ae_params):
            posterior = model.apply({"params": ae_params}, x, method="encode")
            z = posterior.sample(z_key)
            x_hat, feats = model.apply({"params": ae_params}, z, True, method="decode")
            rec = ae_losses.reconstruction_loss(x, x_hat)
            kl = ae_losses.kl_per_pixel(posterior.kl(), x.shape[1:])
            loss = jnp.mean(rec + kl_weight * kl)
            parts = {"rec": jnp.mean(rec), "kl": jnp.mean(posterior.kl())}
            if gan:
                g_loss_of = lambda img: ae_losses.generator_loss(disc_logits(d_params, img))
                g_loss = g_loss_of(x_hat)
                fixed = jax.lax.stop_gradient(x_hat)
                rec_cot = jax.grad(lambda img: jnp.mean(ae_losses.reconstruction_loss(x, img)))
                kernel = ae_params["decoder"]["conv_out"]["kernel"]
                lam = ae_losses.adaptive_weight(
                    last_layer_grad(feats, kernel, rec_cot(fixed)),
                    last_layer_grad(feats, kernel, jax.grad(g_loss_of)(fixed)),
                    disc_weight,
                )
                loss = loss + factor * lam * g_loss
                parts.update(g_loss=g_loss, adaptive_weight=lam)
            return loss, (parts, x_hat)

        (loss, (parts, x_hat)), ae_grads = jax.value_and_grad(ae_loss, has_aux=True)(
            state.params[AE]
        )
        grads = {AE: ae_grads}
        if DISC in state.params:
            fake = jax.lax.stop_gradient(x_hat)

            def d_loss_fn(dp):
                return factor * ae_losses.hinge_d_loss(disc_logits(dp, x), disc_logits(dp, fake))

            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(d_params)
            grads[DISC] = d_grads
            parts["d_loss"] = d_loss
        new_state = apply_gradients(tx, ema_decay, state, grads, state.loss_history)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(ae_grads), **parts}

    return jit_train_step(step, mesh, abstract_state)


def make_eval_step(model: AutoencoderKL, mesh: jax.sharding.Mesh, params_sharding: Any = None):
    """Compiled `(params, batch, key, frozen) -> {"psnr", "ssim", "kl", "l1"}`, each [B]: the
    reconstruction through the posterior mean. `params` is the autoencoder's half."""

    def step(params, batch, key, frozen):
        x = batch["image"]
        x_hat, posterior = model.apply({"params": params}, x)
        x_hat = jnp.clip(x_hat, -1.0, 1.0)
        return {
            "psnr": ae_losses.psnr(x, x_hat),
            "ssim": ae_losses.ssim(x, x_hat),
            "kl": posterior.kl(),
            "l1": ae_losses.reconstruction_loss(x, x_hat),
        }

    return jit_eval_step(step, mesh, params_sharding)


def make_reconstruct_fn(model: AutoencoderKL, mesh: jax.sharding.Mesh):
    """Compiled `(params, images) -> reconstructions` through the posterior mean, batch split."""
    batch_sh = sharding.batch_sharded(mesh)
    return jax.jit(
        lambda params, x: jnp.clip(model.apply({"params": params}, x)[0], -1.0, 1.0),
        in_shardings=(sharding.replicated(mesh), batch_sh),
        out_shardings=batch_sh,
    )
