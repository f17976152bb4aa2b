"""Input-pipeline benchmark: is the pipeline the bottleneck of training?

    python tools/bench_input.py [--steps 60] [--repeats 3] [--files 1500 --size 64]

1. Training steps/s of the same ATLModel (AdaptiveTripletLoss, batch_hard) fed by the real
   P x K pipeline (gather + augmentation in the tf.data map) against the same batches
   from a cached in-memory dataset, measured in one run, interleaved (target ratio >= 0.9).
   Saves results/bench_input.json.
2. File decoding: tf.data `decode_images` against a sequential PIL loop.

Writes ``--files`` JPEGs of 256 x 176 (DeepFashion In-shop's size) to a temporary folder,
decodes them to ``size x size`` with `atl_keras.data.images.decode_images` (parallel tf.data)
and with a plain PIL loop, and prints images/s and their ratio measured in this one run.
Then times `make_synthetic_shop` with its defaults (200 items x 6 images at 32 px).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image


def pil_loop(paths: list[str], size: int) -> np.ndarray:
    """Reference: decode + aspect-preserving pad-resize one file at a time."""
    out = np.full((len(paths), size, size, 3), 255, np.uint8)
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        scale = size / max(image.size)
        w, h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
        resized = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))
        top, left = (size - h) // 2, (size - w) // 2
        out[i, top : top + h, left : left + w] = resized
    return out


def pipeline_vs_cache(steps: int, repeats: int) -> dict:
    """Steps/s of one model fed by the real pipeline vs a cached copy of its batches."""
    import keras
    import tensorflow as tf

    from atl_keras.data.augment import make_augmenter
    from atl_keras.data.sampler import pk_dataset
    from atl_keras.data.synthetic_shop import make_synthetic_shop
    from atl_keras.losses import AdaptiveTripletLoss
    from atl_keras.model import ATLModel
    from atl_keras.text import HashingTextEncoder

    keras.utils.set_random_seed(0)
    shop = make_synthetic_shop(num_items=300).split("train")
    text = HashingTextEncoder().encode([shop.descriptions[i] for i in range(shop.num_items)])
    real = pk_dataset(shop.images, shop.labels, text[shop.labels], p=16, k=4, seed=0,
                      augment=make_augmenter())
    cached = real.take(steps).cache().repeat()
    for _ in cached.take(steps):  # fill the cache before timing
        pass
    model = ATLModel(backbone="small_cnn", input_shape=shop.images.shape[1:], embedding_dim=64)
    model.compile(optimizer="adam", loss=AdaptiveTripletLoss(mining="batch_hard"))
    model.fit(cached, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)  # trace the train step once
    times = {"pipeline": [], "cached": []}
    for _ in range(repeats):
        for name, dataset in (("pipeline", real), ("cached", cached)):
            start = time.perf_counter()
            model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
            times[name].append(time.perf_counter() - start)
    rates = {name: steps / min(values) for name, values in times.items()}
    ratio = rates["pipeline"] / rates["cached"]
    print(f"training steps/s, batch 16x4 of 32x32x3, small_cnn, ATL batch_hard, {os.cpu_count()} CPU cores:")
    print(f"  real P x K pipeline (+augment) : {rates['pipeline']:7.2f} steps/s")
    print(f"  cached in-memory batches       : {rates['cached']:7.2f} steps/s")
    print(f"  ratio pipeline / cached        : {ratio:7.3f}   (target >= 0.9)")
    return {"steps": steps, "repeats": repeats, "steps_per_second": rates, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    figures = pipeline_vs_cache(args.steps, args.repeats)
    os.makedirs("results", exist_ok=True)
    with open(os.path.join("results", "bench_input.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    if args.skip_decode:
        return

    from atl_keras.data.images import decode_images
    from atl_keras.data.synthetic_shop import make_synthetic_shop

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        base = rng.integers(0, 256, (256 // 8, 176 // 8, 3), dtype=np.uint8)
        for i in range(args.files):
            image = Image.fromarray(np.roll(base, i, axis=0)).resize((176, 256), Image.Resampling.BILINEAR)
            path = os.path.join(tmp, f"{i:05d}.jpg")
            image.save(path, quality=90)
            paths.append(path)
        decode_images(paths[:8], args.size)  # warm up TensorFlow
        tf_times, pil_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            images, kept = decode_images(paths, args.size)
            tf_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference = pil_loop(paths, args.size)
            pil_times.append(time.perf_counter() - start)
        assert kept.all()
        diff = np.abs(images.astype(np.float32) - reference).mean()
        tf_rate, pil_rate = args.files / min(tf_times), args.files / min(pil_times)
        print(f"decode {args.files} JPEGs 256x176 -> {args.size}x{args.size} on {os.cpu_count()} CPU cores")
        print(f"  tf.data decode_images : {tf_rate:8.1f} images/s")
        print(f"  PIL sequential loop   : {pil_rate:8.1f} images/s")
        print(f"  ratio tf.data / PIL   : {tf_rate / pil_rate:8.2f}x   (mean |pixel diff| {diff:.2f})")

    start = time.perf_counter()
    shop = make_synthetic_shop()
    elapsed = time.perf_counter() - start
    print(f"make_synthetic_shop(): {len(shop)} images 32x32 in {elapsed:.2f} s ({len(shop) / elapsed:.0f} images/s)")


if __name__ == "__main__":
    main()
