"""`atl index` under faults: a damaged embedding cache, disk full, concurrent edits, bad input."""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf

from atl_keras import catalog_index as ci
from atl_keras.catalog_index import index_catalog
from atl_keras.export import existing_versions, load_export
from atl_keras.embedding import weights_fingerprint
from atl_keras.preprocessing import Preprocessing
from atl_keras.search.store import loaded_rows
from tests.conftest import REPO_ROOT
from tests.test_catalog_index import tiny_model, write_catalog

N = 24


def published_gallery(version_path: str) -> tuple[list[str], np.ndarray]:
    """Image ids ``[N]`` and gallery rows ``[N, D]`` of an exported version, in row order."""
    gallery = loaded_rows(load_export(version_path))
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
                              ci.cache_key(weights_fingerprint(model), Preprocessing.for_model(model)), 8)
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


# ------------------------------------------------------------------ concurrent edits (item 2)
def test_concurrent_add_and_remove_both_land_in_order(tmp_path):
    """Two real `atl index` processes edit one base while a third edit holds it: both wait,
    then each starts from the version the previous one published; the latest has both edits."""
    catalog = write_catalog(tmp_path, 12)
    extra = write_catalog(tmp_path, 4, seed=7, name="new.csv", item="new")
    base = str(tmp_path / "shop")
    model_path = str(tmp_path / "model.keras")
    tiny_model().save(model_path)
    index_catalog(tiny_model(), catalog, base)
    command = [sys.executable, "-m", "atl_keras.cli", "index", "--model", model_path, "--output-base", base, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    logs = [tmp_path / "add.err", tmp_path / "remove.err"]
    held = os.open(base, os.O_RDONLY | os.O_DIRECTORY)  # another edit holds the base (ci.edit_lock)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        procs = [subprocess.Popen(command + flags, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
                 for flags, log in ((["--add", extra], logs[0]), (["--remove", "sku-1"], logs[1]))]
        deadline = time.time() + 300
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if all("waiting" in log.read_text() for log in logs):
                break
            time.sleep(0.2)
        waited = [("waiting" in log.read_text()) for log in logs]
    finally:
        os.close(held)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [log.read_text() for log in logs]
    assert waited == [True, True], [log.read_text() for log in logs]
    assert existing_versions(base) == [1, 2, 3]
    latest = open(os.path.join(base, "3", "assets", "gallery_ids.txt")).read().split()
    assert "sku-1" not in latest and {f"new-{i}" for i in range(2)} <= set(latest)
    assert len(latest) == 12 - 2 + 4


# ------------------------------------------------------------------ removals (item 5)
def test_remove_of_ids_not_in_the_index_publishes_nothing(tmp_path, capsys):
    from atl_keras import cli

    catalog = write_catalog(tmp_path, 8)
    base = str(tmp_path / "shop")
    model_path = str(tmp_path / "model.keras")
    tiny_model().save(model_path)
    index_catalog(tiny_model(), catalog, base)
    with pytest.raises(ci.CatalogError, match="'sku-99'"):
        index_catalog(tiny_model(), None, base, remove=["sku-1", "sku-99"])
    argv = ["index", "--model", model_path, "--output-base", base, "--quiet", "--remove"]
    assert cli.main(argv + ["gone.txt"]) == 2  # a mistyped file path is not taken as an id
    err = capsys.readouterr().err
    assert "'gone.txt'" in err and "No file" in err and len(err.strip().splitlines()) == 1, err
    assert cli.main(argv + ["sku-1,sku-77"]) == 2
    assert "'sku-77'" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(argv + [str(empty)]) == 2
    assert existing_versions(base) == [1]
    ids = tmp_path / "gone-ids.txt"  # an existing path is a file of ids
    ids.write_text("sku-1\nimg/products-0004.png\n")
    assert cli.main(argv + [str(ids)]) == 0
    published = open(os.path.join(base, "2", "assets", "gallery_image_ids.txt")).read().split()
    assert len(published) == 5 and "img/products-0002.png" not in published and "img/products-0004.png" not in published


# ------------------------------------------------------------------ input errors (item 7)
@pytest.mark.parametrize("name, text, where", [
    ("c.csv", "image,item_id\nimg/products-0000.png,sku-0\nimg/products-0001.png,sku-0,red\n", "c.csv:3"),
    ("c.jsonl", '{"image": "img/products-0000.png", "item_id": "a"}\n5\n', "c.jsonl:2"),
    ("c.jsonl", '{"image": "img/products-0000.png", "item_id": "a"}\n\nnull\n', "c.jsonl:3"),
    ("c.jsonl", '["img/products-0000.png", "a"]\n', "c.jsonl:1"),
    ("c.csv", "image,item_id\nimg/products-0000.png,sku-\xe9\n", "c.csv:2"),
    ("c.csv", "image,item_id\nimg/products-0000.png,a\nimg/products-0000.png,b\n", "c.csv:3"),
])
def test_every_catalog_input_error_is_one_line_with_file_and_line_before_any_work(tmp_path, capsys, name, text, where):
    from atl_keras import cli

    write_catalog(tmp_path, 2)
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))  # the \xe9 row is not UTF-8
    model_path = str(tmp_path / "model.keras")
    tiny_model().save(model_path)
    base = str(tmp_path / "shop")
    for flags in (["--catalog", str(path)], ["--catalog", write_catalog(tmp_path, 2, name="ok.csv"), "--add", str(path)]):
        assert cli.main(["index", "--model", model_path, "--output-base", base, "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("atl index: error:") and where in lines[0], err
        assert not os.path.exists(os.path.join(base, ".embedding-cache")) and existing_versions(base) == []


# ------------------------------------------------------------------ leftovers of killed exports (item 8)
def test_killed_exports_reservations_and_torn_journals_are_cleaned_by_the_next_export(tmp_path):
    import json as json_module
    import socket

    from atl_keras.export import STALE_JOURNAL_SECONDS, export_embeddings

    base = tmp_path / "shop"
    base.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"host": socket.gethostname(), "created": time.time()}
    (base / ".reserved-7").write_text(json_module.dumps({**owner, "pid": dead.pid}))  # killed export
    (base / ".reserved-9").write_text(json_module.dumps({**owner, "pid": os.getpid()}))  # a live one
    for name, age in ((".pair-3-0badc0de.json.tmp", STALE_JOURNAL_SECONDS + 60), (".pair-4-feedf00d.json.tmp", 0)):
        (base / name).write_text('{"moves": [')
        os.utime(base / name, (time.time() - age,) * 2)
    gallery = np.eye(8, dtype=np.float32)[:6]
    result = export_embeddings(tiny_model(), gallery, [f"sku-{i}" for i in range(6)], str(base))
    assert result.version == 10  # the live reservation still counts; the dead one no longer
    left = sorted(n for n in os.listdir(base) if n.startswith("."))
    assert left == [".pair-4-feedf00d.json.tmp", ".reserved-9"], left
