"""The loss registry (`atl_keras.losses.registry`) and miners as objects (issue 24).

Adding a loss is one file in atl_keras/losses/ plus one `LossSpec` line: the training
config, `atl train --loss`, `train.build_loss` and `from atl_keras.losses import X` read
the registry, which imports without Keras.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

from atl_keras.losses import registry
from tests.conftest import REPO_ROOT


def test_registry_imports_without_keras():
    script = ("import sys, atl_keras.losses.registry as r\n"
              "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n"
              "print(','.join(r.loss_names()))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ",".join(registry.LOSSES)


def test_cli_and_train_config_read_the_registry():
    from atl_keras.cli import build_parser
    from atl_keras import train

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    actions = {a.dest: a for a in sub.choices["train"]._actions}
    assert tuple(actions["loss"].choices) == registry.loss_names()
    assert tuple(actions["mining"].choices) == registry.MINING_MODES
    assert train.LOSSES == registry.loss_names()
    assert train.PROXY_LOSSES == registry.proxy_loss_names() == (
        "adaptive_proxy", "proxy_anchor", "arcface", "weak_arcface")
    with pytest.raises(ValueError, match="Unknown loss 'nope'; choose one of atl, triplet"):
        train.TrainConfig(loss="nope")


def test_every_registered_loss_resolves():
    import atl_keras.losses as losses

    for spec in registry.LOSSES.values():
        module = __import__(spec.module, fromlist=["_"])
        assert callable(getattr(module, spec.builder)), spec
        for name in module.__all__:
            assert getattr(losses, name) is getattr(module, name)


def test_one_registry_line_adds_a_loss(monkeypatch):
    """A new module + one LossSpec: TrainConfig accepts the name and build_loss builds it."""
    import keras

    from atl_keras import train
    from atl_keras.losses.base import MetricLoss, split_targets

    module = types.ModuleType("atl_keras.losses.tiny_test_loss")

    class TinyLoss(MetricLoss):
        def call(self, y_true, y_pred):
            split_targets(y_true, need_text=False, loss_name="TinyLoss")
            return keras.ops.mean(keras.ops.square(y_pred))

    module.TinyLoss = TinyLoss
    module.__all__ = ["TinyLoss"]
    module.tiny_from_config = lambda config, data=None, item_text=None: TinyLoss(name="tiny")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.LOSSES, "tiny", registry.LossSpec(
        "tiny", module.__name__, "tiny_from_config", "a test loss"))
    config = train.TrainConfig(loss="tiny")
    loss = train.build_loss(config)
    assert isinstance(loss, TinyLoss)
    assert float(loss(np.array([0, 1]), np.ones((2, 3), np.float32))) == pytest.approx(1.0)


def test_miners_are_objects_and_names_are_sugar():
    import atl_keras as atl
    from atl_keras.losses.base import pair_masks
    from atl_keras.losses.mining import BatchHardMiner, Miner, SemiHardMiner, get_miner

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3)
    emb = rng.normal(size=(12, 5)).astype(np.float32)
    for name in registry.MINING_MODES:
        miner = get_miner(name)
        assert isinstance(miner, Miner) and miner.name == name
        by_object = atl.TripletLoss(mining=miner)
        assert by_object.get_config()["mining"] == name  # saved configs keep the name
        assert float(by_object(labels, emb)) == float(atl.TripletLoss(mining=name)(labels, emb))
    # A miner on its own: any [B, B] distances and margins.
    dist = atl.pairwise_distances(emb)
    positive, negative = pair_masks(np.asarray(labels))
    margins = np.full((12, 12), 0.2, np.float32)
    assert float(SemiHardMiner()(dist, margins, positive, negative)) == pytest.approx(
        float(atl.triplet_loss(labels, emb, margin=0.2, mining="semi_hard")), rel=1e-6)
    assert float(BatchHardMiner()(dist, margins, positive, negative, soft_margin=True)) == pytest.approx(
        float(atl.triplet_loss(labels, emb, margin=0.2, soft_margin=True)), rel=1e-6)
    with pytest.raises(ValueError, match="Valid mining modes"):
        get_miner("hardest")
    with pytest.raises(ValueError, match="'batch_all', 'batch_hard', 'semi_hard'"):
        atl.losses.MarginTableTripletLoss(np.zeros((2, 2)), mining="hardest")
