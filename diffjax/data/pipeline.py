"""The grain pipeline: records → per-process shard → shuffle → [-1, 1] images → batches, resumable.

A source is any random-access sequence of records {'image': uint8 [H, W, C], 'label': int} (a
`RecordSource` from `load_source`; 'label' may be absent, then 0). Images are center-cropped to a
square, resized with PIL bicubic (antialiased when shrinking) to `image_size`, converted to
`channels` (1: ITU-R 601 luma, 3: gray repeated; alpha dropped) and scaled to float32 [-1, 1].
"""

import functools
import math

import grain
import numpy as np
from PIL import Image

_READ_THREADS = 4  # threads preparing batches ahead when worker_count == 0
_PREFETCH_BATCHES = 4  # batches kept ready per process
_STATE_VERSION = 2
MAX_UPSAMPLING = 2  # images smaller than image_size / this on a side get a warning
# `data.resize`: PIL's filters (bicubic and bilinear antialias when shrinking; box averages).
RESIZE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
}


def preprocess_image(
    image: np.ndarray, image_size: int, channels: int, resize: str = "bicubic"
) -> np.ndarray:
    """Turns one uint8 image into the model's input.

    Args:
      image: uint8 [H, W, C] (C in 1, 3, 4) or [H, W].
      image_size: side S of the square output.
      channels: 1 or 3.
      resize: the filter (`RESIZE`) that brings the centre square to S x S: bicubic by default;
        nearest keeps pixel art (e.g. 8x8 digits at 16x16) as exact blocks.

    Returns:
      float32 [S, S, channels] in [-1, 1].
    """
    return _unit_range(resize_image(image, image_size, channels, resize))


def resize_image(image: np.ndarray, image_size: int, channels: int, resize: str) -> np.ndarray:
    """`preprocess_image` before the scaling: uint8 [S, S, channels]."""
    image = np.asarray(image, np.uint8)
    image = image[..., None] if image.ndim == 2 else image[..., :3]  # drop alpha
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top : top + side, left : left + side]
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.convert("L" if channels == 1 else "RGB")
    if side != image_size:
        pil = pil.resize((image_size, image_size), RESIZE[resize])
    return np.asarray(pil, np.uint8).reshape(image_size, image_size, channels)


def _unit_range(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 127.5 - 1.0


def upsampling_warning(source, image_size: int, probe: int = 32) -> str | None:
    """A warning when some images are smaller than image_size / MAX_UPSAMPLING on a side.

    Reads `probe` records spread over the source (a few ms); None when they are all big enough.
    """
    n = len(source)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(probe, n))}) if n else []
    sides = [min(np.shape(source[i]["image"])[:2]) for i in picks]
    if not sides or min(sides) * MAX_UPSAMPLING >= image_size:
        return None
    return (
        f"some images are only {min(sides)} px on their short side: training at image_size="
        f"{image_size} upsamples them {image_size / min(sides):.1f}x (more than "
        f"{MAX_UPSAMPLING}x), so the model learns interpolation blur. Use bigger images or a "
        f"smaller data.image_size (<= {min(sides) * MAX_UPSAMPLING})."
    )


def _example(record, image_size: int, channels: int, captions=None, resize="bicubic") -> dict:
    if "latent_mean" in record:  # an encoded example (`latent.CachedSource`): no image to read
        example = {
            "latent_mean": np.asarray(record["latent_mean"][0], np.float32),
            "latent_std": np.asarray(record["latent_std"][0], np.float32),
            "label": np.int32(record.get("label", 0)),
        }
        if len(record["latent_mean"]) > 1:  # the mirror image's latents, for `_random_flip`
            example["flipped_mean"] = np.asarray(record["latent_mean"][1], np.float32)
            example["flipped_std"] = np.asarray(record["latent_std"][1], np.float32)
        if "image" in record:  # a latent spatial model's condition is made from the image
            example["image"] = resize_image(record["image"], image_size, channels, resize)
    else:
        image = resize_image(record["image"], image_size, channels, resize)
        example = {"image": image, "label": np.int32(record.get("label", 0))}
    if captions is not None:
        example["caption_choices"] = np.asarray(captions.choices(record), np.int32)
    return example  # its image still uint8: `_scaled` brings it to [-1, 1]


def _scaled(example: dict) -> dict:
    if "image" not in example:
        return example
    return {**example, "image": _unit_range(example["image"])}


class _Kept:
    """The random-access source of `fn(source[i])`, each computed once, when first asked for, and
    kept in memory: later epochs skip reading, decoding and resizing."""

    def __init__(self, source, fn):
        self._source, self._fn = source, fn
        self._kept = [None] * len(source)

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int):
        kept = self._kept[index]
        if kept is None:  # threads may both compute it: the same value either way
            kept = self._kept[index] = self._fn(self._source[index])
        return kept


