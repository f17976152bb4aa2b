"""Input-pipeline benchmark: can the streaming P x K pipeline feed training, and what limits it?

    python tools/bench_input.py                       # all sections, results/bench_input.json
    python tools/bench_input.py --sections stream,models --repeats 3

Sections (``--sections``, comma-separated; contenders interleaved within each round):

- ``stream``: images/s of `pk_stream_dataset` (P x K = 16 x 4 batches of 224 px float32 from
  ``--files`` 256 x 256 JPEGs, with and without augmentation) against the raw decode ceiling
  on the same cores and files: a bare ``tf.data`` map of ``read_file`` + ``decode_jpeg`` +
  ``resize`` (AUTOTUNE, batched, prefetched) with the filter the shared preprocessing needs
  for this size (256 -> 224 shrinks: ``area``; the cheaper, non-antialiased bilinear resize
  is timed too, for reference only). Ratio stream / raw per round (target >= 0.8 without
  augmentation).
- ``models``: images/s one training step consumes (ATL loss, batch_hard, batch 64 at 224 px)
  for ``--models`` (default small_cnn and efficientnetv2-b0, random init), fed from one cached
  batch: the model's own ceiling on this machine. Compared with ``stream`` it says whether the
  input or the model limits training here, and how many cores of decoding a faster device needs.
- ``dct``: large JPEG photos (1.2, 2.4 and 3.9 MP) to 224 px: the shared preprocessing's full
  decode + area resize, against DCT-scaled decoding (``decode_jpeg(ratio=r)``, the largest
  r in 1/2/4/8 that still decodes at least the target size, then the same resize) and
  ``decode_and_crop_jpeg`` of the centre square; images/s and mean |pixel difference| to
  the full decode.
- ``cache`` (the original benchmark): steps/s of small_cnn fed by the in-memory P x K
  pipeline (+augment) against a cached copy of its batches, 32 px synthetic shop.

Prints load averages and the machine beside the numbers; saves everything to
``results/bench_input.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np
from PIL import Image

SIZE = 224
P, K = 16, 4


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "commit": commit, "load_before": list(os.getloadavg())}


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A JPEG-realistic picture: smooth colour fields plus fine texture (not white noise)."""
    coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    image += rng.normal(0, 12, (height, width, 1))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_jpegs(folder: str, count: int, width: int, height: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{width}x{height}_{i:05d}.jpg")
        photo(rng, width, height).save(path, quality=90)
        paths.append(path)
    return paths


def _rate(dataset, batches: int, batch: int) -> float:
    """Images/s pulling ``batches`` batches (after one warm-up batch)."""
    it = iter(dataset)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def bench_stream(paths: list[str], batches: int, repeats: int) -> dict:
    import tensorflow as tf

    from atl_keras.data.augment import make_augmenter
    from atl_keras.data.sources import FileImages
    from atl_keras.data.streaming import pk_stream_dataset
    from atl_keras.preprocessing import Preprocessing

    labels = np.arange(len(paths)) // K
    source = FileImages(paths)
    prep = Preprocessing((SIZE, SIZE))

    def raw(method: str):
        # The bare ops the stream cannot do without: read, decode, resize to the model's size
        # with the filter the shared preprocessing uses for this size (256 -> 224 shrinks:
        # "area"), float32 batches as the model takes them.
        def load(path):
            image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
            return tf.image.resize(image, [SIZE, SIZE], method=method)

        def make(seed: int):
            order = np.random.default_rng(seed).permutation(len(paths))
            return (tf.data.Dataset.from_tensor_slices([paths[i] for i in order]).repeat()
                    .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(P * K).prefetch(tf.data.AUTOTUNE))

        return make

    contenders = {
        "raw decode ceiling": raw("area"),
        "raw, bilinear resize": raw("bilinear"),  # informational: cheaper filter than the pipeline's
        "stream": lambda seed: pk_stream_dataset(source, labels, None, prep, p=P, k=K, seed=seed),
        "stream + augment": lambda seed: pk_stream_dataset(source, labels, None, prep, p=P, k=K, seed=seed,
                                                           augment=make_augmenter()),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        for name, make in contenders.items():
            rates[name].append(_rate(make(round_), batches, P * K))
    ratios = [s / r for s, r in zip(rates["stream"], rates["raw decode ceiling"])]
    ratios_aug = [s / r for s, r in zip(rates["stream + augment"], rates["raw decode ceiling"])]
    ratios_bilinear = [s / r for s, r in zip(rates["stream"], rates["raw, bilinear resize"])]
    print(f"\n[stream] {len(paths)} JPEGs 256x256 -> {SIZE}x{SIZE}, batches of {P}x{K}, {batches} batches x "
          f"{repeats} interleaved rounds, images/s (median, range):")
    for name, values in rates.items():
        print(f"  {name:22s}: {statistics.median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})")
    print(f"  stream / raw           : {statistics.median(ratios):.3f} median, rounds "
          f"{', '.join(f'{r:.3f}' for r in ratios)}   (target >= 0.8)")
    print(f"  stream+augment / raw   : {statistics.median(ratios_aug):.3f} median")
    print(f"  stream / raw bilinear  : {statistics.median(ratios_bilinear):.3f} median (reference only)")
    return {"files": len(paths), "batches": batches, "repeats": repeats, "images_per_second": rates,
            "ratio_stream_over_raw": ratios, "ratio_stream_augment_over_raw": ratios_aug,
            "ratio_stream_over_raw_bilinear": ratios_bilinear,
            "median_ratio": statistics.median(ratios)}


def bench_models(models: list[str], steps: int, repeats: int) -> dict:
    import keras
    import tensorflow as tf

    from atl_keras.losses import AdaptiveTripletLoss
    from atl_keras.model import ATLModel

    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (P * K, SIZE, SIZE, 3)).astype(np.float32))
    y = {"label": tf.constant(np.repeat(np.arange(P), K).astype(np.int64)),
         "text_embedding": tf.constant(rng.normal(size=(P * K, 16)).astype(np.float32))}
    batch = tf.data.Dataset.from_tensors((x, y)).repeat()
    compiled = {}
    for name in models:
        keras.utils.set_random_seed(0)
        model = ATLModel(backbone=name, input_shape=(SIZE, SIZE, 3), embedding_dim=64)
        model.compile(optimizer="adam", loss=AdaptiveTripletLoss(mining="batch_hard"))
        model.fit(batch, steps_per_epoch=1, epochs=1, verbose=0)  # trace once
        compiled[name] = model
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in compiled.items():
            start = time.perf_counter()
            model.fit(batch, steps_per_epoch=steps, epochs=1, verbose=0)
            rates[name].append(steps * P * K / (time.perf_counter() - start))
    print(f"\n[models] training step at {SIZE}x{SIZE}, batch {P}x{K}, {steps} steps x {repeats} rounds, images/s:")
    for name, values in rates.items():
        print(f"  {name:20s}: {statistics.median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})")
    return {"steps": steps, "repeats": repeats, "images_per_second": rates}


