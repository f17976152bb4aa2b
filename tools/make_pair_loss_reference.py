"""Write tests/data/pair_losses_pml.json: pair-loss and ArcFace values and gradients from
PyTorch Metric Learning 2.9 on fixed inputs, for tests/test_pair_losses.py.

PyTorch and PML are NOT dependencies of atl-keras: run this once in the benchmark
virtualenv (the test suite only reads the committed JSON):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch "pytorch-metric-learning==2.9.*" numpy   # CPU torch is enough
    .venv-bench/bin/python tools/make_pair_loss_reference.py

Every loss runs with PML's default distance and reducer, in float64:
ContrastiveLoss (LpDistance, AvgNonZeroReducer per pair sign), MultiSimilarityLoss
(CosineSimilarity, MeanReducer; also with MultiSimilarityMiner), CircleLoss and SupConLoss
(CosineSimilarity, AvgNonZeroReducer), ArcFaceLoss and SubCenterArcFaceLoss (MeanReducer,
the class weights ``W = proxies.T``). The batches include P x K, uneven labels, no positive
pair, no negative pair, a single row and zero-distance duplicates.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytorch_metric_learning
import torch
from pytorch_metric_learning import losses, miners

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "data", "pair_losses_pml.json")

#: (name, batch, dim, label rule, seed)
BATCHES = (
    ("pk", 12, 6, "pk2", 0),
    ("pk4", 16, 8, "pk4", 1),
    ("uneven", 10, 5, "uneven", 2),
    ("no_positive_pair", 6, 4, "distinct", 3),
    ("no_negative_pair", 5, 4, "one", 4),
    ("single_row", 1, 4, "one", 5),
    ("duplicates", 8, 4, "dup", 6),
)

#: (loss name, constructor keyword arguments, uses the multi-similarity miner)
PAIR_LOSSES = (
    ("contrastive", {}, False),
    ("contrastive", {"pos_margin": 0.2, "neg_margin": 0.8}, False),
    ("contrastive", {}, True),
    ("multi_similarity", {}, False),
    ("multi_similarity", {"alpha": 1.0, "beta": 10.0, "base": 0.3}, False),
    ("multi_similarity", {}, True),
    ("circle", {}, False),
    ("circle", {"m": 0.25, "gamma": 32.0}, False),
    ("supcon", {}, False),
    ("supcon", {"temperature": 0.5}, False),
)

#: (loss name, keyword arguments, classes, sub-centres)
PROXY_LOSSES = (
    ("arcface", {}, 8, 1),
    ("arcface", {"margin": 20.0, "scale": 16.0}, 8, 1),
    ("sub_center_arcface", {}, 8, 3),
    ("sub_center_arcface", {"margin": 10.0, "scale": 30.0, "sub_centers": 2}, 8, 2),
)

CLASSES = {
    "contrastive": losses.ContrastiveLoss,
    "multi_similarity": losses.MultiSimilarityLoss,
    "circle": losses.CircleLoss,
    "supcon": losses.SupConLoss,
    "arcface": losses.ArcFaceLoss,
    "sub_center_arcface": losses.SubCenterArcFaceLoss,
}
MINER_EPSILON = 0.1


def batch_inputs(batch: int, dim: int, rule: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(batch, dim))
    if rule == "pk2":
        labels = np.repeat(rng.permutation(8)[: batch // 2], 2)
    elif rule == "pk4":
        labels = np.repeat(rng.permutation(8)[: batch // 4], 4)
    elif rule == "uneven":  # a mix of pairs, a triple and singletons
        labels = np.array([3, 3, 3, 5, 5, 0, 1, 6, 6, 7])
    elif rule == "distinct":
        labels = rng.permutation(8)[:batch]
    elif rule == "one":
        labels = np.full(batch, 2)
    else:  # zero-distance duplicates: positive pairs and a negative pair at distance 0
        labels = np.array([0, 0, 0, 1, 2, 2, 2, 1])
        embeddings[1] = embeddings[0]
        embeddings[3] = 2.0 * embeddings[2]  # label 1 vs label 0: the same unit vector
        embeddings[6] = embeddings[5]
    return embeddings, labels.astype(np.int64)


def run_pair(name: str, kwargs: dict, mined: bool, embeddings: np.ndarray, labels: np.ndarray) -> dict:
    loss_fn = CLASSES[name](**kwargs)
    emb = torch.tensor(embeddings, requires_grad=True)
    lab = torch.tensor(labels)
    indices = miners.MultiSimilarityMiner(epsilon=MINER_EPSILON)(emb, lab) if mined else None
    loss = loss_fn(emb, lab, indices)
    if loss.requires_grad:
        loss.backward()
        grad = emb.grad.numpy()
    else:  # PML returns a constant 0 when nothing is mined
        grad = np.zeros_like(embeddings)
    out = {"loss": name, "kwargs": kwargs, "miner_epsilon": MINER_EPSILON if mined else None,
           "value": float(loss.item()), "grad_embeddings": grad.tolist()}
    if mined:
        a1, p, a2, n = (t.numpy().tolist() for t in indices)
        out["mined_positive_pairs"] = sorted(zip(a1, p))
        out["mined_negative_pairs"] = sorted(zip(a2, n))
    return out


def run_proxy(name: str, kwargs: dict, classes: int, sub_centers: int,
              embeddings: np.ndarray, labels: np.ndarray, rule: str, seed: int) -> dict:
    rng = np.random.default_rng(100 + seed)
    proxies = rng.normal(size=(classes * sub_centers, embeddings.shape[1]))
    if rule == "dup":  # an embedding exactly on its class' (first) proxy
        proxies[labels[2] * sub_centers] = embeddings[2]
    loss_fn = CLASSES[name](num_classes=classes, embedding_size=embeddings.shape[1], **kwargs)
    loss_fn.W.data = torch.tensor(proxies.T.copy())
    emb = torch.tensor(embeddings, requires_grad=True)
    loss = loss_fn(emb, torch.tensor(labels))
    loss.backward()
    grad_e, grad_w = emb.grad.numpy(), loss_fn.W.grad.numpy().T
    # On its proxy (angle 0) the gradient's direction is undefined and PML's acos has an
    # infinite slope: such gradients are left out (the tests check they are finite).
    finite = rule != "dup" and bool(np.all(np.isfinite(grad_e)) and np.all(np.isfinite(grad_w)))
    return {"loss": name, "kwargs": kwargs, "classes": classes, "sub_centers": sub_centers,
            "proxies": proxies.tolist(), "value": float(loss.item()),
            "grad_embeddings": grad_e.tolist() if finite else None,
            "grad_proxies": grad_w.tolist() if finite else None}


def main() -> int:
    torch.set_default_dtype(torch.float64)
    cases = []
    for batch_name, batch, dim, rule, seed in BATCHES:
        embeddings, labels = batch_inputs(batch, dim, rule, seed)
        results = [run_pair(name, kwargs, mined, embeddings, labels)
                   for name, kwargs, mined in PAIR_LOSSES]
        results += [run_proxy(name, kwargs, classes, k, embeddings, labels, rule, seed)
                    for name, kwargs, classes, k in PROXY_LOSSES]
        cases.append({"name": batch_name, "embeddings": embeddings.tolist(),
                      "labels": labels.tolist(), "results": results})
        print(f"{batch_name}: " + ", ".join(f"{r['loss']} {r['value']:.5f}" for r in results))
    payload = {
        "generator": "tools/make_pair_loss_reference.py",
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "torch": torch.__version__,
        "dtype": "float64",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
