"""The cross-batch memory under tf.distribute: 2 logical CPU devices, MirroredStrategy.

Every replica must enqueue the *global* batch in replica order, keep an identical copy of the
queue, and pair its own rows with the remembered global batches. Runs in a subprocess:
logical devices must be configured before TensorFlow initialises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from atl_keras.distribute import logical_cpu_devices
    logical_cpu_devices(2)
    import keras
    import tensorflow as tf
    import atl_keras as atl
    from atl_keras.losses.contrastive import contrastive_loss

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    batches = [(np.repeat(np.arange(4 * s, 4 * s + 4), 4).astype(np.int64),
                rng.normal(size=(16, 4)).astype(np.float32)) for s in range(2)]
    with strategy.scope():
        loss = atl.ContrastiveLoss(memory_size=40, embedding_dim=4)

    def replica_batch(batch):
        def value_fn(context):
            i = context.replica_id_in_sync_group
            return tuple(tf.constant(a[8 * i: 8 * i + 8]) for a in batch)
        return strategy.experimental_distribute_values_from_function(value_fn)

    @tf.function
    def step(labels, emb):
        return strategy.run(lambda l, e: loss(l, e) * strategy.num_replicas_in_sync, args=(labels, emb))

    out = {"losses": []}
    for batch in batches:
        values = strategy.experimental_local_results(step(*replica_batch(batch)))
        out["losses"].append([float(v) for v in values])
    copies = [np.asarray(v) for v in strategy.experimental_local_results(loss.memory.embeddings.value)]
    out["copies_equal"] = bool(np.array_equal(copies[0], copies[1]))
    out["memory_rows"] = np.asarray(loss.memory.embeddings.numpy())[:32].tolist()
    out["memory_labels"] = np.asarray(loss.memory.labels.numpy()).tolist()
    out["filled"] = int(np.asarray(loss.memory.filled.numpy()).sum())
    out["position"] = int(loss.memory.position.numpy())
    # The second step: replica i pairs its 8 rows with the whole first global batch.
    labels1, emb1 = batches[0]
    labels2, emb2 = batches[1]
    memory = (emb1, labels1, np.ones(16, bool))
    out["want"] = [float(contrastive_loss(labels2[8 * i: 8 * i + 8], emb2[8 * i: 8 * i + 8],
                                          memory=memory)) for i in range(2)]
    out["want_first"] = [float(contrastive_loss(labels1[8 * i: 8 * i + 8], emb1[8 * i: 8 * i + 8]))
                         for i in range(2)]
    out["batches"] = [emb1.tolist(), emb2.tolist()]
    out["labels"] = [labels1.tolist(), labels2.tolist()]

    # model.fit under the strategy: the memory fills with every global batch.
    with strategy.scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        model.compile(keras.optimizers.SGD(0.1),
                      loss=atl.MultiSimilarityLoss(memory_size=64, embedding_dim=3))
    x = rng.normal(size=(48, 4)).astype(np.float32)
    y = np.repeat(np.arange(12), 4).astype(np.int64)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    out["fit_loss"] = history.history["loss"]
    out["fit_filled"] = int(np.asarray(model.loss.memory.filled.numpy()).sum())
    out["fit_labels"] = sorted(set(np.asarray(model.loss.memory.labels.numpy()).tolist()))
    print("RESULT " + json.dumps(out))
    """
)


def test_memory_enqueues_the_global_batch_on_every_replica():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    first, second = out["losses"]
    for got, want in zip(first, out["want_first"]):
        assert abs(got - want) < 1e-5  # an empty memory adds no pair
    for got, want in zip(second, out["want"]):
        assert abs(got - want) < 1e-5  # replica i's rows against the whole first global batch
    assert out["copies_equal"]
    np.testing.assert_allclose(out["memory_rows"], np.concatenate(out["batches"]), atol=1e-6)
    assert out["memory_labels"][:32] == out["labels"][0] + out["labels"][1]
    assert out["filled"] == 32 and out["position"] == 32
    assert all(np.isfinite(out["fit_loss"]))
    assert out["fit_filled"] == 48 and out["fit_labels"] == list(range(12))
