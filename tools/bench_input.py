"""Input-pipeline benchmark: tf.data decoding vs a sequential PIL loop, and synthetic-shop speed.

    python tools/bench_input.py --files 1500 --size 64

Writes ``--files`` JPEGs of 256 x 176 (DeepFashion In-shop's size) to a temporary folder,
decodes them to ``size x size`` with `atl_keras.data.images.decode_images` (parallel tf.data)
and with a plain PIL loop, and prints images/s and their ratio measured in this one run.
Then times `make_synthetic_shop` with its defaults (200 items x 6 images at 32 px).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

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
