"""Config → components: mesh, network, optimizer, schedule, conditioner, compiled samplers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from diffjax import (
    ae_steps,
    checkpoint,
    cli,
    config_check,
    data,
    latent_setup,
    prompts,
    samplers,
    sampling,
    schedules,
    sharding,
    train_state,
)
from diffjax.cond import Cond, Conditioner
from diffjax.data import captions as captions_lib
from diffjax.data import tokenizer as tokenizer_lib
from diffjax.models import clip, pretrained
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.conditioned import TextUNet
from diffjax.models.discriminator import PatchDiscriminator
from diffjax.models.text import BertEncoder, TextEncoder
from diffjax.models.unet import UNet

MINILM_WIDTH = 384  # all-MiniLM-L6-v2's hidden size, the context width of `text.encoder=minilm`
TEXT_FILE = "text.json"  # in the workdir: the joint encoder's vocabulary and the grid's prompts


def mesh(config) -> jax.sharding.Mesh:
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp)


def context_width(config) -> int:
    """The width of the U-Net's cross-attention context (0: no text)."""
    tx = config.text
    if tx.encoder == "clip":
        return clip.read_config(Path(tx.pretrained_dir))["hidden_size"]
    return {"": 0, "joint": tx.width, "minilm": MINILM_WIDTH}[tx.encoder]


def model(config, latent_channels: int = 0) -> UNet | TextUNet | AutoencoderKL:
    """The trained network; a latent model's U-Net sees `latent_channels` channels."""
    if config.task == "autoencoder":
        return latent_setup.autoencoder_model(config)
    kw = config.model.to_dict()
    kw.pop("cond_drop_prob")  # the conditioner's, not the network's
    kw["dtype"] = jnp.dtype(kw.pop("dtype"))
    kw["attention_resolutions"] = tuple(kw["attention_resolutions"])
    kw["channel_mults"] = tuple(kw["channel_mults"])
    channels = latent_channels or config.data.channels  # the input's; the output matches
    kw["out_channels"] = channels * (2 if config.diffusion.learned_variance else 1)
    kw["context_dim"] = context_width(config)
    unet = UNet(**kw)
    tx = config.text
    if tx.encoder != "joint":
        return unet
    encoder = BertEncoder(
        vocab_size=tx.vocab_size,
        hidden_size=tx.width,
        num_layers=tx.layers,
        num_heads=tx.heads,
        intermediate_size=4 * tx.width,
        max_positions=tx.max_length,
    )
    return TextUNet(unet=unet, encoder=encoder)


