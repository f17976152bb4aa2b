"""`atl index` under faults: a damaged embedding cache, disk full, concurrent edits, bad input."""

from __future__ import annotations

import os
import resource
import signal
import warnings

import numpy as np
import pytest
import tensorflow as tf

from atl_keras import catalog_index as ci
from atl_keras.catalog_index import index_catalog
from atl_keras.export import existing_versions, load_export
from atl_keras.preprocessing import Preprocessing
from tests.test_catalog_index import tiny_model, write_catalog

N = 24


def published_gallery(version_path: str) -> tuple[list[str], np.ndarray]:
    """Image ids ``[N]`` and gallery rows ``[N, D]`` of an exported version, in row order."""
    loaded = load_export(version_path)
    if hasattr(loaded, "gallery_embeddings"):
        gallery = loaded.gallery_embeddings.numpy()
    else:
        gallery = loaded.scann_state.dataset.numpy()
    with open(os.path.join(version_path, "assets", "gallery_image_ids.txt"), encoding="utf-8") as f:
        return f.read().split("\n")[:len(gallery)], gallery


def assert_rows_are_fresh_embeddings(version_path: str, folder, expected: int = N) -> None:
    """Every published row equals the embedding its own image gets now (the export's decode + model)."""
    image_ids, gallery = published_gallery(version_path)
    assert len(image_ids) == expected
    embed = load_export(version_path).signatures["serving_default"]
    images = [open(os.path.join(folder, image_id), "rb").read() for image_id in image_ids]
    fresh = embed(images=tf.constant(images))["embeddings"].numpy()
    gallery = gallery.reshape(fresh.shape)
    wrong = [image_ids[i] for i in np.flatnonzero(np.abs(gallery - fresh).max(axis=1) > 1e-5)]
    assert wrong == [], f"{len(wrong)} published rows carry another vector: {wrong[:5]}"


def cache_files(base: str) -> list[str]:
    """The cache's data files (whatever their layout), not its lock."""
    root = os.path.join(base, ".embedding-cache")
    return [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
            if not name.startswith(".")]


def damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    third = len(data) // 3
    if how == "flip":  # bit rot in the keys and in the vectors
        data[third] ^= 0x10
        data[2 * third] ^= 0x01
    elif how == "delete":  # a damaged line / a shifted length: bytes gone mid-file
        del data[third:third + 7]
    elif how == "insert":
        data[third:third] = b"0f3a\n"
    elif how == "truncate":  # disk full: the last write cut short
        del data[-5:]
    elif how == "tail":  # garbage after the last whole record
        data += b"\x7f\xc0\x00\x00garbage"
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["flip", "delete", "insert", "truncate", "tail"])
def test_damaged_cache_is_detected_and_reembedded_never_published(tmp_path, how):
    catalog = write_catalog(tmp_path, N)
    base = str(tmp_path / "shop")
    model = tiny_model()
    index_catalog(model, catalog, base)
    files = cache_files(base)
    assert files
    for path in files:
        damage(path, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = index_catalog(model, catalog, base)
    assert_rows_are_fresh_embeddings(second.export.path, tmp_path)
    assert any("damaged" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert (second.counts["embedded"] >= 1) == (how != "tail")  # garbage after the last record costs none
    third = index_catalog(model, catalog, base)  # and the rerun after it, from the repaired cache
    assert third.counts["embedded"] == 0
    assert_rows_are_fresh_embeddings(third.export.path, tmp_path)


def test_nan_rows_in_the_cache_are_cache_damage_not_a_model_error(tmp_path):
    catalog = write_catalog(tmp_path, N)
    base = str(tmp_path / "shop")
    model = tiny_model()
    rows = ci.read_index_catalog(catalog)
    cache = ci.EmbeddingCache(os.path.join(base, ".embedding-cache"),
                              ci.cache_key(ci.weights_fingerprint(model), Preprocessing.for_model(model)), 8)
    poisoned = np.full((4, 8), np.nan, np.float32)
    poisoned[2] = np.inf
    cache.append([ci.content_hashes([r.image])[0] for r in rows[:4]], poisoned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = index_catalog(model, catalog, base)
    assert any("damaged" in str(w.message) for w in caught)
    assert result.counts["embedded"] == N
    assert_rows_are_fresh_embeddings(result.export.path, tmp_path)


@pytest.fixture()
def file_size_limit():
    """Writes beyond `limit` bytes per file fail (EFBIG), as on a full disk; restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(nbytes: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_disk_full_mid_cache_write_is_one_error_line_then_reruns_publish_true_rows(tmp_path, capsys, file_size_limit):
    from atl_keras import cli

    catalog = write_catalog(tmp_path, N)
    base = str(tmp_path / "shop")
    model_path = str(tmp_path / "model.keras")
    tiny_model().save(model_path)
    argv = ["index", "--model", model_path, "--catalog", catalog, "--output-base", base,
            "--batch-size", "4", "--quiet"]
    file_size_limit(1000)  # the cache file fills up in the middle of a batch's records
    code = cli.main(argv)
    file_size_limit(resource.RLIM_INFINITY)
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("atl index: error:") and "Traceback" not in err, err
    assert existing_versions(base) == []
    assert [n for n in os.listdir(base) if n.startswith((".tmp-", ".reserved-", ".pair-"))] == []
    for run in (1, 2):  # space freed: the campaign's two reruns
        assert cli.main(argv) == 0
        assert_rows_are_fresh_embeddings(os.path.join(base, str(run)), tmp_path)