def bench_dct(folder: str, per_size: int, repeats: int) -> dict:
    import tensorflow as tf

    from atl_keras.preprocessing import Preprocessing, decode_image, resize_image

    prep = Preprocessing((SIZE, SIZE))
    sizes = [(1280, 960), (1920, 1280), (2400, 1600)]  # 1.2, 2.4, 3.8 MP
    results = {}
    for width, height in sizes:
        paths = write_jpegs(folder, per_size, width, height, seed=width)
        contents = [open(p, "rb").read() for p in paths]
        # "pad" to SIZE x SIZE scales by SIZE / max(w, h): a 1/r decode still covers it while r <= max(w, h) / SIZE
        ratio = max(r for r in (1, 2, 4, 8) if r <= max(width, height) / SIZE)

        def full(data):
            return decode_image(data, prep)

        def dct(data, ratio=ratio):
            image = tf.io.decode_jpeg(data, channels=3, ratio=ratio)
            return resize_image(image, prep)

        def crop(data):
            shape = tf.image.extract_jpeg_shape(data)
            side = tf.minimum(shape[0], shape[1])
            window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
            return resize_image(tf.io.decode_and_crop_jpeg(data, window, channels=3), prep)

        contenders = {"full decode": full, f"dct ratio {ratio}": dct, "decode_and_crop centre": crop}
        outputs = {}
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                ds = tf.data.Dataset.from_tensor_slices(contents).map(fn, num_parallel_calls=tf.data.AUTOTUNE) \
                    .batch(per_size)
                start = time.perf_counter()
                out = next(iter(ds)).numpy()
                rates[name].append(per_size / (time.perf_counter() - start))
                outputs[name] = out.astype(np.float32)
        diff = {name: float(np.abs(out - outputs["full decode"]).mean()) for name, out in outputs.items()}
        key = f"{width}x{height}"
        results[key] = {"images_per_second": rates, "mean_abs_pixel_diff_vs_full": diff,
                        "bytes_per_file": int(np.mean([len(c) for c in contents]))}
        print(f"\n[dct] {per_size} JPEGs {key} ({width * height / 1e6:.1f} MP, "
              f"{results[key]['bytes_per_file'] / 1e3:.0f} KB) -> {SIZE}x{SIZE}, images/s:")
        for name, values in rates.items():
            print(f"  {name:24s}: {statistics.median(values):7.1f}   mean |diff| vs full {diff[name]:.2f}")
    return results


