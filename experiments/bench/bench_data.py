"""The input pipeline's cost per batch, with and without the examples kept in memory.

    python experiments/bench/bench_data.py [--data_dir DIR] [--batches 300]

Reads the embedded digits train split (prepared on first use) through
`data.make_train_iterator` as configs/digits.py trains on it (batch 64, 16x16, nearest) and as
the earlier recipe did (bicubic), with `cache_mib=0` (every example read, decoded and resized
each epoch) and with the default `data.cache_mib` (each once). The first epochs are skipped, so
the kept rows show the steady state. On a 2-core CPU the pipeline's threads take their time
from the train step's, so its cost per batch is time the step loses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from bench_text import _cpu_model  # noqa: E402 - the same CPU line in every table

from configs import default, digits  # noqa: E402
from diffjax import build, data  # noqa: E402


def per_batch(source, resize: str, cache_mib: float, batches: int, skip: int) -> float:
    it = data.make_train_iterator(
        source,
        image_size=16,
        channels=1,
        global_batch=64,
        seed=0,
        random_flip=False,
        resize=resize,
        cache_mib=cache_mib,
    )
    for _ in range(skip):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="", help="where tfds datasets live ('' = default)")
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()
    config = digits.get_config()
    config.data.data_dir = args.data_dir
    source = build.open_split(config, config.data.train_split)
    skip = 2 * len(source) // 64 + 1  # past two epochs: every example read once
    cache = default.get_config().data.cache_mib
    print(f"{_cpu_model()}; digits train split: {len(source)} examples, batch 64")
    print("| resize | cache_mib | ms per batch |\n|---|---|---|")
    for resize in ("nearest", "bicubic"):
        for mib in (0.0, cache):
            ms = per_batch(source, resize, mib, args.batches, skip) * 1e3
            print(f"| {resize} | {mib:g} | {ms:.2f} |")


if __name__ == "__main__":
    main()