def conditioner(config, image_shape: tuple | None = None) -> Conditioner:
    """The run's conditioner; `image_shape` is what the network diffuses ([h, w, z] latents for a
    latent model, where spatial conditions are folded onto the h × w grid)."""
    text = bool(config.text.encoder)
    size, c = config.data.image_size, config.data.channels
    fold = size // image_shape[0] if image_shape else 1
    c_spatial = (c + (config.spatial.kind == "inpaint")) * fold * fold
    if config.spatial.kind == "inpaint_encoded":  # made on the latent grid, not folded
        c_spatial = 1 + image_shape[-1]
    return Conditioner(
        num_classes=config.model.num_classes,
        drop_prob=config.model.cond_drop_prob,
        context_length=config.text.max_length if text else 0,
        context_width=context_width(config) if text and config.text.encoder != "joint" else 0,
        spatial=config.spatial.kind,
        spatial_factor=config.spatial.factor,
        spatial_fold=fold,
        concat_shape=(size // fold, size // fold, c_spatial),
    )


def captions(config, source) -> captions_lib.Captions:
    """The caption table of the training data: the digits' phrasings, or the records' texts."""
    if config.data.name == "digits":
        return captions_lib.digit_captions()
    if not source.has_text:
        raise data.DatasetError(
            f"dataset {config.data.name!r} has no captions (a text feature, or metadata.jsonl "
            f"for image folders), but config.text.encoder={config.text.encoder!r} needs them"
        )
    return captions_lib.text_captions(source.texts())


def text_side(config, workdir: str, table: captions_lib.Captions | None = None):
    """The model's `prompts.TextSide`. A joint encoder's vocabulary is built from the training
    captions (`table`) and kept in `<workdir>/text.json` with the grid's prompts; sampling and
    resuming read it back. Returns (text side, grid prompts)."""
    tx = config.text
    path = os.path.join(workdir, TEXT_FILE)
    saved = _read_text_file(path)
    grid = saved.get("grid_prompts") or (list(table.examples) if table else [])
    if tx.encoder == "joint":
        if table is not None:
            tokenizer = tokenizer_lib.WordTokenizer.from_texts(table.texts, tx.max_length)
            if saved and saved.get("words") != list(tokenizer.words):
                raise config_check.ConfigError(
                    f"config.data: the captions' vocabulary differs from the one this run "
                    f"started with ({path}); train with the same data, or use a fresh --workdir"
                )
        elif saved:
            tokenizer = tokenizer_lib.WordTokenizer(saved["words"], tx.max_length)
        else:
            raise config_check.ConfigError(
                f"config.text.encoder='joint': no vocabulary at {path}; sample from the "
                f"--workdir of a text model's training run"
            )
        if tokenizer.vocab_size > tx.vocab_size:
            raise config_check.ConfigError(
                f"config.text.vocab_size: the captions have {tokenizer.vocab_size} tokens "
                f"(words and 4 specials); raise it to at least that"
            )
        side = prompts.TextSide(tokenizer)
        words = list(tokenizer.words)
    elif tx.encoder == "clip":
        module, params, _ = clip.load(tx.pretrained_dir)
        tok = tokenizer_lib.ClipTokenizer(tx.tokenizer_dir, tx.max_length)
        side = prompts.TextSide(tok, prompts.frozen_encoder(TextEncoder(module, tok), params))
        words = None
    else:
        directory = tx.pretrained_dir or None
        module, params, _ = pretrained.load_minilm(directory)
        folder = directory or pretrained.find_minilm_dir()
        tok = tokenizer_lib.PretrainedTokenizer(
            os.path.join(folder, "tokenizer.json"), tx.max_length
        )
        side = prompts.TextSide(tok, prompts.frozen_encoder(TextEncoder(module, tok), params))
        words = None
    if table is not None and jax.process_index() == 0 and not saved:
        with open(path + ".tmp", "w") as f:
            json.dump({"words": words, "grid_prompts": grid}, f)
        os.replace(path + ".tmp", path)
    return side, grid


def _read_text_file(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise config_check.ConfigError(f"{path} is corrupt ({err}); delete it to rebuild") from None


def optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    kw = dict(
        schedule=o.lr_schedule, decay_steps=config.train.num_steps, final_lr_ratio=o.final_lr_ratio
    )
    tx = train_state.make_optimizer(
        o.lr, o.warmup_steps, o.weight_decay, o.b1, o.b2, o.grad_clip, **kw
    )
    if config.task != "autoencoder":
        return tx
    a = config.autoencoder
    disc_tx = None
    if a.disc_weight > 0:  # Adam β = (0.5, 0.9) for the GAN, as taming-transformers and LDM
        lr = a.disc_lr or o.lr
        disc_tx = train_state.make_optimizer(lr, o.warmup_steps, 0.0, 0.5, 0.9, o.grad_clip, **kw)
    return ae_steps.make_optimizer(tx, disc_tx)


def discriminator(config) -> PatchDiscriminator | None:
    a = config.autoencoder
    if config.task != "autoencoder" or a.disc_weight <= 0:
        return None
    return PatchDiscriminator(a.disc_channels, a.disc_layers, min(a.num_groups, a.disc_channels))


def schedule(config) -> schedules.Schedule:
    df = config.diffusion
    kw = {k: df.get(k, 0.0) for k in ("beta_start", "beta_end")}
    kw = {k: v for k, v in kw.items() if v}  # 0: the schedule's own
    return schedules.make_schedule(
        df.schedule,
        df.num_steps,
        zero_terminal_snr=df.zero_terminal_snr,
        snr_scale=df.get("snr_scale", 1.0),
        **kw,
    )


def timestep_table(config, num_train_steps: int) -> np.ndarray:
    """The sampler's `samplers.timestep_table` for the config's steps, spacing and ends."""
    s = config.sampler
    return samplers.timestep_table(
        num_train_steps,
        s.steps,
        s.spacing,
        s.max_steps,
        offset=s.get("steps_offset", 0),
        alpha_to_one=s.get("set_alpha_to_one", True),
    )


def loss_kwargs(config) -> dict:
    df = config.diffusion
    return dict(
        target=df.target,
        loss=df.loss,
        learned_variance=df.learned_variance,
        variance=config.sampler.variance,
        vlb_weight=df.vlb_weight,
        min_snr_gamma=df.min_snr_gamma,
    )


def prediction(config) -> samplers.Prediction:
    s = config.sampler
    df = config.diffusion
    return samplers.Prediction(df.target, df.learned_variance, s.clip_x0, s.dynamic_threshold)


def images_of(
    source, image_size: int, channels: int, labels: list | None = None, resize: str = "bicubic"
):
    """`(lo, hi) -> float32 images [hi - lo, S, S, C]` of a source's examples lo..hi-1 (resized
    with the `resize` filter); their labels are appended to `labels` when it is given."""

    def read(lo, hi):
        records = source.__getitems__(range(lo, hi))
        if labels is not None:
            labels.extend(r["label"] for r in records)
        return np.stack(
            [data.preprocess_image(r["image"], image_size, channels, resize) for r in records]
        )

    return read


def open_split(config, split: str):
    """The dataset split; on several processes, process 0 prepares it while the others wait."""
    d = config.data
    load = lambda: data.load_source(d.name, split, data_dir(config), folder=d.folder or None)
    if jax.process_count() == 1:
        return load()
    source = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"diffjax: dataset {d.name} {split} ready")
    return source if source is not None else load()


def data_dir(config) -> str:
    d = config.data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return os.path.expanduser(d)


def check_dataset_labels(config, source) -> None:
    """`model.num_classes` against the dataset's ClassLabel, before anything compiles."""
    config_check.check_labels(config, source.num_classes, source.has_labels)


class Setup:
    """Everything the modes share, built from the config (only the top floor reads configs)."""

    def __init__(self, config: ml_collections.ConfigDict):
        config_check.check_config(config)
        self.config = config
        self.mesh = mesh(config)
        d = config.data
        self.pixel_shape = (d.image_size, d.image_size, d.channels)
        # A latent model's frozen autoencoder (None in pixel space): the U-Net then sees latents.
        self.codec = latent_setup.open_codec(config, self.mesh)
        self.image_shape = self.pixel_shape
        if self.codec is not None:
            with config_check.network_shapes(config, "autoencoder"):
                self.codec.module.check_shapes(self.pixel_shape)
            self.image_shape = self.codec.module.latent_shape(self.pixel_shape)
        self.model = model(config, self.image_shape[-1] if self.codec else 0)
        self.discriminator = discriminator(config)
        self.conditioner = conditioner(config, self.image_shape)
        self.tx = optimizer(config)
        self.schedule = schedule(config)
        root = jax.random.key(config.seed)
        self.init_key, self.train_key, self.sample_key, self.eval_key = jax.random.split(root, 4)
        self.init_params = None
        if config.task == "autoencoder":
            self.init_params = ae_steps.init_params_fn(
                self.model, self.discriminator, self.image_shape
            )
        section = "autoencoder" if config.task == "autoencoder" else "model"
        with config_check.network_shapes(config, section):  # the network's own shape rules
            if config.task == "autoencoder":
                self.model.check_shapes(self.image_shape)
            self.abstract_state = self.abstract(self.mesh)
        self.params_sharding = jax.tree.map(lambda a: a.sharding, self.abstract_state.ema_params)
        # What frozen networks contribute to the compiled steps, as an argument (never trained,
        # donated or checkpointed): a text model's caption table (`load_text`), a latent
        # model's autoencoder and latent scale (`set_latent_scale`).
        self._frozen = {}
        self.latent_meta = None  # {"scale", "autoencoder"} of a latent run, once known
        self._decode = None
        self.text_side, self.grid_prompts = None, []
        self._classifier = None
        self._sample_fns, self._noise_fns = {}, {}

    def load_text(self, workdir: str, table: captions_lib.Captions | None = None) -> None:
        """Attaches the text side (`text_side`); with the training captions, also encodes each
        caption once and hands the table to the steps (`frozen`), replicated."""
        self.text_side, self.grid_prompts = text_side(self.config, workdir, table)
        if table is not None:
            encoded = self.text_side.table(list(table.texts))
            self._frozen.update(sharding.from_global(encoded, sharding.replicated(self.mesh)))

    @property
    def frozen(self):
        """The steps' `frozen` argument: None, or a dict of what `load_text` and
        `set_latent_scale` put there."""
        return self._frozen or None

    def set_latent_scale(self, meta: dict) -> None:
        """Attaches a latent run's `{"scale", "autoencoder"}` (from its checkpoint, or estimated
        when it starts): the steps then encode with, and sampling decodes with, this scale."""
        if meta["autoencoder"] != self.codec.fingerprint:
            raise latent_setup.LatentError(
                f"config.latent: the checkpoint was trained on another autoencoder than "
                f"{self.codec.origin}; point config.latent at the one it was trained with"
            )
        self.latent_meta = dict(meta)
        self._frozen["autoencoder"] = self.codec.params
        rep = sharding.replicated(self.mesh)
        self._frozen["latent_scale"] = jax.device_put(np.float32(meta["scale"]), rep)

    @property
    def to_x0(self):
        """A latent model's `(batch, frozen, key) -> x_0`: the scaled latents of the batch, a
        fresh draw from the posterior each time (from the cache's mean and std, or by encoding
        the images); None in pixel space (x_0 is the image)."""
        return None if self.codec is None else latent_setup.make_to_x0(self.codec.module)

    def decode(self, x):
        """Model outputs → images in [-1, 1]: a latent model's are decoded (after dividing by
        the scale); pixel models' pass through."""
        if self.codec is None:
            return x
        if self._decode is None:
            self._decode = latent_setup.make_decode_fn(self.codec.module, self.mesh)
        return self._decode(self.codec.params, self._frozen["latent_scale"], x)

    def _state_kwargs(self) -> dict:
        return dict(
            num_timesteps=self.schedule.num_steps,
            example_cond=self.conditioner.example(),
            init_params=self.init_params,
        )

    def abstract(self, mesh: jax.sharding.Mesh) -> train_state.TrainState:
        return train_state.abstract_train_state(
            self.model, self.tx, self.image_shape, mesh, **self._state_kwargs()
        )

    def create_state(self) -> train_state.TrainState:
        return train_state.create_train_state(
            self.model, self.tx, self.image_shape, self.init_key, self.mesh, **self._state_kwargs()
        )

    @property
    def label_classes(self) -> int:
        """Classes a sample can be asked for: the model's, or else a guiding classifier's."""
        if self.conditioner.num_classes:
            return self.conditioner.num_classes
        if self.config.sampler.classifier_workdir:
            return self.classifier()[0].classifier_classes
        return 0

    def classifier(self):
        """(module, EMA params) of the guiding classifier (`sampler.classifier_*`), loaded once."""
        if self._classifier is None:
            s = self.config.sampler
            cls_setup = Setup(cli.load_config_file(s.classifier_config))
            if cls_setup.config.task != "classifier":
                raise config_check.ConfigError(
                    f"config.sampler.classifier_config: {s.classifier_config} is not a "
                    f"classifier's config (its task is {cls_setup.config.task!r})"
                )
            ckpt = checkpoint.Checkpointer(
                os.path.join(s.classifier_workdir, "checkpoints"), max_to_keep=None
            )
            try:
                state, _, _ = ckpt.restore(cls_setup.abstract(self.mesh))
            finally:
                ckpt.close()
            self._classifier = (cls_setup.model, state.ema_params)
        return self._classifier

    def sample_program(self, sampler=None, pred=None, progress=None, hook=None, jumps=False):
        """`sampling.make_sample_fn` of this model with the config's sampler settings (variance,
        conditioner, classifier), `sampler`/`pred` replacing the config's; an edit's `hook`
        and `jumps` pass through. Call it with `guidance_args()`."""
        s = self.config.sampler
        return sampling.make_sample_fn(
            self.model,
            self.schedule,
            self.mesh,
            sampler=sampler or s.name,
            pred=pred or prediction(self.config),
            variance=s.variance,
            conditioner=self.conditioner,
            progress=progress,
            params_sharding=self.params_sharding,
            classifier=self.classifier()[0] if s.classifier_workdir else None,
            hook=hook,
            jumps=jumps,
        )

    def guidance_args(self) -> dict:
        """The config's guidance keywords of a `sample_program` call (rescale, classifier)."""
        s = self.config.sampler
        return dict(
            guidance_rescale=s.guidance_rescale,
            classifier_params=self.classifier()[1] if s.classifier_workdir else None,
            classifier_scale=s.classifier_scale,
        )

    def sample_fn(self, batch_size: int, progress=None):
        """`(params, key, cond) -> samples [batch_size, H, W, C]` with the config's sampler,
        steps, spacing, η and guidance; x_T is drawn from `key`, the sampler's noise from a key
        split off it. Without a progress callback the program is built once (per batch size).
        """
        s = self.config.sampler
        fn = self._sample_fns.get(batch_size) if progress is None else None
        if fn is None:
            fn = self.sample_program(progress=progress)
            if progress is None:
                self._sample_fns[batch_size] = fn
        if batch_size not in self._noise_fns:
            shape = (batch_size, *self.image_shape)
            self._noise_fns[batch_size] = sampling.make_noise_fn(self.mesh, shape)
        noise = self._noise_fns[batch_size]
        table = timestep_table(self.config, self.schedule.num_steps)

        def sample(params, key, cond: Cond, null_cond: Cond | None = None):
            noise_key, loop_key = jax.random.split(key)
            x_T = noise(noise_key)
            return fn(params, x_T, cond, loop_key, table, s.steps, s.eta, s.guidance_scale,
                      null_cond=null_cond, **self.guidance_args())  # fmt: skip

        return sample

    def labels_cond(self, labels: np.ndarray) -> Cond:
        """The condition for host labels [B], as global arrays split over the mesh."""
        c = Cond(label=np.asarray(labels, np.int32)) if self.label_classes else Cond()
        return sharding.from_global(c, sharding.batch_sharded(self.mesh))

    def prompt_cond(self, side: prompts.TextSide, texts, labels=None) -> Cond:
        """The condition of B prompts (each encoded once), split over the mesh."""
        context, mask = side.context(list(texts))
        label = None if labels is None else np.asarray(labels, np.int32)
        c = Cond(label=label, context=context, context_mask=mask)
        return sharding.from_global(c, sharding.batch_sharded(self.mesh))
