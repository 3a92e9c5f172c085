"""Image editing with a trained model, pixel or latent: img2img, inpaint, outpaint, transfer.

`Editor.load(config, workdir)` gives a model ready to edit; each edit is one method on batches
of [-1, 1] images [B, H, W, C] (masks [B, H, W, 1], 1 = regenerate). `edit.edit_files` (the
CLI's `--mode=edit`) reads image files and writes PNGs. The math is `editing`'s; the sampling is the
config's sampler through `sampling.make_sample_fn`, with the known region as its hook.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from diffjax import build, editing, infer, latent, samplers, sampling, sharding, spatial
from diffjax.build import Setup
from diffjax.cond import Cond

log = logging.getLogger(__name__)
# The diffusion classifier's (t, ε) draws per image (`Editor.classify`, `label="auto"`).
CLASSIFY_TRIALS = 64


class EditError(ValueError):
    """An edit that cannot be made as asked (bad strength, mask, size or model pairing)."""


class Editor:
    """A model's EMA parameters and its compiled edit programs.

    Attributes:
      setup: the model's `build.Setup` (its config's sampler, steps, spacing, η and guidance
        are the edits' too); params: its EMA parameters.
      image_size: (H, W) of the images it edits; channels: C.
    """

    def __init__(self, setup: Setup, params):
        self.setup, self.params = setup, params
        self.image_size = tuple(setup.pixel_shape[:2])
        self.channels = setup.pixel_shape[2]
        self._fns, self._noise_fns = {}, {}
        self._encode = self._invert = self._classify = None

    @classmethod
    def load(cls, config, workdir: str, step: int | None = None) -> Editor:
        """The EMA model of a run's checkpoint (`step`, default the newest)."""
        setup = Setup(config)
        if setup.conditioner.text:
            setup.load_text(workdir)
        state, _ = infer.restore_for_inference(setup, workdir, step)
        return cls(setup, state.ema_params)

    # --- the edits ------------------------------------------------------------------------------

    def img2img(self, images, strength: float, key, *, label=None, prompt=None) -> np.ndarray:
        """SDEdit (Meng et al. 2022): noise `images` to `strength` ∈ [0, 1] of the sampler's
        chain and denoise them under the condition (a class `label`: one index, one per image,
        or "auto" for the class the model reads in each image; a `prompt`). 0 returns the
        images; 1 samples from pure noise (the images are ignored)."""
        images = self._check_images(images)
        self._need_spatial("", "--edit=img2img")
        label = self._read_label(images, label)
        table, steps = self._table()
        if editing.sdedit_steps(steps, strength) == 0:
            return images
        cut, n = editing.sdedit_table(table, steps, strength)
        noise_key, loop_key = jax.random.split(key)
        x0 = self._to_model(images)
        x = editing.sdedit_start(
            self.setup.schedule, x0, self._noise(len(images), noise_key), cut[0], n == steps
        )
        out = self._sample(x, loop_key, cut, n, label=label, prompt=prompt)
        return self._from_model(out, len(images))

    def inpaint(self, images, mask, key, *, method="repaint", jump_length=1, resamplings=1,
                label=None, prompt=None) -> np.ndarray:  # fmt: skip
        """Regenerates where `mask` [B, H, W, 1] is 1 and keeps the rest (exactly, in the output).

        method "repaint" (Lugmayr et al. 2022), any model, the config's sampler: the kept region
        is replaced by a draw of q(x_t | image) after every step; with `resamplings` r > 1,
        every `jump_length` levels the chain jumps back up and redoes them, r passes in all
        (the regions harmonise). "trained": a model trained with `spatial.kind="inpaint"` sees
        the masked image and the mask concatenated to x_t and samples plainly.
        """
        images, keep = self._check_images(images), self._check_mask(mask, images)
        table, steps = self._table()
        x_T = self._noise(len(images), jax.random.fold_in(key, 1))
        if method == "trained" and self.setup.conditioner.spatial == "inpaint_encoded":
            # Stable Diffusion's inpainting models: the mask and the masked image's latents.
            masked = sharding.to_host(self._to_model(images * keep))[: len(images)]
            factor = self.setup.conditioner.spatial_fold
            concat = spatial.encoded_inpaint_condition(1.0 - keep, masked, factor)
            out = self._sample(x_T, key, table, steps, label=label, prompt=prompt, concat=concat)
        elif method == "trained":
            self._need_spatial("inpaint", "--method=trained")
            concat = self.setup.conditioner.fold(spatial.inpaint_condition(images, 1.0 - keep))
            out = self._sample(x_T, key, table, steps, label=label, prompt=prompt, concat=concat)
        elif method == "repaint":
            self._need_spatial("", "--method=repaint")
            walk, n = editing.repaint_table(table, steps, jump_length, resamplings)
            args = {"known": self._to_model(images), "keep": self._put(self._model_mask(keep))}
            out = self._sample(x_T, key, walk, n, label=label, prompt=prompt, hook_args=args)
        else:
            raise EditError(f"method={method!r}: choose 'repaint' or 'trained'")
        return np.where(keep > 0.5, images, self._from_model(out, len(images)))

    @property
    def low_res_size(self) -> tuple[int, int]:
        """(h, w) of the low-res images a super-resolution model upscales."""
        self._need_spatial("upscale", "--edit=upscale")
        f = self.setup.conditioner.spatial_factor
        return self.image_size[0] // f, self.image_size[1] // f

    def upscale(self, low, key, *, label=None, prompt=None) -> np.ndarray:
        """Super-resolution (SR3, Saharia et al. 2021) with a model trained with
        `spatial.kind="upscale"`: low-res images [B, H/f, W/f, C] → [B, H, W, C], sampled under
        their bicubic upsampling."""
        (h, w), low = self.image_size, np.asarray(low, np.float32)
        want = (*self.low_res_size, self.channels)
        if low.ndim != 4 or low.shape[1:] != want:
            raise EditError(f"low-res images of shape {low.shape}; this model upscales [B, {want}]")
        table, steps = self._table()
        x_T = self._noise(len(low), jax.random.fold_in(key, 1))
        concat = self.setup.conditioner.fold(spatial.upsample(low, (h, w)))
        out = self._sample(x_T, key, table, steps, label=label, prompt=prompt, concat=concat)
        return self._from_model(out, len(low))

    def outpaint(self, image, extend: dict[str, int], key, **kwargs) -> np.ndarray:
        """Extends one image [H, W, C] by `extend` pixels per side ({"left": 16, …}) and fills
        the new region by inpainting (`inpaint`'s keyword arguments), in windows of the model's
        size that overlap what is already there, the best-known first, so that a canvas larger
        than the model comes out seamless. Returns the canvas [H', W', C]."""
        canvas, keep = editing.extend_canvas(np.asarray(image, np.float32), extend)
        h, w = self.image_size
        if canvas.shape[0] < h or canvas.shape[1] < w:
            raise EditError(
                f"the extended canvas is {canvas.shape[0]}x{canvas.shape[1]}, smaller than the "
                f"model's {h}x{w}; extend more or use --edit=inpaint at the model's size"
            )
        i = 0
        while (pos := editing.next_window(keep, (h, w))) is not None:
            top, left = pos
            crop = np.s_[top : top + h, left : left + w]
            out = self.inpaint(
                canvas[crop][None], 1.0 - keep[crop][None], jax.random.fold_in(key, i), **kwargs
            )
            canvas[crop], keep[crop], i = out[0], 1.0, i + 1
        log.info("outpaint: %d windows of %dx%d", i, h, w)
        return canvas

    def transfer(self, images, target: Editor, *, strength: float = 1.0, label=None,
                 prompt=None) -> np.ndarray:  # fmt: skip
        """DDIB (Su et al. 2023): DDIM-invert `images` under this (source) model to its x_T,
        then DDIM-sample (η = 0) the target model from that x_T; both with this model's steps,
        and without clipping x̂₀ (the probability-flow ODE both ways; the result is clipped).
        `strength` < 1 inverts only that far up the chain (the last round(strength · steps)
        levels, as img2img cuts it) and samples the target from there: more of the input
        survives. The two models must share the diffusion space's shape (and T). Both ways
        use this model's guidance scale w: 1 keeps the ODE exact (and the class best).

        Class-conditional pairs (DDIB's own setting) invert and sample under the class `label`:
        one index, one per image, or "auto", each image's class as the source model reads it
        (`classify`), which the target then draws in its domain."""
        images = self._check_images(images)
        self._need_spatial("", "--edit=transfer")
        target._need_spatial("", "--edit=transfer's target")
        if target.setup.image_shape != self.setup.image_shape:
            raise EditError(
                f"--target_workdir: the target model works on {target.setup.image_shape}, the "
                f"source on {self.setup.image_shape}; transfer needs the same shape"
            )
        label = self._read_label(images, label)  # after the cheap checks: it runs the model
        table, steps = self._table()
        if editing.sdedit_steps(steps, strength) == 0:
            return images
        table, steps = editing.sdedit_table(table, steps, strength)
        x0 = self._to_model(images)
        cond, null = self._cond(len(x0), label, prompt)
        if self._invert is None:
            self._invert = sampling.make_invert_fn(
                self.setup.model, self.setup.schedule, self.setup.mesh,
                pred=_unclipped(self.setup), conditioner=self.setup.conditioner,
                params_sharding=self.setup.params_sharding,
            )  # fmt: skip
        s = self.setup.config.sampler
        x_T = self._invert(self.params, x0, cond, table, steps, s.guidance_scale, null_cond=null)
        out = target._sample(
            x_T, jax.random.key(0), table, steps, label=label, prompt=prompt, sampler="ddim",
            pred=_unclipped(target.setup), guidance_scale=s.guidance_scale,
        )  # fmt: skip
        return np.clip(target._from_model(out, len(images)), -1.0, 1.0)

    def classify(self, images, *, trials: int = CLASSIFY_TRIALS, key=None):
        """Each image's class as this class-conditional model reads it, with no classifier
        beside it: the class whose condition denoises the image best (the diffusion classifier
        of Li et al. 2023, `editing.class_errors`), over `trials` (t, ε) draws per image shared
        by every class. Returns (labels [B] int, errors [B, K]: each class's mean ε error)."""
        images = self._check_images(images)
        self._need_spatial("", "reading an input's class")
        k = self.setup.conditioner.num_classes
        if not k:
            raise EditError(
                "label='auto' reads the input's class with a class-conditional model; this one "
                "has model.num_classes=0 (give no label, or use a class-conditional run)"
            )
        if self._classify is None:
            self._classify = sampling.make_classify_fn(
                self.setup.model, self.setup.schedule, self.setup.mesh, k,
                pred=_unclipped(self.setup), params_sharding=self.setup.params_sharding,
            )  # fmt: skip
        ts = editing.classifier_timesteps(self.setup.schedule.num_steps, trials)
        key = jax.random.key(self.setup.config.seed) if key is None else key
        cond, _ = self._cond_parts(len(images), None, None)  # its label is replaced per class
        errors = self._classify(self.params, self._to_model(images), cond, key, ts)
        errors = np.asarray(sharding.to_host(errors))[: len(images)]
        return errors.argmin(axis=1), errors

    # --- the parts they share -------------------------------------------------------------------

    def _table(self) -> tuple[np.ndarray, int]:
        s, t = self.setup.config.sampler, self.setup.schedule.num_steps
        return build.timestep_table(self.setup.config, t), s.steps

    def _need_spatial(self, kind: str, what: str) -> None:
        have = self.setup.conditioner.spatial
        if have != kind:
            model = (
                f"a model trained with spatial.kind={have!r}"
                if have
                else "a model without a spatial condition"
            )
            needs = (
                f"a model trained with spatial.kind={kind!r}"
                if kind
                else "a model without a spatial condition"
            )
            raise EditError(f"{what} needs {needs}; this is {model}")

    def _read_label(self, images: np.ndarray, label):
        """`label`, with "auto" replaced by each image's class as this model reads it."""
        if not (isinstance(label, str) and label == "auto"):
            return label
        labels, _ = self.classify(images)
        log.info("classes read from the inputs: %s", " ".join(map(str, labels[:32])))
        return labels

    def _padded_count(self, num: int) -> int:
        return num + (-num) % self.setup.mesh.size

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        want = (*self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != want:
            raise EditError(f"images of shape {images.shape}, but the model edits [B, {want}]")
        return images

    def _check_mask(self, mask, images) -> np.ndarray:
        mask = np.asarray(mask, np.float32)
        if mask.shape != images.shape[:3] + (1,):
            raise EditError(f"a mask of shape {mask.shape} for images {images.shape}: [B, H, W, 1]")
        if not np.any(mask > 0.5):
            raise EditError("the mask is empty (all black): there is nothing to regenerate")
        if np.all(mask > 0.5):
            log.warning("the mask is all white: this is plain sampling, the image is not used")
        return 1.0 - (mask > 0.5).astype(np.float32)

    def _model_mask(self, keep: np.ndarray) -> np.ndarray:
        codec = self.setup.codec
        return keep if codec is None else editing.latent_keep(keep, codec.module.factor)

    def _padded(self, x: np.ndarray) -> np.ndarray:
        """The batch padded (repeating its last example) to a multiple of the mesh's devices."""
        extra = self._padded_count(len(x)) - len(x)
        return np.concatenate([x, np.repeat(x[-1:], extra, 0)]) if extra else x

    def _put(self, x) -> jax.Array:
        return sharding.from_global(
            self._padded(np.asarray(x)), sharding.batch_sharded(self.setup.mesh)
        )

    def _to_model(self, images: np.ndarray) -> jax.Array:
        """Images → the diffusion space (a latent model's: scale · the posterior mean)."""
        x = self._put(images)
        if self.setup.codec is None:
            return x
        if self._encode is None:
            self._encode = latent.make_encode_fn(self.setup.codec.module, self.setup.mesh)
        mean, _ = self._encode(self.setup.codec.params, x)
        return self.setup.frozen["latent_scale"] * mean

    def _from_model(self, x, num: int) -> np.ndarray:
        return np.asarray(sharding.to_host(self.setup.decode(x)))[:num]

    def _noise(self, num: int, key) -> jax.Array:
        """N(0, I) for a batch of `num` in the diffusion space, padded for the mesh."""
        shape = (self._padded_count(num), *self.setup.image_shape)
        if shape not in self._noise_fns:
            self._noise_fns[shape] = sampling.make_noise_fn(self.setup.mesh, shape)
        return self._noise_fns[shape](key)

    def _cond(self, batch: int, label, prompt, concat=None) -> tuple[Cond, Cond | None]:
        """(condition, null side) for a padded batch: the class `label` (None: the null class,
        i.e. unconditional), the `prompt` (None: the empty one), a spatial `concat`."""
        cond, null = self._cond_parts(batch, label, prompt)
        if concat is None:
            self._need_spatial("", "this edit")
            return cond, null
        concat = self._put(concat)
        return cond.replace(concat=concat), None if null is None else null.replace(concat=concat)

    def _cond_parts(self, batch: int, label, prompt) -> tuple[Cond, Cond | None]:
        setup, b = self.setup, self._padded_count(batch)
        c = setup.conditioner
        labels = None
        if c.num_classes:
            labels = np.full(b, c.num_classes, np.int32)  # None: the null class
            if label is not None:
                given = np.asarray(label, np.int32).reshape(-1)
                if given.min() < 0 or given.max() >= c.num_classes:
                    raise EditError(f"labels must be in [0, {c.num_classes - 1}], got {label}")
                labels = np.resize(given, b) if len(given) == 1 else self._padded(given)
                if len(labels) != b:
                    raise EditError(f"{len(given)} labels for a batch of {batch} images")
        elif label is not None:
            raise EditError("a label was given, but the model is not class-conditional")
        if not c.text:
            if prompt is not None:
                raise EditError("a prompt was given, but the model has no text conditioning")
            return setup.labels_cond(labels if labels is not None else np.zeros(b)), None
        cond = setup.prompt_cond(setup.text_side, [prompt or ""] * b, labels)
        return cond, infer.null_cond(setup, b, None)

    def _sample(self, x_T, key, table, n, *, label=None, prompt=None, hook_args=None,
                sampler=None, pred=None, concat=None,
                guidance_scale=None) -> jax.Array:  # fmt: skip
        """The config's sampler (or `sampler`, `pred`) from x_T over `table`, guided as the
        config says (or with `guidance_scale`); with `hook_args`, RePaint's replacement and
        jumps."""
        s = self.setup.config.sampler  # read at each call: a study may change it in between
        fn_key = (sampler or s.name, s.variance, hook_args is not None, pred)
        if fn_key not in self._fns:
            edit = {"hook": editing.replace_known, "jumps": True} if hook_args is not None else {}
            self._fns[fn_key] = self.setup.sample_program(sampler=sampler, pred=pred, **edit)
        cond, null = self._cond(len(x_T), label, prompt, concat)
        eta = 0.0 if sampler == "ddim" else s.eta
        return self._fns[fn_key](
            self.params, x_T, cond, key, table, n, eta,
            s.guidance_scale if guidance_scale is None else guidance_scale, null_cond=null,
            hook_args=hook_args, **self.setup.guidance_args(),
        )  # fmt: skip


def _unclipped(setup: Setup) -> samplers.Prediction:
    """The model's prediction read without clipping or thresholding x̂₀ (DDIM's exact ODE)."""
    return dataclasses.replace(build.prediction(setup.config), clip_x0=False, dynamic_threshold=0.0)
