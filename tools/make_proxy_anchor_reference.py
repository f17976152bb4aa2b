"""Write tests/data/proxy_anchor_pml.json: ProxyAnchor values and gradients from PyTorch
Metric Learning on fixed inputs, for tests/test_proxy_losses.py.

PyTorch and PML are NOT dependencies of atl-keras: run this once in a separate virtualenv
(the test suite only reads the committed JSON):

    python3 -m venv /tmp/venv-pml
    /tmp/venv-pml/bin/pip install torch "pytorch-metric-learning==2.9.*" numpy   # CPU torch is enough
    /tmp/venv-pml/bin/python tools/make_proxy_anchor_reference.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytorch_metric_learning
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "data", "proxy_anchor_pml.json")

#: (name, batch, classes, dim, margin, alpha, label rule, seed)
CASES = (
    ("defaults", 12, 8, 6, 0.1, 32.0, "pk", 0),
    ("absent_classes", 10, 16, 5, 0.1, 32.0, "few", 1),
    ("wide_margin_small_alpha", 12, 6, 4, 0.3, 8.0, "pk", 2),
    ("one_class", 6, 5, 4, 0.1, 32.0, "one", 3),
    ("duplicate_rows", 8, 4, 3, 0.1, 16.0, "dup", 4),
)


def case_inputs(batch: int, classes: int, dim: int, rule: str, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(batch, dim))
    proxies = rng.normal(size=(classes, dim))
    if rule == "pk":
        labels = np.repeat(rng.permutation(classes)[: batch // 2], 2)
    elif rule == "few":  # 3 of 16 classes appear
        labels = rng.choice(rng.permutation(classes)[:3], size=batch)
    elif rule == "one":
        labels = np.full(batch, 2)
    else:  # identical embeddings and an embedding equal to a proxy
        labels = np.repeat(np.arange(batch // 2) % classes, 2)
        embeddings[1] = embeddings[0]
        embeddings[3] = proxies[labels[3]]
    return embeddings, labels.astype(np.int64), proxies


def main() -> int:
    torch.set_default_dtype(torch.float64)
    results = []
    for name, batch, classes, dim, margin, alpha, rule, seed in CASES:
        embeddings, labels, proxies = case_inputs(batch, classes, dim, rule, seed)
        loss_fn = ProxyAnchorLoss(num_classes=classes, embedding_size=dim, margin=margin, alpha=alpha)
        loss_fn.proxies.data = torch.tensor(proxies)
        emb = torch.tensor(embeddings, requires_grad=True)
        loss = loss_fn(emb, torch.tensor(labels))
        loss.backward()
        results.append({
            "name": name,
            "margin": margin,
            "alpha": alpha,
            "embeddings": embeddings.tolist(),
            "labels": labels.tolist(),
            "proxies": proxies.tolist(),
            "loss": float(loss.item()),
            "grad_embeddings": emb.grad.numpy().tolist(),
            "grad_proxies": loss_fn.proxies.grad.numpy().tolist(),
        })
        print(f"{name}: loss {loss.item():.6f}")
    payload = {
        "generator": "tools/make_proxy_anchor_reference.py",
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "torch": torch.__version__,
        "dtype": "float64",
        "cases": results,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
