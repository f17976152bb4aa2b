"""Specification of atl_keras.text: TF-Hub text encoders, hashing encoder, description cache."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from atl_keras import text as text_mod  # noqa: E402
from atl_keras.text import (  # noqa: E402
    CacheStats,
    DescriptionCache,
    HashingTextEncoder,
    TextEncoder,
    embed_descriptions,
    load_text_encoder,
)

DIM = 8
BUCKETS = 97


class _BagOfHashes(tf.Module):
    """Tiny TF-Hub-format encoder: lower-case, split on spaces, hash, sum embeddings."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.table = tf.Variable(rng.normal(size=(BUCKETS, DIM)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts):
        words = tf.strings.split(tf.strings.lower(texts))
        ids = tf.strings.to_hash_bucket_fast(words, BUCKETS)
        return tf.reduce_sum(tf.gather(self.table, ids), axis=1) + 1e-3  # "" -> nonzero


def _save_tiny(path: Path, seed: int, signature_only: bool = False) -> Path:
    module = _BagOfHashes(seed)
    if signature_only:
        serve = tf.function(lambda inputs: {"embedding": module(inputs)},
                            input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        holder = tf.Module()
        holder.table = module.table
        tf.saved_model.save(holder, str(path), signatures={"serving_default": serve})
    else:
        tf.saved_model.save(module, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_encoders")
    return {
        "a": _save_tiny(root / "a", seed=0),
        "b": _save_tiny(root / "b", seed=1),
        "sig": _save_tiny(root / "sig", seed=0, signature_only=True),
    }


TEXTS = ["Red cotton T-shirt", "black leather boot", "", "red T-shirt", "Blue jeans slim fit",
         "naïve café crème", "東京 タワー", "a b c d e f g"]


def _reference(path: Path, texts: list[str]) -> np.ndarray:
    """Raw model output, normalised row by row with a Python loop."""
    raw = tf.saved_model.load(str(path))(tf.constant(texts)).numpy()
    return np.stack([r / np.sqrt(sum(float(v) ** 2 for v in r)) for r in raw])


# --------------------------------------------------------------------------- TextEncoder


def test_text_encoder_local_dir_matches_reference_and_is_normalised(tiny_dirs):
    enc = TextEncoder(tiny_dirs["a"], batch_size=256)
    out = enc.encode(TEXTS)
    assert out.shape == (len(TEXTS), DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, _reference(tiny_dirs["a"], TEXTS), atol=1e-6)
    assert enc.dim == DIM
    assert enc.encode([]).shape == (0, DIM)


def test_text_encoder_batching_does_not_change_results(tiny_dirs):
    full = TextEncoder(tiny_dirs["a"], batch_size=256).encode(TEXTS)
    for bs in (1, 3):
        np.testing.assert_allclose(TextEncoder(tiny_dirs["a"], batch_size=bs).encode(TEXTS), full,
                                   atol=1e-6)


def test_text_encoder_signature_only_model(tiny_dirs):
    out = TextEncoder(tiny_dirs["sig"]).encode(TEXTS)
    np.testing.assert_allclose(out, _reference(tiny_dirs["a"], TEXTS), atol=1e-6)


def test_text_encoder_truncates_to_max_length(tiny_dirs):
    enc = TextEncoder(tiny_dirs["a"], max_length=5)
    long = "abcde fghij klmno"
    np.testing.assert_allclose(enc.encode([long]), TextEncoder(tiny_dirs["a"]).encode([long[:5]]),
                               atol=1e-6)
    assert "max_length=5" in enc.identity


def test_text_encoder_identity_is_content_based(tiny_dirs):
    a1, a2 = TextEncoder(tiny_dirs["a"]), TextEncoder(tiny_dirs["a"])
    b = TextEncoder(tiny_dirs["b"])
    assert a1.identity == a2.identity
    assert a1.identity != b.identity
    assert a1.identity.startswith("tfhub:a:")


def test_text_encoder_rejects_bad_input(tiny_dirs):
    enc = TextEncoder(tiny_dirs["a"])
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("one string")
    with pytest.raises(TypeError, match="embed_descriptions"):
        enc.encode(["ok", None])
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder(tiny_dirs["a"], batch_size=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_fails_fast_with_advice():
    url = f"http://127.0.0.1:{_closed_port()}/models/encoder/1"
    with pytest.raises(ConnectionError) as info:
        TextEncoder(url, connect_timeout=2.0)
    msg = str(info.value)
    assert url in msg and "use-m3" in msg and "local directory" in msg


def test_missing_local_path_and_non_savedmodel_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        TextEncoder(tmp_path / "empty")


# --------------------------------------------------------------------------- hashing


def test_hashing_encoder_deterministic_and_normalised():
    texts = ["Red cotton T-shirt", "RED   cotton t-shirt!", "", "Tシャツ 赤"]
    a, b = HashingTextEncoder().encode(texts), HashingTextEncoder().encode(texts)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 512) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a[[0, 1, 3]], axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(a[2], 0.0)  # no tokens -> zero vector
    np.testing.assert_allclose(a[0], a[1], atol=1e-7)  # case and punctuation ignored
    assert not np.allclose(a, HashingTextEncoder(seed=1).encode(texts))


def test_hashing_encoder_matches_bag_of_ngrams_reference():
    enc = HashingTextEncoder(dim=64, ngram_range=(1, 2))
    text = "the red shirt the red"
    grams = ["the", "red", "shirt", "the", "red", "the red", "red shirt", "shirt the", "the red"]
    assert sorted(enc.ngrams(text)) == sorted(grams)
    ref = np.zeros(64)
    for g in grams:
        col, sign = enc._bucket(g)
        ref[col] += sign
    np.testing.assert_allclose(enc.encode([text])[0], ref / np.linalg.norm(ref), atol=1e-6)
    # unigrams only: word order does not matter; with bigrams it does
    uni = HashingTextEncoder(dim=64, ngram_range=(1, 1))
    np.testing.assert_allclose(*uni.encode(["red shirt", "shirt red"]), atol=1e-7)
    assert not np.allclose(*enc.encode(["red shirt", "shirt red"]))


def test_hashing_encoder_similarity_ordering():
    g = HashingTextEncoder().encode([
        "red cotton t-shirt with round neck",
        "blue cotton t-shirt with round neck",
        "black leather ankle boot",
    ])
    assert g[0] @ g[1] > g[0] @ g[2]
    assert g[0] @ g[1] > 0.5


def test_hashing_encoder_validates_config():
    with pytest.raises(ValueError, match="ngram_range"):
        HashingTextEncoder(ngram_range=(2, 1))
    with pytest.raises(ValueError, match="dim"):
        HashingTextEncoder(dim=0)


# --------------------------------------------------------------------------- load_text_encoder


def test_load_text_encoder_by_name(tiny_dirs, tmp_path):
    assert isinstance(load_text_encoder("hashing"), HashingTextEncoder)
    assert load_text_encoder("hashing-64").dim == 64
    enc = load_text_encoder(str(tiny_dirs["a"]))
    assert isinstance(enc, TextEncoder) and enc.dim == DIM
    same = HashingTextEncoder(dim=16)
    assert load_text_encoder(same) is same
    with pytest.raises(FileNotFoundError, match="use-m3"):
        load_text_encoder(str(tmp_path / "no-such-encoder"))


# --------------------------------------------------------------------------- cache


class CountingEncoder:
    """Wraps an encoder and records every batch it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    @property
    def identity(self) -> str:
        return self.inner.identity

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)


def test_cache_encodes_each_unique_text_once_and_zero_fills_empty(tmp_path):
    enc = CountingEncoder(HashingTextEncoder(dim=32))
    cache = DescriptionCache(tmp_path, enc)
    descs = ["red shirt", "boot", "red shirt", None, "", "   ", float("nan"), "boot"]
    with pytest.warns(UserWarning, match="4 of 8 descriptions"):
        out = cache.embed(descs)
    assert enc.calls == [["red shirt", "boot"]]
    assert cache.last_stats == CacheStats(num_descriptions=8, num_unique=2, num_encoded=2,
                                          num_empty=4)
    direct = HashingTextEncoder(dim=32).encode(["red shirt", "boot"])
    np.testing.assert_allclose(out[[0, 2]], direct[[0, 0]])
    np.testing.assert_allclose(out[[1, 7]], direct[[1, 1]])
    np.testing.assert_array_equal(out[3:7], 0.0)
    # second call in the same instance: all hits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cache.embed(["boot", "red shirt"])
    assert len(enc.calls) == 1
    np.testing.assert_array_equal(again, out[[1, 0]])


def test_cache_persists_across_instances_and_only_encodes_new_texts(tmp_path):
    first = CountingEncoder(HashingTextEncoder(dim=32))
    a = DescriptionCache(tmp_path, first).embed(["red shirt", "boot"])
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and DescriptionCache(tmp_path, first).path == files[0]

    second = CountingEncoder(HashingTextEncoder(dim=32))
    cache = DescriptionCache(tmp_path, second)
    assert len(cache) == 2
    b = cache.embed(["boot", "red shirt", "sandal"])
    assert second.calls == [["sandal"]]
    np.testing.assert_array_equal(b[:2], a[[1, 0]])
    assert len(DescriptionCache(tmp_path, second)) == 3


def test_cache_invalidates_on_encoder_identity_change(tmp_path):
    DescriptionCache(tmp_path, HashingTextEncoder(dim=32, seed=0)).embed(["red shirt"])
    other = CountingEncoder(HashingTextEncoder(dim=32, seed=1))
    cache = DescriptionCache(tmp_path, other)
    assert len(cache) == 0
    out = cache.embed(["red shirt"])
    assert other.calls == [["red shirt"]]
    np.testing.assert_allclose(out, HashingTextEncoder(dim=32, seed=1).encode(["red shirt"]))
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_cache_with_tfhub_encoder_identity(tiny_dirs, tmp_path):
    texts = [t for t in TEXTS if t]
    a = CountingEncoder(TextEncoder(tiny_dirs["a"]))
    DescriptionCache(tmp_path, a).embed(texts)
    a_again = CountingEncoder(TextEncoder(tiny_dirs["a"]))
    DescriptionCache(tmp_path, a_again).embed(texts[:3])
    assert a_again.calls == []
    b = CountingEncoder(TextEncoder(tiny_dirs["b"]))
    DescriptionCache(tmp_path, b).embed(texts[:3])
    assert len(b.calls) == 1


def test_cache_unicode_roundtrip(tmp_path):
    texts = ["東京タワーのTシャツ", "naïve café crème brûlée", "футболка красная", "قميص أحمر",
             "🙂 emoji shirt", "e\u0301 combining accent"]
    enc = HashingTextEncoder(dim=64)
    first = DescriptionCache(tmp_path, enc).embed(texts)
    counting = CountingEncoder(enc)
    second = DescriptionCache(tmp_path, counting).embed(texts)
    assert counting.calls == []
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, enc.encode(texts))


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    enc = HashingTextEncoder(dim=16)
    cache = DescriptionCache(tmp_path, enc)
    cache.embed(["kept"])
    before = cache.path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(text_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        DescriptionCache(tmp_path, enc).embed(["new text"])
    monkeypatch.undo()
    assert cache.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # no temp files left
    assert len(DescriptionCache(tmp_path, enc)) == 1


def test_cache_ignores_corrupt_file(tmp_path):
    enc = HashingTextEncoder(dim=16)
    path = DescriptionCache(tmp_path, enc).path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an npz")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        cache = DescriptionCache(tmp_path, enc)
    np.testing.assert_allclose(cache.embed(["x"]), enc.encode(["x"]))


def test_embed_descriptions_memory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = embed_descriptions(["a shirt", "a shirt"], HashingTextEncoder(dim=16))
    assert out.shape == (2, 16)
    np.testing.assert_array_equal(out[0], out[1])
    assert list(tmp_path.iterdir()) == []
    by_name = embed_descriptions(["a shirt"], "hashing-16", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(by_name[0], out[0])
    with pytest.warns(UserWarning, match="1 of 1"):
        only_empty = embed_descriptions([None], HashingTextEncoder(dim=16))
    assert only_empty.shape == (1, 16)