def bench_cache(steps: int, repeats: int) -> dict:
    """The original benchmark: steps/s of the real in-memory pipeline vs cached batches (32 px)."""
    import keras

    from atl_keras.data.augment import make_augmenter
    from atl_keras.data.sampler import pk_dataset
    from atl_keras.data.synthetic_shop import make_synthetic_shop
    from atl_keras.losses import AdaptiveTripletLoss
    from atl_keras.model import ATLModel
    from atl_keras.text import HashingTextEncoder

    keras.utils.set_random_seed(0)
    shop = make_synthetic_shop(num_items=300).split("train")
    text = HashingTextEncoder().encode([shop.descriptions[i] for i in range(shop.num_items)])
    real = pk_dataset(shop.images, shop.labels, text[shop.labels], p=16, k=4, seed=0, augment=make_augmenter())
    cached = real.take(steps).cache().repeat()
    for _ in cached.take(steps):
        pass
    model = ATLModel(backbone="small_cnn", input_shape=shop.images.shape[1:], embedding_dim=64)
    model.compile(optimizer="adam", loss=AdaptiveTripletLoss(mining="batch_hard"))
    model.fit(cached, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)
    times = {"pipeline": [], "cached": []}
    for _ in range(repeats):
        for name, dataset in (("pipeline", real), ("cached", cached)):
            start = time.perf_counter()
            model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
            times[name].append(time.perf_counter() - start)
    rates = {name: steps / min(values) for name, values in times.items()}
    ratio = rates["pipeline"] / rates["cached"]
    print(f"\n[cache] small_cnn 32 px, batch 16x4: pipeline {rates['pipeline']:.2f} steps/s, cached "
          f"{rates['cached']:.2f} steps/s, ratio {ratio:.3f} (target >= 0.9)")
    return {"steps": steps, "repeats": repeats, "steps_per_second": rates, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="stream,models,dct,cache")
    parser.add_argument("--files", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8, help="batches timed per stream contender and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="small_cnn,efficientnetv2-b0")
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--photos", type=int, default=16, help="JPEG photos per size in the dct section")
    parser.add_argument("--output", default=os.path.join("results", "bench_input.json"))
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    figures: dict = {"machine": machine(), "sections": sections}
    print(f"machine: {figures['machine']['cpu']}, {figures['machine']['cores']} cores, commit "
          f"{figures['machine']['commit']}, load {' '.join(f'{x:.2f}' for x in figures['machine']['load_before'])}")
    with tempfile.TemporaryDirectory() as tmp:
        if "stream" in sections:
            paths = write_jpegs(tmp, args.files, 256, 256)
            figures["stream"] = bench_stream(paths, args.batches, args.repeats)
        if "models" in sections:
            figures["models"] = bench_models(args.models.split(","), args.model_steps, args.repeats)
        if "dct" in sections:
            figures["dct"] = bench_dct(tmp, args.photos, args.repeats)
    if "cache" in sections:
        figures["cache"] = bench_cache(60, args.repeats)
    if "stream" in figures and "models" in figures:
        ceiling = statistics.median(figures["stream"]["images_per_second"]["raw decode ceiling"])
        stream = statistics.median(figures["stream"]["images_per_second"]["stream"])
        cores = figures["machine"]["cores"]
        print(f"\n[limits] streaming input {stream:.0f} images/s on {cores} cores = {stream / cores:.0f} images/s per "
              "core (JPEG 256 px -> 224 px):")
        for name, values in figures["models"]["images_per_second"].items():
            need = statistics.median(values)
            limit = "input" if stream < need else "model"
            print(f"  {name:20s} consumes {need:7.1f} images/s here -> the {limit} is the limit "
                  f"({stream / need:.2f}x); a device training at R images/s needs R / {stream / cores:.0f} cores of decode")
        figures["limits"] = {"stream_images_per_second": stream, "raw_images_per_second": ceiling,
                             "per_core": stream / cores}
    save(figures, args.output)


def save(figures: dict, output: str) -> None:
    """Record the load average after the run, print it and write ``figures`` as JSON."""
    figures["machine"]["load_after"] = list(os.getloadavg())
    print(f"load after: {' '.join(f'{x:.2f}' for x in figures['machine']['load_after'])}")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    print(f"saved {output}")


if __name__ == "__main__":
    main()