def kept_bytes(source, image_size: int, channels: int, process_count: int = 1) -> int | None:
    """The memory one process's `_Kept` examples take once every one was read (uint8 images;
    labels and caption choices are small), or None for a source that is already in memory (a
    latent model's encoded examples)."""
    if len(source) and "latent_mean" in source[0]:
        return None
    return math.ceil(len(source) / process_count) * image_size * image_size * channels


def _pick_caption(example: dict, rng: np.random.Generator) -> dict:
    """One of the example's captions, drawn anew each epoch (a pure function of the position)."""
    example = dict(example)
    choices = example.pop("caption_choices")
    example["caption"] = np.int32(choices[rng.integers(len(choices))])
    return example


def _first_caption(example: dict) -> dict:
    example = dict(example)
    example["caption"] = np.int32(example.pop("caption_choices")[0])
    return example


def _random_flip(example: dict, rng: np.random.Generator) -> dict:
    flip = rng.random() < 0.5
    if "latent_mean" in example:  # the encoder's latents of the mirrored image, not a mirror
        example = dict(example)
        mean, std = example.pop("flipped_mean"), example.pop("flipped_std")
        if flip:
            example.update(latent_mean=mean, latent_std=std)
    if flip and "image" in example:
        example = {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only to ask which process this is

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    return process_index, process_count


def _per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} must be a positive multiple of the process count "
            f"{process_count}."
        )
    return global_batch // process_count


def _shard(source, process_index: int, process_count: int) -> grain.MapDataset:
    if len(source) < process_count:
        raise ValueError(f"{len(source)} examples cannot be shared by {process_count} processes.")
    return grain.MapDataset.source(source)[process_index::process_count]


class TrainIterator:
    """Endless batches {'image': float32 [b, S, S, C], 'label': int32 [b]}; b = per-process batch.

    The stream is one endless sequence of examples (this process's shard, reshuffled every epoch)
    cut into batches, and example e is a pure function of (source, seed, e). So the state is the
    position: `get_state()` returns {'version': 2, 'next_example': e, 'next_batch': n,
    'num_examples': N, 'global_batch': B, 'process_count': P, 'seed': s}, a JSON-serializable
    dict, identical on every process and independent of worker_count. `set_state(state)`
    continues with example e, also under another global batch size (the next batch then starts
    where the last one ended); other N, P or seed are an error (the position would mean other
    data). Version-1 states (batch positions only) are read too.
    """

    def __init__(self, examples: grain.MapDataset, batch: int, identity: dict, worker_count: int):
        self._examples = examples
        self._batch = batch
        self._identity = identity
        self._worker_count = worker_count
        self._next_example = 0
        self._next_batch = 0
        self._iterator = None  # started lazily, so set_state before the first batch is free

    def _start(self):
        examples = self._examples[self._next_example :] if self._next_example else self._examples
        batches = examples.batch(self._batch, drop_remainder=True).map(_scaled)
        dataset = batches.to_iter_dataset(
            grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
        )
        if self._worker_count > 0:
            options = grain.MultiprocessingOptions(num_workers=self._worker_count)
            dataset = dataset.mp_prefetch(options)
        return iter(dataset)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._next_batch += 1
        self._next_example += self._batch
        return batch

    def get_state(self) -> dict:
        """The position after the last batch returned, as a JSON-serializable dict."""
        return {
            "version": _STATE_VERSION,
            "next_example": self._next_example,
            "next_batch": self._next_batch,
            **self._identity,
        }

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from `get_state`, possibly through a JSON round trip).

        Raises:
          ValueError: the state belongs to other data (dataset size, process count, seed) or
            to an unknown version.
        """
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(
                f"input pipeline state has version={version!r}; this diffjax reads 1 and "
                f"{_STATE_VERSION}."
            )
        for key in ("num_examples", "process_count", "seed"):
            if state.get(key) != self._identity[key]:
                raise ValueError(
                    f"input pipeline state has {key}={state.get(key)!r}, but this pipeline has "
                    f"{key}={self._identity[key]!r}: the saved position does not apply to it."
                )
        saved_batch = int(state["global_batch"]) // int(state["process_count"])
        self._next_batch = int(state["next_batch"])
        self._next_example = int(state.get("next_example", self._next_batch * saved_batch))
        self._iterator = None


def make_train_iterator(
    source,
    *,
    image_size: int,
    channels: int,
    global_batch: int,
    seed: int,
    random_flip: bool,
    worker_count: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    captions=None,
    resize: str = "bicubic",
    cache_mib: float = 0,
) -> TrainIterator:
    """The training stream: this process's shard, reshuffled every epoch, repeated forever.

    Args:
      source: random-access records {'image': uint8 [H, W, C], 'label': int}.
      image_size: side S of the square images.
      channels: 1 or 3.
      global_batch: batch over all processes; each process yields global_batch // process_count.
      seed: seeds the shuffle (a new order each epoch) and the flips (per epoch and position).
      random_flip: flip each image left-right with probability 1/2.
      worker_count: grain worker processes (0: threads in this process; > 0 needs absl flags
        parsed, i.e. run under absl.app.run, and a `__main__` guard).
      process_index, process_count: this process's shard; default jax.process_index()/count().
      captions: a `data.captions.Captions`: batches then carry 'caption' int32 [b], an index into
        `captions.texts`, drawn per example and epoch among the example's captions.
      resize: the filter to image_size (`preprocess_image`).
      cache_mib: keep every example decoded and resized in memory after its first read when
        this process's share takes at most this many MiB (`kept_bytes`); 0 = never. The stream
        is the same either way; only the work per epoch changes.

    Returns:
      A TrainIterator (see its docstring for the checkpointable state).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    process_index, process_count = _process(process_index, process_count)
    batch = _per_process_batch(global_batch, process_count)
    seeds = np.random.SeedSequence(seed).generate_state(3)
    shuffle_seed, flip_seed, caption_seed = (int(s) for s in seeds)
    example = functools.partial(
        _example, image_size=image_size, channels=channels, captions=captions, resize=resize
    )
    size = kept_bytes(source, image_size, channels, process_count)
    keep = size is not None and size <= cache_mib * 2**20
    if keep:  # examples are pure functions of their records: made before the shuffle instead
        source = _Kept(source, example)
    dataset = _shard(source, process_index, process_count).shuffle(seed=shuffle_seed).repeat()
    if not keep:
        dataset = dataset.map(example)
    if random_flip:
        dataset = dataset.random_map(_random_flip, seed=flip_seed)
    if captions is not None:
        dataset = dataset.random_map(_pick_caption, seed=caption_seed)
    identity = {
        "num_examples": len(source),
        "global_batch": global_batch,
        "process_count": process_count,
        "seed": seed,
    }
    return TrainIterator(dataset, batch, identity, worker_count)


