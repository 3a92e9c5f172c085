"""Cost of conditioning in the train step: none, labels, a jointly trained encoder, frozen MiniLM.

    python experiments/bench/bench_text.py [--batch 64] [--rounds 10]

The networks are configs/digits.py's U-Net (no text) and configs/digits_text.py's (cross-attention
at 8x8 and in the middle) with its jointly trained encoder (`:` default) and with the frozen
MiniLM-L6 (`:minilm`); random weights, real digits captions. Every row is the compiled train
step (`steps.make_train_step`) on the same batch; the frozen encoder's caption table (80
captions) is encoded once before the loop (its one-off cost is a row of its own), and the last
row is what encoding the batch's 64 captions with MiniLM would add to every step without that
table. Medians over `--rounds` interleaved calls after a warm-up. Prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from configs import digits, digits_class, digits_text  # noqa: E402
from diffjax import build, sharding, steps  # noqa: E402
from diffjax.data import captions as captions_lib  # noqa: E402


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _step(config, batch, tmp):
    """(run, seconds to build the caption table or None, n_params) for the config."""
    setup = build.Setup(config)
    table_s = None
    if setup.conditioner.text:
        t0 = time.perf_counter()
        setup.load_text(tmp, captions_lib.digit_captions())
        table_s = time.perf_counter() - t0
    state = setup.create_state()
    step = steps.make_train_step(
        setup.model,
        setup.schedule,
        setup.tx,
        setup.mesh,
        setup.abstract_state,
        conditioner=setup.conditioner,
        **build.loss_kwargs(config),
    )
    box = {"state": state}
    key = jax.random.key(0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    def run():
        box["state"], metrics = step(box["state"], batch(setup.mesh), key, setup.frozen)
        return metrics["loss"]

    return run, table_s, n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    host = {
        "image": rng.uniform(-1, 1, (args.batch, 16, 16, 1)).astype(np.float32),
        "label": (np.arange(args.batch) % 10).astype(np.int32),
        "caption": (np.arange(args.batch) * 7 % 80).astype(np.int32),
    }
    batch = lambda mesh: sharding.global_batch(host, mesh)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (
            ("no text (digits.py)", digits.base()),
            ("class labels (digits_class.py)", digits_class.get_config()),
            ("joint encoder (digits_text.py)", digits_text.get_config()),
            ("frozen MiniLM + caption table (:minilm)", digits_text.get_config("minilm")),
        ):
            os.makedirs(os.path.join(tmp, str(len(rows))))
            rows[name] = _step(config, batch, os.path.join(tmp, str(len(rows))))
            jax.block_until_ready(rows[name][0]())  # compile and warm up
        times = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, (run, _, _) in rows.items():
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times[name].append(time.perf_counter() - t0)
        setup = build.Setup(digits_text.get_config("minilm"))
        setup.load_text(os.path.join(tmp, "3"))
        texts = [captions_lib.digit_captions().texts[i] for i in host["caption"]]
        setup.text_side.context(texts)  # compile
        enc = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            setup.text_side.context(texts)
            enc.append(time.perf_counter() - t0)

    devices = jax.device_count()
    print(f"train step, batch {args.batch} of 16x16x1, {_cpu_model()}, {devices} device(s)")
    print("| step | params trained | ms per step | vs no text |")
    print("|---|---|---|---|")
    base = statistics.median(times["no text (digits.py)"])
    for name, (_, table_s, n) in rows.items():
        ms = statistics.median(times[name])
        print(f"| {name} | {n:,} | {1e3 * ms:.1f} | {ms / base:.2f}x |")
        if table_s is not None and "MiniLM" in name:
            once = f"{1e3 * table_s:.0f}"
            print(f"| once per run: load MiniLM, encode the 80 captions | | {once} | |")
    enc_ms = 1e3 * statistics.median(enc)
    print(f"| per step without the table: MiniLM on the batch's captions | | {enc_ms:.1f} | |")


if __name__ == "__main__":
    main()
