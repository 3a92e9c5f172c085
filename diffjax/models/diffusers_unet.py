"""diffusers' `UNet2DModel` (the DDPM checkpoints' network) ↔ diffjax's UNet: config and weights.

The two networks are the same function (Ho et al. 2020, Appendix B) under different names:
diffusers' `down_blocks.{i}.resnets.{j}` is the UNet's `ResBlock_{k}` in creation order, and so
on. `module_names` pairs them by walking both in the order the UNet builds its blocks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.cond import Cond
from diffjax.models import diffusers_io as io
from diffjax.models.layers import ShapeError
from diffjax.models.pretrained import PretrainedError
from diffjax.models.unet import UNet

CLASS_NAME = "UNet2DModel"
CONDITIONED = "UNet2DConditionModel"  # Stable Diffusion's: cross-attention on text
# Settings the UNet implements, at diffusers' defaults: anything else is refused by name.
REQUIRED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
}
REQUIRED_CONDITIONED = {
    **{k: v for k, v in REQUIRED.items() if k != "mid_block_type"},
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None,
}
DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type → has attention
UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
DOWN_CONDITIONED = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_CONDITIONED = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
# Inside the UNet's blocks (flax's automatic names) → diffusers' names.
RESNET = {
    "GroupNorm_0": "norm1",
    "Conv_0": "conv1",
    "Dense_0": "time_emb_proj",
    "GroupNorm_1": "norm2",
    "Conv_1": "conv2",
    "Conv_2": "conv_shortcut",
}
ATTENTION = {"GroupNorm_0": "group_norm", "out": "to_out.0"}  # and qkv: to_q, to_k, to_v
RESAMPLE = {"Conv_0": "conv"}
TOP = {
    "Conv_0": "conv_in",
    # `Dense(silu(Dense(emb)))` constructs the outer Dense first, so it is Dense_0.
    "Dense_0": "time_embedding.linear_2",
    "Dense_1": "time_embedding.linear_1",
    "GroupNorm_0": "conv_norm_out",
    "Conv_1": "conv_out",
}
INNER = {"ResBlock": RESNET, "AttentionBlock": ATTENTION, "Downsample": RESAMPLE}
INNER["Upsample"] = RESAMPLE
# Inside a SpatialTransformer the names are diffusers' already, but for these.
TRANSFORMER = {"to_out": "to_out.0", "ff.proj": "ff.net.0.proj", "ff.out": "ff.net.2"}


def _levels(config: dict, path: Path, down_types: dict, up_types: dict) -> list[bool]:
    """Whether each level has attention, from down_block_types (up_block_types must mirror)."""
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    for key, types, known in (
        ("down_block_types", down, down_types),
        ("up_block_types", up, up_types),
    ):
        unknown = [t for t in types if t not in known]
        if unknown or not types:
            raise PretrainedError(
                f"{path}: {key}={types!r} is not supported (each must be one of {sorted(known)})"
            )
    attention = [down_types[t] for t in down]
    if [up_types[t] for t in reversed(up)] != attention or len(up) != len(down):
        raise PretrainedError(
            f"{path}: up_block_types={up!r} do not mirror down_block_types={down!r} (diffjax's "
            f"U-Net attends at the same sizes on both sides)"
        )
    return attention


def from_config(config: dict, path: Path) -> dict[str, Any]:
    """A UNet2DModel or UNet2DConditionModel config.json → {"model": UNet fields,
    "image_size", "in_channels", "out_channels", "linear_projection"}; a setting the UNet does
    not implement is refused by name."""
    conditioned = config.get("_class_name") == CONDITIONED
    io.check_settings(path, config, REQUIRED_CONDITIONED if conditioned else REQUIRED)
    tables = (DOWN_CONDITIONED, UP_CONDITIONED) if conditioned else (DOWN, UP)
    attention = _levels(config, path, *tables)
    widths = list(config.get("block_out_channels", ()))
    if len(widths) != len(attention) or not widths:
        raise PretrainedError(
            f"{path}: block_out_channels={widths!r} needs one width per down block "
            f"({len(attention)})"
        )
    base = widths[0]
    if any(w % base for w in widths):
        raise PretrainedError(
            f"{path}: block_out_channels={widths!r} is not supported: every width must be a "
            f"multiple of the first (diffjax's levels are base_channels x channel_mults)"
        )
    groups = config.get("norm_num_groups", 32)
    if config.get("attn_norm_num_groups") not in (None, groups):
        raise PretrainedError(
            f"{path}: attn_norm_num_groups={config['attn_norm_num_groups']!r} is not supported "
            f"(want None: the attention's GroupNorm has norm_num_groups={groups} groups)"
        )
    if config.get("downsample_padding", 1) not in (0, 1):
        raise PretrainedError(
            f"{path}: downsample_padding={config['downsample_padding']!r} is not supported "
            "(want 0 or 1)"
        )
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise PretrainedError(
            f"{path}: sample_size={size!r} is not supported (want one int: square images)"
        )
    model = dict(
        base_channels=base,
        channel_mults=tuple(w // base for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(attention) if a),
        mid_attention=bool(config.get("add_attention", True)),
        head_dim=config.get("attention_head_dim", 8),
        dropout=float(config.get("dropout", 0.0)),
        num_groups=groups,
        norm_eps=float(config.get("norm_eps", 1e-5)),
        time_freq_shift=float(config.get("freq_shift", 0)),
        time_flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        downsample_padding=int(config.get("downsample_padding", 1)),
    )
    if conditioned:
        model.update(_cross_attention(config, path, widths, attention))
    return dict(
        model=model,
        image_size=size,
        in_channels=config.get("in_channels", 4 if conditioned else 3),
        out_channels=config.get("out_channels", 4 if conditioned else 3),
        linear_projection=bool(config.get("use_linear_projection", False)),
    )


def _cross_attention(config: dict, path: Path, widths: list, attention: list) -> dict:
    """The UNet fields of a UNet2DConditionModel's transformer blocks."""
    for key in ("cross_attention_dim", "transformer_layers_per_block"):
        if not isinstance(config.get(key, 1), int):
            raise PretrainedError(f"{path}: {key}={config[key]!r} is not supported (want one int)")
    # SD 1.x's attention_head_dim is the number of heads (diffusers keeps the misnomer); SD 2.x
    # gives one per level, with the same channels per head at every level.
    heads = config.get("attention_head_dim", 8)
    if isinstance(heads, int):
        fields = dict(num_heads=heads, head_dim=None)
    else:
        dims = {w // h for w, h, a in zip(widths, heads, attention, strict=True) if a}
        dims.add(widths[-1] // heads[-1])  # the middle block's
        if len(dims) != 1:
            raise PretrainedError(
                f"{path}: attention_head_dim={heads!r} is not supported (diffjax needs the same "
                "channels per head at every level, or the same number of heads)"
            )
        fields = dict(num_heads=None, head_dim=dims.pop())
    return dict(
        fields,
        context_dim=config.get("cross_attention_dim", 1280),
        transformer_depth=config.get("transformer_layers_per_block", 1),
        mid_attention=True,
    )


def to_config(
    model: dict[str, Any], image_size: int, in_channels: int, out_channels: int
) -> dict[str, Any]:
    """diffjax UNet fields → a UNet2DModel config.json, or a UNet2DConditionModel one for a
    text-conditioned U-Net (the reverse of `from_config`)."""
    if model.get("num_classes") or model.get("classifier_classes") or model.get("pooled_context"):
        raise PretrainedError(
            "diffusers has no layout for this U-Net's num_classes, classifier_classes or "
            "pooled_context"
        )
    if model.get("patch_size", 1) != 1:
        raise PretrainedError(
            f"diffusers' U-Nets have no patch folding: this U-Net has model.patch_size="
            f"{model['patch_size']}"
        )
    widths = [model["base_channels"] * m for m in model["channel_mults"]]
    attention = [image_size // 2**i in model["attention_resolutions"] for i in range(len(widths))]
    conditioned = bool(model.get("context_dim"))
    down, up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if conditioned else ("", "")
    config = dict(
        _class_name=CONDITIONED if conditioned else CLASS_NAME,
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=widths,
        layers_per_block=model["num_res_blocks"],
        down_block_types=[(down or "AttnDownBlock2D") if a else "DownBlock2D" for a in attention],
        up_block_types=[(up or "AttnUpBlock2D") if a else "UpBlock2D" for a in attention[::-1]],
        dropout=model.get("dropout", 0.0),
        norm_num_groups=model["num_groups"],
        norm_eps=model["norm_eps"],
        freq_shift=model.get("time_freq_shift", 1.0),
        flip_sin_to_cos=model.get("time_flip_sin_to_cos", False),
        downsample_padding=model.get("downsample_padding", 0),
    )
    if not conditioned:
        config.update(
            add_attention=model["mid_attention"], attention_head_dim=model.get("head_dim")
        )
        return {**config, **REQUIRED}
    if not model["mid_attention"]:
        raise PretrainedError("a UNet2DConditionModel always attends in its middle block")
    heads = model.get("num_heads") or [w // model["head_dim"] for w in widths]
    config.update(
        cross_attention_dim=model["context_dim"],
        attention_head_dim=heads,
        transformer_layers_per_block=model.get("transformer_depth", 1),
        use_linear_projection=True,
    )
    return {**config, **REQUIRED_CONDITIONED}


def module_names(unet: UNet, image_size: int) -> dict[str, str]:
    """The UNet's block names (`ResBlock_3`, `Upsample_0`, …) → diffusers' module prefixes, in
    the order both networks build their blocks."""
    levels = len(unet.channel_mults)
    attends = [image_size // 2**i in unet.attention_resolutions for i in range(levels)]
    attention = "SpatialTransformer" if unet.context_dim else "AttentionBlock"
    counts: dict[str, int] = {}
    names: dict[str, str] = {}

    def add(kind: str, prefix: str) -> None:
        counts[kind] = counts.get(kind, -1) + 1
        names[f"{kind}_{counts[kind]}"] = prefix

    for i in range(levels):
        for j in range(unet.num_res_blocks):
            add("ResBlock", f"down_blocks.{i}.resnets.{j}")
            if attends[i]:
                add(attention, f"down_blocks.{i}.attentions.{j}")
        if i != levels - 1:
            add("Downsample", f"down_blocks.{i}.downsamplers.0")
    add("ResBlock", "mid_block.resnets.0")
    if unet.mid_attention:
        add(attention, "mid_block.attentions.0")
    add("ResBlock", "mid_block.resnets.1")
    for i in reversed(range(levels)):
        u = levels - 1 - i
        for j in range(unet.num_res_blocks + 1):
            add("ResBlock", f"up_blocks.{u}.resnets.{j}")
            if attends[i]:
                add(attention, f"up_blocks.{u}.attentions.{j}")
        if i != 0:
            add("Upsample", f"up_blocks.{u}.upsamplers.0")
    return names


def _tensors_of(path: tuple[str, ...], blocks: dict[str, str]) -> tuple[str, str]:
    """A UNet param path → (diffusers module name, flax leaf); the attention's fused qkv
    comes back as module "<prefix>.qkv" (three tensors, see `_read` and `_write`)."""
    *modules, leaf = path
    if modules[0] in TOP and len(modules) == 1:
        return TOP[modules[0]], leaf
    if modules[0] not in blocks or len(modules) < 2:
        raise PretrainedError(f"the UNet has a parameter {'/'.join(path)} with no diffusers name")
    kind = modules[0].rsplit("_", 1)[0]
    if kind == "SpatialTransformer":
        sub = ".".join(
            re.sub(r"^transformer_blocks_(\d+)$", r"transformer_blocks.\1", m) for m in modules[1:]
        )
        for ours, theirs in TRANSFORMER.items():
            sub = re.sub(rf"(^|\.){re.escape(ours)}$", rf"\g<1>{theirs}", sub)
    else:
        sub = "qkv" if modules[1] == "qkv" else INNER[kind][modules[1]]
    return f"{blocks[modules[0]]}.{sub}", leaf


def _read(reader: io.TensorReader, name: str, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    """The flax value of one UNet param from the diffusers tensors."""
    if name.endswith(".qkv"):  # kernel [C, 3, heads, d] ← to_{q,k,v}.weight [heads·d, C]
        prefix, parts = name[: -len(".qkv")], []
        for p in ("to_q", "to_k", "to_v"):
            if leaf == "kernel":
                parts.append(reader.get(f"{prefix}.{p}.weight", (shape[2] * shape[3], shape[0])).T)
            else:
                parts.append(reader.get(f"{prefix}.{p}.bias", (shape[1] * shape[2],)))
        stacked = np.stack(parts, axis=1 if leaf == "kernel" else 0)
        return stacked.reshape(shape)
    if name.endswith(".to_out.0") and leaf == "kernel" and len(shape) == 3:  # [heads, d, C]
        value = reader.get(f"{name}.weight", (shape[2], shape[0] * shape[1]))
        return value.T.reshape(shape)
    full, stored = f"{name}.{io.torch_name(leaf)}", io.torch_shape(leaf, shape)
    if leaf == "kernel" and len(shape) == 2 and reader.shape_of(full) == (*stored, 1, 1):
        return reader.get(full, (*stored, 1, 1))[:, :, 0, 0].T  # SD 1.x's 1x1-conv proj_in/out
    return io.to_flax(reader.get(full, stored), leaf)


def _write(name: str, leaf: str, value: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """The diffusers tensors of one UNet param (the inverse of `_read`)."""
    if name.endswith(".qkv"):
        prefix = name[: -len(".qkv")]
        for i, p in enumerate(("to_q", "to_k", "to_v")):
            if leaf == "kernel":
                out[f"{prefix}.{p}.weight"] = value[:, i].reshape(value.shape[0], -1).T
            else:
                out[f"{prefix}.{p}.bias"] = value[i].reshape(-1)
    elif name.endswith(".to_out.0") and leaf == "kernel" and value.ndim == 3:
        out[f"{name}.weight"] = value.reshape(-1, value.shape[-1]).T
    else:
        out[f"{name}.{io.torch_name(leaf)}"] = io.to_torch(value, leaf)


def load(
    directory: str | Path, dtype: Any = jnp.float32, shardings: Any = None
) -> tuple[UNet, dict, dict[str, Any]]:
    """Loads a diffusers `UNet2DModel` or `UNet2DConditionModel` directory (config.json +
    safetensors) as a UNet.

    Args:
      directory: as diffusers' `save_pretrained(..., safe_serialization=True)` writes it (the
        `unet/` folder of a DDPM or Stable Diffusion pipeline). Input channels beyond the
        output's (SD inpainting's 9 = 4 + 5) are the UNet's `cond.concat`.
      dtype: the module's compute dtype; params are float32.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params: each tensor
        is placed there as soon as it is read, so host memory holds the params plus about one
        tensor.

    Returns:
      (module, params, fields): `fields` is `from_config`'s dict.

    Raises:
      PretrainedError: a missing or unreadable file, an unsupported setting, or a missing,
        unexpected or mis-shaped tensor; the message names it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"U-Net directory {directory} does not exist")
    path = directory / io.CONFIG_FILE
    config = io.read_json(path, (CLASS_NAME, CONDITIONED))
    fields = from_config(config, path)
    file = io.weights_file(directory, config["_class_name"])
    module = UNet(**fields["model"], out_channels=fields["out_channels"], dtype=dtype)
    try:
        shapes = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module, fields))[
            "params"
        ]
    except ShapeError as err:
        raise PretrainedError(f"{path}: {err}") from err
    blocks = module_names(module, fields["image_size"])
    shardings = shardings or jax.tree.map(lambda _: None, shapes)

    def convert(p, want, where):
        name, leaf = _tensors_of(tuple(k.key for k in p), blocks)
        value = _read(reader, name, leaf, want.shape).astype(want.dtype)
        return jax.device_put(value, where) if where is not None else jnp.asarray(value)

    with io.TensorReader(file) as reader:
        params = jax.tree_util.tree_map_with_path(convert, shapes, shardings)
        reader.check_all_used()
    return module, params, fields


def example_inputs(module: UNet, fields: dict) -> tuple:
    """Abstract (x, t, cond) of batch 1 that `module.init` takes for `from_config`'s fields."""
    size, c_in, c_out = fields["image_size"], fields["in_channels"], fields["out_channels"]
    c_x = c_out if c_in > c_out else c_in  # more inputs than outputs: the rest is cond.concat
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    cond = Cond(
        context=spec(1, 1, module.context_dim) if module.context_dim else None,
        context_mask=spec(1, 1, dtype=jnp.bool_) if module.context_dim else None,
        concat=spec(1, size, size, c_in - c_x) if c_in > c_x else None,
    )
    return spec(1, size, size, c_x), spec(1, dtype=jnp.int32), cond


def save(directory: str | Path, module: UNet, params: dict, image_size: int) -> None:
    """Writes a UNet and its params as a diffusers `UNet2DModel` (or, text-conditioned,
    `UNet2DConditionModel`) directory, in float32."""
    fields = {f: getattr(module, f) for f in module.__dataclass_fields__ if f != "parent"}
    in_channels = int(params["Conv_0"]["kernel"].shape[2])
    out_channels = int(params[max(k for k in params if k.startswith("Conv_"))]["bias"].shape[0])
    config = to_config(fields, image_size, in_channels, out_channels)
    blocks = module_names(module, image_size)
    tensors: dict[str, np.ndarray] = {}
    for p, value in jax.tree_util.tree_leaves_with_path(params):
        name, leaf = _tensors_of(tuple(k.key for k in p), blocks)
        _write(name, leaf, np.asarray(jax.device_get(value), np.float32), tensors)
    io.write_model(Path(directory), config, tensors)
