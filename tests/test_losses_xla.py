"""The losses under XLA: one compilation per input shape, for any label batch.

XLA recompiles a function whenever a value it needs at compile time (a ``top_k`` size,
an output shape) depends on the data; a tracing counter cannot see that (the trace is
reused, the XLA program is not). So the compile count is read from XLA itself: a
subprocess sets ``XLA_FLAGS=--xla_dump_to`` before TensorFlow loads and counts the
dumped modules (one per compilation). Values are checked against eager execution,
which tests/test_losses.py checks against the float64 loop reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tensorflow as tf  # noqa: E402

import reference_triplets as ref  # noqa: E402
from atl_keras.losses import MINING_MODES, adaptive_triplet_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent(
    """
    import json, os, sys, tempfile
    DUMP = tempfile.mkdtemp(prefix="xla_dump_")
    # LLVM -O0: compiling the B=32 loss programs at the default -O2 took 4x longer; the
    # compilation count and the values do not depend on it (no fast-math either way).
    os.environ["XLA_FLAGS"] = (f"--xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                               " --xla_backend_optimization_level=0")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, keras, tensorflow as tf
    import atl_keras as atl

    def compilations():
        return sum(n.endswith(".before_optimizations.txt") for n in os.listdir(DUMP))

    def pk(seed, b=32, k=4, per_row_text=False):
        rng = np.random.default_rng(seed)
        labels = np.repeat(rng.choice(10**6, b // k, replace=False), k).astype(np.int64)
        emb = rng.normal(size=(b, 6)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        text = rng.normal(size=(b // k, 5)).astype(np.float32)[np.arange(b) // k]
        if per_row_text:
            text[::k] += 1.0
        return labels, emb, text
    """
)


def run_script(body: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT:")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT:"):])


def test_every_mode_compiles_once_for_any_label_batch():
    """Batches with other items, other K (other slot branch), more positives than any
    slot (the sort branch), a label with two texts (the full text branch): one
    compilation per loss and mode, and the eager values."""
    result = run_script(
        """
        batches = [pk(1), pk(2), pk(3, k=8), pk(4, k=32), pk(5, per_row_text=True),
                   pk(6, k=2)]
        out = {}
        for mining in ("batch_all", "batch_hard", "semi_hard"):
            for kind in ("triplet", "atl"):
                if kind == "triplet":
                    loss = atl.TripletLoss(mining=mining)
                    target = lambda l, t: l
                else:
                    loss = atl.AdaptiveTripletLoss(mining=mining, semantic_threshold=0.5)
                    target = lambda l, t: {"label": l, "text_embedding": t}

                @tf.function(jit_compile=True)
                def step(l, e, t):
                    with tf.GradientTape() as tape:
                        tape.watch(e)
                        value = loss(target(l, t), e)
                    return value, tape.gradient(value, e)

                before = compilations()
                errors = []
                for l, e, t in batches:
                    value, grad = step(tf.constant(l), tf.constant(e), tf.constant(t))
                    want = float(loss(target(l, t), e))  # eager
                    errors.append(abs(float(value) - want))
                    assert np.all(np.isfinite(grad.numpy()))
                out[f"{kind}/{mining}"] = [compilations() - before, max(errors),
                                           step.experimental_get_tracing_count()]
        print("RESULT:" + json.dumps(out))
        """
    )
    for name, (compiles, error, traces) in result.items():
        assert compiles == 1, (name, compiles)
        assert traces == 1, (name, traces)
        assert error < 1e-5, (name, error)


def test_fit_with_jit_compile_traces_and_compiles_the_train_step_once():
    """model.fit(jit_compile=True) on a plain functional model, dict targets, a new
    P x K label batch every step, each mode: the loss is traced once inside the train
    function (a counter in the loss) and XLA compiles the train step once."""
    result = run_script(
        """
        class Counting(atl.AdaptiveTripletLoss):
            traces = 0

            def call(self, y_true, y_pred):
                if not isinstance(y_pred, keras.KerasTensor):  # not the symbolic build
                    Counting.traces += 1
                return super().call(y_true, y_pred)

        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(40), 4).astype(np.int64) + 2**30
        x = (rng.normal(size=(40, 8))[labels - 2**30] + rng.normal(size=(160, 8)))
        x = x.reshape(-1, 2, 4, 1).astype(np.float32)
        text = rng.normal(size=(40, 5)).astype(np.float32)[labels - 2**30]
        out = {}
        for mining, k in (("batch_all", None), ("batch_hard", None), ("semi_hard", 4)):
            Counting.traces = 0
            keras.utils.set_random_seed(0)
            inputs = keras.Input((2, 4, 1))
            y = keras.layers.Dense(6)(keras.layers.Flatten()(inputs))
            model = atl.MetricModel(inputs, keras.layers.UnitNormalization()(y))
            model.compile(optimizer=keras.optimizers.SGD(0.3), jit_compile=True,
                          loss=Counting(mining=mining, max_images_per_label=k))
            data = atl.data.pk_dataset(x, labels, text, p=8, k=4, seed=1)
            before = compilations()
            history = model.fit(data, epochs=1, steps_per_epoch=5, verbose=0)
            out[mining] = [Counting.traces, compilations() - before,
                           history.history["loss"][-1]]
        print("RESULT:" + json.dumps(out))
        """
    )
    for mining, (traces, compiles, loss) in result.items():
        assert traces == 1, (mining, traces)
        assert compiles == 1, (mining, compiles)
        assert np.isfinite(loss) and loss > 0.0, (mining, loss)


@pytest.mark.parametrize("mining", MINING_MODES)
def test_adaptive_loss_with_captured_constant_targets_under_xla(mining):
    """Targets closed over as constants (XLA folds them) and passed as inputs agree."""
    rng = np.random.default_rng(3)
    labels = np.repeat(rng.choice(100, 16, replace=False), 4).astype(np.int64)
    emb = rng.normal(size=(64, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text = rng.normal(size=(16, 5)).astype(np.float32)[np.arange(64) // 4]
    captured = {"label": tf.constant(labels), "text_embedding": tf.constant(text)}
    as_constant = tf.function(
        lambda e: adaptive_triplet_loss(captured["label"], e, captured["text_embedding"],
                                        mining=mining), jit_compile=True)
    as_input = tf.function(lambda l, e, t: adaptive_triplet_loss(l, e, t, mining=mining),
                           jit_compile=True)
    want = ref.reference_loss(labels, emb, mining, text=text)
    assert float(as_constant(tf.constant(emb))) == pytest.approx(want, abs=1e-5)
    assert float(as_input(tf.constant(labels), tf.constant(emb), tf.constant(text))) == \
        pytest.approx(want, abs=1e-5)
