"""Data input: tfds builders (digits, image folders), one loader for them and the tfds catalog, and
the grain pipeline that turns a source into sharded, shuffled, checkpointable batches."""

from diffjax.data.digits import Digits
from diffjax.data.errors import DatasetError
from diffjax.data.image_folder import ImageFolder
from diffjax.data.photos import Photos
from diffjax.data.pipeline import (
    RESIZE,
    TrainIterator,
    kept_bytes,
    make_eval_iterator,
    make_train_iterator,
    preprocess_image,
    upsampling_warning,
)
from diffjax.data.sources import RecordSource, get_builder, load_source, num_classes

__all__ = [
    "RESIZE",
    "DatasetError",
    "Digits",
    "ImageFolder",
    "Photos",
    "RecordSource",
    "TrainIterator",
    "get_builder",
    "kept_bytes",
    "load_source",
    "make_eval_iterator",
    "make_train_iterator",
    "num_classes",
    "preprocess_image",
    "upsampling_warning",
]