def make_eval_iterator(
    source,
    *,
    image_size: int,
    channels: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    captions=None,
    resize: str = "bicubic",
):
    """One pass over `source` in order (no shuffle, no flip), padded so no example is lost.

    Process p of P reads examples p, p + P, ... in batches of b = batch_size // P (batch_size is
    global, like make_train_iterator's global_batch). Every process yields the same number of
    batches, ceil(ceil(N / P) / b), so collective eval steps line up; the last batches are padded
    with zero images, label 0 and mask False (nothing is dropped). Average a per-example loss as
    sum(loss * mask) / sum(mask) for the exact mean.

    Args:
      source: random-access records {'image': uint8 [H, W, C], 'label': int}.
      image_size: side S of the square images.
      channels: 1 or 3.
      batch_size: batch over all processes; must be a multiple of the process count.
      process_index, process_count: this process's shard; default jax.process_index()/count().
      captions: as in make_train_iterator; each example takes its first caption.
      resize: the filter to image_size (`preprocess_image`).

    Returns:
      An iterator of {'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': bool [b]}
      (and 'caption': int32 [b] with captions).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    process_index, process_count = _process(process_index, process_count)
    batch = _per_process_batch(batch_size, process_count)
    num_batches = math.ceil(math.ceil(len(source) / process_count) / batch)
    dataset = _shard(source, process_index, process_count)
    example = functools.partial(
        _example, image_size=image_size, channels=channels, captions=captions, resize=resize
    )
    dataset = dataset.map(example).map(_scaled)
    if captions is not None:
        dataset = dataset.map(_first_caption)
    dataset = dataset.batch(batch, drop_remainder=False).to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    shape = (image_size, image_size, channels)
    return _padded(dataset, num_batches, batch, shape, captions is not None)


def _padded(dataset, num_batches: int, batch: int, image_shape: tuple[int, ...], captions: bool):
    def empty():
        out = {
            "image": np.zeros((batch, *image_shape), np.float32),
            "label": np.zeros((batch,), np.int32),
            "mask": np.zeros((batch,), bool),
        }
        if captions:
            out["caption"] = np.zeros((batch,), np.int32)
        return out

    produced = 0
    for partial in dataset:
        out, size = empty(), len(partial["label"])
        for k, v in partial.items():
            out[k][:size] = v
        out["mask"][:size] = True
        produced += 1
        yield out
    for _ in range(num_batches - produced):  # this process's shard ran out before the others
        yield empty()
