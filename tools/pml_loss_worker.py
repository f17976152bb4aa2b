"""PyTorch Metric Learning 2.9 timing worker for `tools/bench_loss.py --pair`.

Runs in the benchmark virtualenv (torch + pytorch-metric-learning, no atl_keras):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch "pytorch-metric-learning==2.9.*" numpy

Protocol (one JSON object per line on stdin / stdout): ``{"threads": N}`` once, then
``{"loss": name, "batch": B, "classes": C, "seed": s}`` prepares that configuration (three
untimed calls warm up) and ``{"run": true}`` times one forward + backward of the
prepared configuration and answers ``{"ms": ...}``. Both sides build their batch with
`make_batch` (numpy, same seed; torch is imported only in `main`), so they time the same
work.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

EMBEDDING_DIM = 128
IMAGES_PER_ITEM = 4


def make_batch(batch: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """labels [B] in [0, C) (P x K, repeats when B / K > C), unit float32 embeddings [B, D]
    (bench_loss.py builds its side's batch with this function too)."""
    rng = np.random.default_rng(seed)
    items = batch // IMAGES_PER_ITEM
    labels = np.resize(np.repeat(rng.choice(classes, size=items, replace=items > classes),
                                 IMAGES_PER_ITEM), batch).astype(np.int64)
    emb = rng.normal(size=(batch, EMBEDDING_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return labels, emb


def make_proxies(classes: int, seed: int = 1) -> np.ndarray:
    """ArcFace's class weights ``[C, D]`` (PML's ``W`` is their transpose), both sides."""
    return np.random.default_rng(seed).normal(size=(classes, EMBEDDING_DIM)).astype(np.float32)


def build(name: str, classes: int):
    """(loss module, miner or None) with PML's defaults."""
    import torch
    from pytorch_metric_learning import losses, miners

    if name == "contrastive":
        return losses.ContrastiveLoss(), None
    if name == "multi_similarity":
        return losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    if name == "circle":
        return losses.CircleLoss(), None
    if name == "supcon":
        return losses.SupConLoss(), None
    if name == "arcface":
        loss = losses.ArcFaceLoss(num_classes=classes, embedding_size=EMBEDDING_DIM)
        loss.W.data = torch.tensor(make_proxies(classes).T.copy())
        return loss, None
    raise ValueError(f"unknown loss {name!r}")


def main() -> int:
    import pytorch_metric_learning
    import torch

    step = None
    for line in sys.stdin:
        request = json.loads(line)
        if "threads" in request:
            torch.set_num_threads(int(request["threads"]))
            reply = {"torch": torch.__version__, "pml": pytorch_metric_learning.__version__,
                     "threads": torch.get_num_threads()}
        elif "loss" in request:
            labels, emb = make_batch(request["batch"], request["classes"], request["seed"])
            loss_fn, miner = build(request["loss"], request["classes"])
            labels_t = torch.tensor(labels)

            def step(loss_fn=loss_fn, miner=miner, labels_t=labels_t, emb=emb):
                x = torch.tensor(emb, requires_grad=True)
                pairs = miner(x, labels_t) if miner is not None else None
                value = loss_fn(x, labels_t, pairs)
                value.backward()
                return float(value.item())

            for _ in range(3):  # warm-up: allocator, thread pool
                value = step()
            reply = {"ready": True, "value": value}
        else:
            start = time.perf_counter()
            step()
            reply = {"ms": (time.perf_counter() - start) * 1000.0}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
