"""Forward + backward time of TripletLoss and AdaptiveTripletLoss per mining mode.

Each configuration is a function computing the loss and its gradient with respect
to the embeddings, warmed up, then timed ``--repeats`` times, all configurations
of one batch size round-robin; the median is reported. Batches are P x K (K=4
images per item), D=128 unit embeddings, T=512 text embeddings. Ratios are
measured in the same run:

- ATL / Triplet per mining mode and batch size (target <= 1.25 at B=256),
- semi_hard / batch_hard per loss and batch size (target <= 3 at B=1024).

As in real data every image of an item carries the item's text, so ATL
computes its text distances once per item. ``--per-row-text`` also times ATL
on a batch where one image per item carries a different text: the loss then
detects that the texts are not shared per label and computes the full
``[B, T] x [T, B]`` text distances (the cost before the per-label path).

``--xla`` adds, per loss and mode, the same step under ``tf.function(jit_compile=True)``
next to the default ``tf.function``, each with a fixed batch and with a new label
batch per call (``--new-batches`` P x K batches of other items, cycled), and
reports XLA / default and the number of XLA compilations over the new batches
(counted from XLA's own module dumps, ``XLA_FLAGS=--xla_dump_to``; 1 means no
recompilation). ``--jax`` runs the same rows under the JAX backend in a
subprocess (``KERAS_BACKEND=jax``; ``jax.jit`` of value-and-grad), with its jit
cache size as the compile count; its times are from another process, so the
JAX / TensorFlow ratio is indicative only.

The losses are built with ``max_images_per_label=K`` (P x K declared, as
`atl train` knows K); ``--undeclared`` times the default slot ladder instead.

``--proxy`` adds the proxy losses (issue 15) per (B, C) in ``--proxy-batch-sizes`` x
``--proxy-classes`` (default B in {256, 1024, 4096}, C in {1k, 10k}): `AdaptiveProxyLoss`
with class-text margins computed per batch (``[B, T] x [T, C]``), with a precomputed
``[C, C]`` margin matrix (C <= 4096 only), `ProxyAnchorLoss`, and ATL batch_hard (no
proxies, so it does not depend on C), interleaved in one run; gradients with respect to the
embeddings and the proxies; ratios to ATL's median. Labels are P x K over C classes
(with repeats when B / K > C). ``--proxy --skip-default`` times the proxy rows only
(``tools/bench_proxy_loss.py`` is that command).

``--pair`` times the pair-loss family (issue 24) against PyTorch Metric Learning 2.9 in its
own virtualenv (``--peer-python``, default ``.venv-bench/bin/python``; see
tools/pml_loss_worker.py): per B in ``--pair-batch-sizes`` (default 256, 1024, 2048) and
loss (contrastive, multi-similarity with its miner, circle, SupCon, ArcFace with
``--pair-classes`` proxies), one forward + backward of ours under the default
`tf.function`, ours under XLA, and PML, round-robin in one run, each side on
``--threads`` intra-op threads (default 2); PML's time is measured inside its worker (no
pipe). Ratios ours / PML and XLA / default are printed and saved with the load average,
machine and commit. ``--pair --skip-default`` times the pair rows only.

Usage:
    python tools/bench_loss.py [--batch-sizes 64 256 1024] [--repeats 10]
        [--per-row-text] [--xla] [--jax] [--modes batch_all semi_hard]
        [--new-batches 20] [--skip-default] [--output results/bench_loss.json]
        [--proxy [--proxy-batch-sizes 256 1024 4096] [--proxy-classes 1000 10000]
         [--proxy-repeats 7]]
        [--pair [--pair-batch-sizes 256 1024 2048] [--pair-repeats 7] [--threads 2]
         [--peer-python .venv-bench/bin/python]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

EMBEDDING_DIM = 128
TEXT_DIM = 512
IMAGES_PER_ITEM = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=None, help="mining modes (default: all)")
    parser.add_argument("--per-row-text", action="store_true",
                        help="also time ATL when texts are not shared per label (full path)")
    parser.add_argument("--xla", action="store_true", help="also time jit_compile=True")
    parser.add_argument("--jax", action="store_true", help="also time the JAX backend")
    parser.add_argument("--skip-default", action="store_true",
                        help="skip the default-only table (with --xla / --jax)")
    parser.add_argument("--new-batches", type=int, default=20,
                        help="distinct label batches cycled by the new-batch rows")
    parser.add_argument("--undeclared", action="store_true",
                        help="losses without max_images_per_label (the default slot ladder)")
    parser.add_argument("--proxy", action="store_true",
                        help="also time the proxy losses against ATL batch_hard per (B, C)")
    parser.add_argument("--proxy-batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--proxy-classes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--proxy-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--pair", action="store_true",
                        help="also time the pair losses against PML 2.9 (its own venv)")
    parser.add_argument("--pair-batch-sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--pair-classes", type=int, default=1000, help="ArcFace's classes")
    parser.add_argument("--pair-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--pair-losses", nargs="+", default=None, help="default: all")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, both sides")
    parser.add_argument("--peer-python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"))
    parser.add_argument("--output", default="results/bench_loss.json")
    parser.add_argument("--jax-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


ARGS = parse_args(None if __name__ == "__main__" else [])
DUMP_DIR = None
if ARGS.xla and __name__ == "__main__" and not ARGS.jax_child:
    # XLA reads its flags once, at load: set before TensorFlow is imported.
    DUMP_DIR = tempfile.mkdtemp(prefix="bench_loss_xla_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text").strip()
if ARGS.jax_child:
    os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402

from atl_keras.losses import MINING_MODES, AdaptiveTripletLoss, TripletLoss  # noqa: E402


def make_batch_np(batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P x K batch: labels [B] int64, embeddings [B, D], text embeddings [B, T] (numpy)."""
    rng = np.random.default_rng(seed)
    items = batch_size // IMAGES_PER_ITEM
    labels = np.repeat(rng.choice(10**9, size=items, replace=False), IMAGES_PER_ITEM)
    labels = np.resize(labels, batch_size).astype(np.int64)
    emb = rng.normal(size=(batch_size, EMBEDDING_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text_per_item = rng.normal(size=(items + 1, TEXT_DIM)).astype(np.float32)
    _, item_index = np.unique(labels, return_inverse=True)
    text = text_per_item[item_index]
    return labels, emb, text


def make_batch(batch_size: int, seed: int = 0):
    """The batch as TensorFlow constants (TensorFlow runs)."""
    import tensorflow as tf

    return tuple(tf.constant(a) for a in make_batch_np(batch_size, seed))


def unshare_text(text):
    """``text`` with every ``IMAGES_PER_ITEM``-th row changed: texts no longer per label."""
    import tensorflow as tf

    values = text.numpy().copy()
    values[::IMAGES_PER_ITEM] += 0.5
    return tf.constant(values)


def build_loss(kind: str, mining: str):
    k = None if ARGS.undeclared else IMAGES_PER_ITEM
    if kind == "triplet":
        return TripletLoss(mining=mining, max_images_per_label=k)
    return AdaptiveTripletLoss(mining=mining, max_images_per_label=k)


def _targets(loss, labels, text):
    return {"label": labels, "text_embedding": text} if isinstance(loss, AdaptiveTripletLoss) \
        else labels


def make_step(loss, y_true, embeddings, jit_compile: bool = False):
    """A warmed-up `tf.function` running one forward + backward pass on a fixed batch."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def step(emb):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            value = loss(y_true, emb)
        return value, tape.gradient(value, emb)

    for _ in range(2):  # trace + warm-up
        value, grad = step(embeddings)
    if not (np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))):
        raise RuntimeError(f"non-finite loss or gradient for {loss.get_config()}")
    return lambda: [t.numpy() for t in step(embeddings)]


def make_input_step(loss, batches, jit_compile: bool):
    """(run, warm-up) of a `tf.function` taking the batch as inputs; ``run`` uses the next
    batch of ``batches`` on every call (a new label batch each call when len > 1)."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def step(labels, emb, text):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            value = loss(_targets(loss, labels, text), emb)
        return value, tape.gradient(value, emb)

    position = [0]

    def run():
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        return [t.numpy() for t in step(*batch)]

    return run


def count_compilations() -> int:
    """XLA compilations so far in this process (one dumped module per compilation)."""
    if DUMP_DIR is None:
        return 0
    return sum(1 for name in os.listdir(DUMP_DIR) if name.endswith(".before_optimizations.txt"))


def time_interleaved(steps: dict, repeats: int, compiles: dict | None = None) -> dict:
    """Median milliseconds per step, timing the steps round-robin.

    Interleaving makes the ratios robust to load that changes during the run
    (the machine is shared): every configuration sees the same conditions. With
    ``compiles``, the XLA compilations each step triggers are added to it.
    """
    times: dict = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            before = count_compilations() if compiles is not None else 0
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000.0)
            if compiles is not None:
                compiles[name] = compiles.get(name, 0) + count_compilations() - before
    return {name: statistics.median(values) for name, values in times.items()}


def default_rows(args, modes) -> tuple[list, dict]:
    import tensorflow as tf

    rows = []
    for batch_size in args.batch_sizes:
        labels, emb, text = make_batch(batch_size)
        targets = {"label": labels, "text_embedding": text}
        steps = {}
        for mining in modes:
            steps[("triplet", mining)] = make_step(build_loss("triplet", mining), labels, emb)
            steps[("atl", mining)] = make_step(build_loss("atl", mining), targets, emb)
            if args.per_row_text:
                per_row = {"label": labels, "text_embedding": unshare_text(text)}
                steps[("atl_per_row_text", mining)] = make_step(
                    build_loss("atl", mining), per_row, emb
                )
        ms = time_interleaved(steps, args.repeats)
        for mining in modes:
            triplet_ms, atl_ms = ms[("triplet", mining)], ms[("atl", mining)]
            row = {"batch_size": batch_size, "mining": mining, "triplet_ms": triplet_ms,
                   "atl_ms": atl_ms, "atl_over_triplet": atl_ms / triplet_ms}
            line = (f"  B={batch_size:5d} {mining:10s} triplet {triplet_ms:9.2f} ms  "
                    f"atl {atl_ms:9.2f} ms")
            if args.per_row_text:
                row["atl_per_row_text_ms"] = ms[("atl_per_row_text", mining)]
                row["atl_per_row_text_over_triplet"] = row["atl_per_row_text_ms"] / triplet_ms
                line += f"  atl (per-row text) {row['atl_per_row_text_ms']:9.2f} ms"
            rows.append(row)
            print(line, flush=True)
    del tf
    semi_over_hard = {}
    by_key = {(r["batch_size"], r["mining"]): r for r in rows}
    if "batch_hard" in modes and "semi_hard" in modes:
        for batch_size in args.batch_sizes:
            hard, semi = by_key[(batch_size, "batch_hard")], by_key[(batch_size, "semi_hard")]
            semi_over_hard[str(batch_size)] = {"triplet": semi["triplet_ms"] / hard["triplet_ms"],
                                               "atl": semi["atl_ms"] / hard["atl_ms"]}
    return rows, semi_over_hard


#: The precomputed [C, C] margin matrix is timed up to this many classes (C^2 floats).
MAX_MATRIX_CLASSES = 4096


def make_proxy_batch(batch_size: int, classes: int, seed: int = 0):
    """labels [B] in [0, C) (P x K; repeats when B / K > C), unit embeddings [B, D], class
    texts [C, T], the rows' texts [B, T], proxies [C, D] (numpy)."""
    rng = np.random.default_rng(seed)
    items = batch_size // IMAGES_PER_ITEM
    chosen = rng.choice(classes, size=items, replace=items > classes)
    labels = np.resize(np.repeat(chosen, IMAGES_PER_ITEM), batch_size).astype(np.int64)
    emb = rng.normal(size=(batch_size, EMBEDDING_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    class_text = rng.normal(size=(classes, TEXT_DIM)).astype(np.float32)
    proxies = rng.normal(size=(classes, EMBEDDING_DIM)).astype(np.float32)
    return labels, emb, class_text, class_text[labels], proxies


def make_proxy_step(loss, y_true, embeddings, proxies=None, jit_compile: bool = False):
    """A warmed-up callable: one forward + backward pass, gradients with respect to the
    embeddings and (for proxy losses) the proxies."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def step(emb, prox):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            if prox is None:
                value = loss(y_true, emb)
                return value, tape.gradient(value, emb)
            tape.watch(prox)
            value = loss(y_true, emb, proxies=prox)
            return (value, *tape.gradient(value, [emb, prox]))

    for _ in range(2):
        out = step(embeddings, proxies)
    if not all(np.all(np.isfinite(t.numpy())) for t in out):
        raise RuntimeError(f"non-finite loss or gradient for {type(loss).__name__}")
    return lambda: [t.numpy() for t in step(embeddings, proxies)]


def proxy_rows(args) -> list:
    """Per (B, C): the proxy losses and ATL batch_hard, interleaved; ratios to ATL."""
    import tensorflow as tf

    from atl_keras.losses import AdaptiveProxyLoss, ProxyAnchorLoss
    from atl_keras.margins import class_margin_matrix

    repeats = args.proxy_repeats or args.repeats
    rows = []
    for batch_size in args.proxy_batch_sizes:
        for classes in args.proxy_classes:
            labels, emb, class_text, text, proxies = make_proxy_batch(batch_size, classes)
            lab, emb_t, prox = tf.constant(labels), tf.constant(emb), tf.constant(proxies)
            targets = {"label": lab, "text_embedding": tf.constant(text)}
            steps = {
                "atl_batch_hard": make_proxy_step(build_loss("atl", "batch_hard"), targets, emb_t),
                "adaptive_proxy_text": make_proxy_step(
                    AdaptiveProxyLoss(class_text_embeddings=class_text, precompute_margins=False), targets, emb_t, prox),
                "proxy_anchor": make_proxy_step(ProxyAnchorLoss(), targets, emb_t, prox),
            }
            if classes <= MAX_MATRIX_CLASSES:
                steps["adaptive_proxy_matrix"] = make_proxy_step(
                    AdaptiveProxyLoss(margin_matrix=class_margin_matrix(class_text)), targets, emb_t, prox)
            ms = time_interleaved(steps, repeats)
            for name, value in ms.items():
                rows.append({"batch_size": batch_size, "classes": classes, "contender": name,
                             "median_ms": value, "ratio_to_atl": value / ms["atl_batch_hard"]})
                print(f"  B={batch_size:5d} C={classes:6d} {name:<22} {value:10.2f} ms "
                      f"{value / ms['atl_batch_hard']:6.2f} x ATL", flush=True)
    return rows


def print_proxy_table(rows: list, repeats: int) -> None:
    contenders = ("adaptive_proxy_text", "adaptive_proxy_matrix", "proxy_anchor")
    print(f"\nproxy losses vs ATL batch_hard, forward+backward ms (median of {repeats}; ratio = loss / ATL, same run)")
    print(f"{'B':>5} {'C':>6} {'ATL ms':>9}" + "".join(f"{name:>24}" for name in contenders))
    by_key = {(r["batch_size"], r["classes"], r["contender"]): r for r in rows}
    for batch_size, classes in dict.fromkeys((r["batch_size"], r["classes"]) for r in rows):
        atl = by_key[(batch_size, classes, "atl_batch_hard")]["median_ms"]
        cells = []
        for name in contenders:
            r = by_key.get((batch_size, classes, name))
            cells.append(f"{'-':>24}" if r is None else f"{r['median_ms']:>13.2f} ({r['ratio_to_atl']:>6.2f}x)")
        print(f"{batch_size:>5} {classes:>6} {atl:>9.2f}" + "".join(cells))


# ----------------------------------------------------------------- the pair family vs PML 2.9
PAIR_LOSSES = ("contrastive", "multi_similarity", "circle", "supcon", "arcface")


def build_pair_loss(name: str, classes: int):
    """Our loss with PML 2.9's defaults (the multi-similarity loss with its miner)."""
    import atl_keras as atl

    return {"contrastive": lambda: atl.ContrastiveLoss(),
            "multi_similarity": lambda: atl.MultiSimilarityLoss(miner="multi_similarity"),
            "circle": lambda: atl.CircleLoss(),
            "supcon": lambda: atl.SupConLoss(),
            "arcface": lambda: atl.ArcFaceLoss(num_classes=classes)}[name]()


class PMLWorker:
    """tools/pml_loss_worker.py in the benchmark venv, one JSON request per line."""

    def __init__(self, python: str, threads: int) -> None:
        if not os.path.exists(python):
            raise SystemExit(
                f"--pair needs PyTorch Metric Learning 2.9 in its own venv; {python} is missing. "
                'Create it: python3 -m venv .venv-bench && .venv-bench/bin/pip install torch '
                '"pytorch-metric-learning==2.9.*" numpy (or pass --peer-python).'
            )
        worker = os.path.join(ROOT, "tools", "pml_loss_worker.py")
        self.process = subprocess.Popen([python, worker], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.info = self.request({"threads": threads})

    def request(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the PML worker stopped (exit {self.process.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def pair_rows(args) -> tuple[list, dict]:
    """Per (B, loss): ours (default, XLA) and PML, round-robin; medians and ratios."""
    import tensorflow as tf

    # numpy only (torch is imported in the worker's main): the same numbers on both sides
    from tools.pml_loss_worker import make_batch, make_proxies

    repeats = args.pair_repeats or args.repeats
    names = tuple(args.pair_losses or PAIR_LOSSES)
    worker = PMLWorker(args.peer_python, args.threads)
    rows = []
    try:
        for batch in args.pair_batch_sizes:
            for name in names:
                labels, emb = (tf.constant(a) for a in make_batch(batch, args.pair_classes, 0))
                proxies = None
                if name == "arcface":
                    proxies = tf.constant(make_proxies(args.pair_classes))
                loss = build_pair_loss(name, args.pair_classes)
                default = make_proxy_step(loss, labels, emb, proxies)
                xla = make_proxy_step(loss, labels, emb, proxies, jit_compile=True)
                ready = worker.request({"loss": name, "batch": batch, "classes": args.pair_classes,
                                        "seed": 0})
                times = {"default": [], "xla": [], "pml": []}
                for _ in range(repeats):  # round-robin; PML's time is measured in its worker
                    for key, run in (("default", default), ("xla", xla)):
                        start = time.perf_counter()
                        run()
                        times[key].append((time.perf_counter() - start) * 1000.0)
                    times["pml"].append(worker.request({"run": True})["ms"])
                ms = {key: statistics.median(values) for key, values in times.items()}
                row = {"batch_size": batch, "loss": name, "default_ms": ms["default"],
                       "xla_ms": ms["xla"], "pml_ms": ms["pml"],
                       "default_over_pml": ms["default"] / ms["pml"],
                       "xla_over_default": ms["xla"] / ms["default"],
                       "value": float(default()[0]), "pml_value": ready["value"]}
                rows.append(row)
                print(f"  B={batch:5d} {name:17s} ours {ms['default']:9.2f} ms  xla {ms['xla']:9.2f} ms"
                      f"  pml {ms['pml']:9.2f} ms  ours/pml {row['default_over_pml']:5.2f}"
                      f"  xla/default {row['xla_over_default']:5.2f}", flush=True)
    finally:
        worker.close()
    return rows, worker.info


def print_pair_table(rows: list, repeats: int, info: dict, threads: int) -> None:
    print(f"\npair losses vs PyTorch Metric Learning {info['pml']} (torch {info['torch']}), "
          f"forward+backward ms, median of {repeats}, {threads} intra-op threads each, "
          f"D={EMBEDDING_DIM}, P x K with K={IMAGES_PER_ITEM}")
    print(f"{'B':>5} {'loss':<17}{'ours':>9}{'XLA':>9}{'PML':>9}{'ours/PML':>10}{'XLA/ours':>10}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['loss']:<17}{r['default_ms']:>9.2f}{r['xla_ms']:>9.2f}"
              f"{r['pml_ms']:>9.2f}{r['default_over_pml']:>10.2f}{r['xla_over_default']:>10.2f}")


def xla_rows(args, modes) -> list:
    """Per (B, loss, mode): default vs XLA, fixed batch and a new label batch per call."""
    rows = []
    for batch_size in args.batch_sizes:
        fixed = [make_batch(batch_size, 0)]
        fresh = [make_batch(batch_size, seed) for seed in range(1, args.new_batches + 1)]
        for kind in ("triplet", "atl"):
            for mining in modes:
                steps, compiles = {}, {}
                for jit in (False, True):
                    loss = build_loss(kind, mining)  # one loss object per step function
                    for batches, name in ((fixed, "fixed"), (fresh, "new")):
                        run = make_input_step(loss, batches, jit)
                        before = count_compilations()
                        start = time.perf_counter()
                        run()  # trace (+ compile)
                        first_ms = (time.perf_counter() - start) * 1000.0
                        compiles[(jit, name)] = count_compilations() - before
                        compiles[(jit, name, "first_ms")] = first_ms
                        steps[(jit, name)] = run
                # Each new-batch step sees every batch once or more inside the repeats.
                repeats = max(args.repeats, len(fresh))
                ms = time_interleaved(steps, repeats, compiles)
                row = {
                    "batch_size": batch_size, "loss": kind, "mining": mining,
                    "default_fixed_ms": ms[(False, "fixed")], "xla_fixed_ms": ms[(True, "fixed")],
                    "default_new_ms": ms[(False, "new")], "xla_new_ms": ms[(True, "new")],
                    "xla_first_call_ms": compiles[(True, "new", "first_ms")],
                    "xla_compilations_new_batches": compiles[(True, "new")],
                    "new_batches": len(fresh),
                }
                row["xla_over_default_fixed"] = row["xla_fixed_ms"] / row["default_fixed_ms"]
                row["xla_over_default_new"] = row["xla_new_ms"] / row["default_new_ms"]
                rows.append(row)
                print(f"  B={batch_size:5d} {kind:7s} {mining:10s} default {row['default_new_ms']:8.2f}"
                      f" ms  xla {row['xla_new_ms']:8.2f} ms (x{row['xla_over_default_new']:.2f}),"
                      f" {row['xla_compilations_new_batches']} compilation(s) over "
                      f"{len(fresh)} label batches", flush=True)
    return rows


def jax_child(args, modes) -> int:
    """JAX backend rows (run in a subprocess with KERAS_BACKEND=jax); prints JSON."""
    import jax

    rows = []
    for batch_size in args.batch_sizes:
        fixed = [tuple(jax.numpy.asarray(a) for a in make_batch_np(batch_size, 0))]
        fresh = [tuple(jax.numpy.asarray(a) for a in make_batch_np(batch_size, seed))
                 for seed in range(1, args.new_batches + 1)]
        for kind in ("triplet", "atl"):
            for mining in modes:
                loss = build_loss(kind, mining)

                def value(emb, labels, text, loss=loss):
                    return loss(_targets(loss, labels, text), emb)

                step = jax.jit(jax.value_and_grad(value))
                steps = {}
                first = {}
                for batches, name in ((fixed, "fixed"), (fresh, "new")):
                    position = [0]

                    def run(batches=batches, position=position):
                        labels, emb, text = batches[position[0] % len(batches)]
                        position[0] += 1
                        out = step(emb, labels, text)
                        jax.block_until_ready(out)
                        return out

                    start = time.perf_counter()
                    out = run()
                    first[name] = (time.perf_counter() - start) * 1000.0
                    if not np.isfinite(float(out[0])):
                        raise RuntimeError(f"non-finite JAX loss for {loss.get_config()}")
                    steps[name] = run
                ms = time_interleaved(steps, max(args.repeats, len(fresh)))
                rows.append({"batch_size": batch_size, "loss": kind, "mining": mining,
                             "jax_fixed_ms": ms["fixed"], "jax_new_ms": ms["new"],
                             "jax_first_call_ms": first["fixed"],
                             "jax_compilations": int(step._cache_size()),
                             "new_batches": len(fresh)})
    print("JSON:" + json.dumps({"jax": jax.__version__, "rows": rows}), flush=True)
    return 0


def run_jax_subprocess(args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--jax-child", "1",
               "--batch-sizes", *map(str, args.batch_sizes), "--repeats", str(args.repeats),
               "--new-batches", str(args.new_batches)]
    if args.modes:
        command += ["--modes", *args.modes]
    if args.undeclared:
        command.append("--undeclared")
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("JSON:"):
            return json.loads(line[5:])
    raise RuntimeError(f"JAX run failed:\n{out.stderr[-3000:]}")


def _commit() -> str:
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or "unknown"


def main(args: argparse.Namespace) -> int:
    modes = tuple(args.modes or MINING_MODES)
    if args.jax_child:
        return jax_child(args, modes)
    if args.skip_default and not (args.xla or args.jax or args.proxy or args.pair):
        raise SystemExit("--skip-default needs --xla, --jax, --proxy or --pair (nothing else to time)")
    import tensorflow as tf

    if args.pair:  # the same intra-op thread count as the PML worker (before any op runs)
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)

    tf.get_logger().setLevel("ERROR")  # each configuration traces its own step: retracing notes are expected
    rows, semi_over_hard = ([], {}) if args.skip_default else default_rows(args, modes)
    print()
    print(f"forward+backward ms (median of {args.repeats}), D={EMBEDDING_DIM}, T={TEXT_DIM}, "
          f"P x K batches with K={IMAGES_PER_ITEM}"
          f"{'' if args.undeclared else ', max_images_per_label=K'}")
    extra = f" {'ATL per-row text':>17} {'ratio':>6}" if args.per_row_text else ""
    print(f"{'B':>5} {'mining':<11} {'Triplet':>10} {'ATL':>10} {'ATL/Triplet':>12}{extra}")
    for r in rows:
        extra = (f" {r['atl_per_row_text_ms']:>17.2f} {r['atl_per_row_text_over_triplet']:>6.2f}"
                 if args.per_row_text else "")
        print(f"{r['batch_size']:>5} {r['mining']:<11} {r['triplet_ms']:>10.2f} "
              f"{r['atl_ms']:>10.2f} {r['atl_over_triplet']:>12.2f}{extra}")
    if semi_over_hard:
        print()
        print(f"{'B':>5} {'semi_hard/batch_hard (Triplet)':>31} {'(ATL)':>8}")
        for batch_size, ratio in semi_over_hard.items():
            print(f"{batch_size:>5} {ratio['triplet']:>31.2f} {ratio['atl']:>8.2f}")

    result = {
        "config": {
            "batch_sizes": args.batch_sizes, "repeats": args.repeats, "modes": list(modes),
            "embedding_dim": EMBEDDING_DIM, "text_dim": TEXT_DIM,
            "images_per_item": IMAGES_PER_ITEM, "per_row_text": args.per_row_text,
            "max_images_per_label": None if args.undeclared else IMAGES_PER_ITEM,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
        },
        "rows": rows,
        "semi_hard_over_batch_hard": semi_over_hard,
    }

    if args.proxy:
        print("\nproxy losses (issue 15) vs ATL batch_hard:")
        result["proxy_rows"] = proxy_rows(args)
        result["config"]["proxy_repeats"] = args.proxy_repeats or args.repeats
        print_proxy_table(result["proxy_rows"], args.proxy_repeats or args.repeats)
    if args.pair:
        print("\npair losses (issue 24) vs PML 2.9:")
        load_before = os.getloadavg()
        pair, info = pair_rows(args)
        result["pair_rows"] = pair
        result["config"].update({
            "pair_repeats": args.pair_repeats or args.repeats, "threads": args.threads,
            "pair_classes": args.pair_classes, "pml": info, "load_before": load_before,
            "load_after": os.getloadavg(), "commit": _commit(),
            "processor": platform.processor() or platform.machine()})
        print_pair_table(pair, args.pair_repeats or args.repeats, info, args.threads)
        print(f"load average before {load_before}, after {os.getloadavg()}; commit "
              f"{result['config']['commit']}; {os.cpu_count()} CPUs")
    if args.xla:
        print("\nXLA (tf.function(jit_compile=True)) vs default tf.function:")
        xrows = xla_rows(args, modes)
        result["xla_rows"] = xrows
        print(f"\n{'B':>5} {'loss':<8}{'mining':<11}{'fixed: default':>15}{'xla':>9}{'ratio':>7}"
              f"{'new batch: default':>20}{'xla':>9}{'ratio':>7}{'compiles':>10}")
        for r in xrows:
            print(f"{r['batch_size']:>5} {r['loss']:<8}{r['mining']:<11}{r['default_fixed_ms']:>15.2f}"
                  f"{r['xla_fixed_ms']:>9.2f}{r['xla_over_default_fixed']:>7.2f}"
                  f"{r['default_new_ms']:>20.2f}{r['xla_new_ms']:>9.2f}"
                  f"{r['xla_over_default_new']:>7.2f}"
                  f"{r['xla_compilations_new_batches']:>6}/{r['new_batches']}")
    if args.jax:
        jax_result = run_jax_subprocess(args)
        result["jax"] = jax_result
        default_ms = {(r["batch_size"], r["loss"], r["mining"]): r["default_new_ms"]
                      for r in result.get("xla_rows", [])}
        print(f"\nJAX {jax_result['jax']} backend (jax.jit of value_and_grad, another process):")
        print(f"{'B':>5} {'loss':<8}{'mining':<11}{'fixed ms':>9}{'new ms':>9}{'compiles':>10}"
              f"{'first ms':>10}{'vs TF default':>15}")
        for r in jax_result["rows"]:
            tf_ms = default_ms.get((r["batch_size"], r["loss"], r["mining"]))
            ratio = f"{r['jax_new_ms'] / tf_ms:>15.2f}" if tf_ms else f"{'-':>15}"
            print(f"{r['batch_size']:>5} {r['loss']:<8}{r['mining']:<11}{r['jax_fixed_ms']:>9.2f}"
                  f"{r['jax_new_ms']:>9.2f}{r['jax_compilations']:>6}/{r['new_batches'] + 1}"
                  f"{r['jax_first_call_ms']:>10.0f}{ratio}")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
