"""Image files in, image files out: `--mode=edit`, every edit of `editor.Editor`."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from diffjax import editing, image_io, latent_setup
from diffjax.editor import EditError, Editor
from diffjax.image_io import ImageFileError

log = logging.getLogger(__name__)

EDITS = ("img2img", "inpaint", "outpaint", "transfer", "upscale")
METHODS = ("repaint", "trained")


def check_request(edit: str, *, mask=None, strength=None, extend=None, method="repaint",
                  target_workdir=None, jump_length=1, resamplings=1,
                  label=None) -> None:  # fmt: skip
    """Refuses an edit's missing or misplaced arguments before anything is loaded."""
    if edit not in EDITS:
        raise EditError(f"--edit={edit!r}: choose one of {EDITS}")
    needs = {"inpaint": ("mask", mask), "outpaint": ("extend", extend),
             "transfer": ("target_workdir", target_workdir)}  # fmt: skip
    if edit in needs and not needs[edit][1]:
        raise EditError(f"--edit={edit} needs --{needs[edit][0]}")
    given = {"mask": mask, "extend": extend, "target_workdir": target_workdir}
    for name, value in given.items():
        if value and needs.get(edit, (None,))[0] != name:
            raise EditError(f"--{name} is not used by --edit={edit}")
    for name, value in (("strength", strength), ("label", "auto" if label == "auto" else None)):
        if value is not None and edit not in ("img2img", "transfer"):
            raise EditError(f"--{name}={value} is for --edit=img2img/transfer, not --edit={edit}")
    try:  # the math's own range checks, as bad input
        if strength is not None:
            editing.sdedit_steps(1, strength)
        if extend:
            editing.parse_extend(extend)
    except ValueError as err:
        raise EditError(str(err)) from None
    if method not in METHODS:
        raise EditError(f"--method={method!r}: choose one of {METHODS}")
    if method != "repaint" and edit not in ("inpaint", "outpaint"):
        raise EditError(f"--method is for --edit=inpaint/outpaint, not --edit={edit}")
    if jump_length < 1 or resamplings < 1:
        raise EditError(f"--jump_length and --resamplings must be >= 1 (got {jump_length}, "
                        f"{resamplings})")  # fmt: skip


def edit_files(config, workdir: str, edit: str, inputs: list[str], output: str, *, mask=None,
               strength=None, extend=None, method="repaint", jump_length=1, resamplings=1,
               target_workdir=None, label=None, prompt=None, step=None,
               overwrite=False) -> list[str]:  # fmt: skip
    """Edits each input image file with the workdir's model and writes a PNG per input
    (`output` is the file for one input, a directory for several). Returns the paths written.

    Inputs are read as the model's channels (`image_io.read_image`) and must have its size (a
    super-resolution model's low-res size for upscale), or its aspect ratio (then resized, with
    a warning); outpainting takes any size. The mask
    (inpaint) must have the input's size: white = regenerate, black = keep.
    """
    check_request(edit, mask=mask, strength=strength, extend=extend, method=method,
                  target_workdir=target_workdir, jump_length=jump_length,
                  resamplings=resamplings, label=label)  # fmt: skip
    outs = image_io.output_paths(inputs, output, f"_{edit}", overwrite)
    channels = config.data.channels
    images = [image_io.read_image(p, channels) for p in inputs]
    masks = None
    if mask:
        masks = image_io.read_mask(mask)
        for path, im in zip(inputs, images, strict=True):
            if masks.shape[:2] != im.shape[:2]:
                raise ImageFileError(
                    f"--mask {mask} is {masks.shape[0]}x{masks.shape[1]}, the input {path} "
                    f"{im.shape[0]}x{im.shape[1]}: they must match"
                )
    target = None
    if edit == "transfer":
        if not os.path.isdir(target_workdir):
            raise EditError(f"--target_workdir {target_workdir} is not a run's workdir")
        target = Editor.load(latent_setup.read_run_config(target_workdir), target_workdir)
    editor = Editor.load(config, workdir, step)
    key = jax.random.key(config.seed)
    results = _run(editor, edit, inputs, images, masks, key, strength=strength, extend=extend,
                   method=method, jump_length=jump_length, resamplings=resamplings, target=target,
                   label=label, prompt=prompt)  # fmt: skip
    for out, path in zip(results, outs, strict=True):
        image_io.write_image(out, path)
    log.info("wrote %s", ", ".join(outs))
    return outs


def _run(editor: Editor, edit, inputs, images, masks, key, *, strength, extend, method,
         jump_length, resamplings, target, label, prompt) -> list[np.ndarray]:  # fmt: skip
    cond = {"label": label, "prompt": prompt}
    how = {"method": method, "jump_length": jump_length, "resamplings": resamplings, **cond}
    if edit == "outpaint":
        sides = editing.parse_extend(extend)
        keys = [jax.random.fold_in(key, i) for i in range(len(images))]
        return [editor.outpaint(im, sides, k, **how) for im, k in zip(images, keys, strict=True)]
    size = editor.low_res_size if edit == "upscale" else editor.image_size
    resize = editor.setup.config.data.resize  # as the model saw its training images
    fitted = [
        image_io.fit(im, size, f"--input {p}", resize) for p, im in zip(inputs, images, strict=True)
    ]
    batch = np.stack(fitted)
    if edit == "upscale":
        return list(editor.upscale(batch, key, **cond))
    if edit == "img2img":
        return list(editor.img2img(batch, 0.6 if strength is None else strength, key, **cond))
    if edit == "transfer":
        return list(
            editor.transfer(batch, target, strength=1.0 if strength is None else strength, **cond)
        )
    m = image_io.fit(masks, size, "--mask", "nearest")
    m = np.broadcast_to(m, (len(batch), *m.shape))
    return list(editor.inpaint(batch, m, key, **how))
