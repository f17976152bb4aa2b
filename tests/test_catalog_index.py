"""Catalog indexing: rows -> a new export version; incremental cache, bad images, --add/--remove, CLI."""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from atl_keras import catalog_index as ci
from atl_keras import embedding
from atl_keras.catalog_index import CatalogError, index_catalog, read_index_catalog
from atl_keras.export import existing_versions, load_export, load_manifest

SHAPE = (16, 16, 3)


def tiny_model() -> keras.Model:
    """Pixels [B, 16, 16, 3] -> unit vectors [B, 8]."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8)(x)
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


def write_image(path: str, seed: int, size: tuple[int, int] = (16, 16)) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(*size, 3)).astype(np.uint8)
    data = tf.io.encode_png(image) if path.endswith(".png") else tf.io.encode_jpeg(image)
    tf.io.write_file(path, data)


def write_catalog(folder, n: int, seed: int = 0, name: str = "products.csv", item: str = "sku") -> str:
    """`n` rows, 2 images per item, a colour column; non-square images every 5th row."""
    os.makedirs(folder / "img", exist_ok=True)
    path = str(folder / name)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "item_id", "colour"])
        for i in range(n):
            image = f"img/{name.split('.')[0]}-{i:04d}.png"
            write_image(str(folder / image), seed * 100_000 + i, (16, 16) if i % 5 else (12, 20))
            writer.writerow([image, f"{item}-{i // 2}", ["red", "blue"][i % 2]])
    return path


@pytest.fixture()
def counted(monkeypatch):
    """Counts the images that really go through the model."""
    seen = []
    original = embedding.embed_batches

    def counting(model, images, **kwargs):
        for indices, vectors in original(model, images, **kwargs):
            seen.extend(images[i] for i in indices)
            yield indices, vectors

    monkeypatch.setattr(embedding, "embed_batches", counting)
    return seen


def test_results_carry_item_id_image_id_and_metadata(tmp_path, counted):
    catalog = write_catalog(tmp_path, 40)
    base = str(tmp_path / "shop")
    result = index_catalog(tiny_model(), catalog, base, portable_output_base=str(tmp_path / "shop-portable"))
    assert result.export.version == 1 and len(counted) == 40
    manifest = load_manifest(result.export.path)
    assert manifest["catalog"]["indexed"] == 40 and manifest["catalog"]["embedded"] == 40
    assert manifest["preprocessing"]["resize"] == "pad"
    query = open(tmp_path / "img" / "products-0005.png", "rb").read()  # a non-square row
    for path in (result.export.path, result.export.portable_path):
        loaded = load_export(path)
        name = "retrieve" if "retrieve" in loaded.signatures else "retrieve_exact"
        out = loaded.signatures[name](images=tf.constant([query]), k=tf.constant(3))
        assert out["ids"].numpy()[0, 0].decode() == "sku-2"
        assert out["image_ids"].numpy()[0, 0].decode() == "img/products-0005.png"
        assert json.loads(out["metadata"].numpy()[0, 0].decode()) == {"colour": "blue"}
        assert out["scores"].numpy()[0, 0] >= 0.9999  # same preprocessing as the indexing decode


def test_gallery_metadata_as_dicts_or_json_text_and_bad_text_refused_before_any_work(tmp_path):
    from atl_keras.export import ExportError, GalleryRows, export_embeddings

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(6, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    ids = [f"sku-{i}" for i in range(6)]
    metadata = [{"colour": "red", "n": i} if i % 2 else json.dumps({"colour": "blue", "n": i}) for i in range(6)]
    result = export_embeddings(tiny_model(), gallery, ids, str(tmp_path / "ok"),
                               gallery_rows=GalleryRows([f"img-{i}" for i in range(6)], metadata))
    search = load_export(result.path).signatures["retrieve_exact"]
    pixels = tf.constant(np.zeros((1, 16, 16, 3), np.uint8))
    out = search(images=tf.io.encode_png(pixels[0])[None], k=tf.constant(6))
    for index, text in zip(out["indices"].numpy()[0], out["metadata"].numpy()[0]):
        assert json.loads(text.decode()) == {"colour": "red" if index % 2 else "blue", "n": int(index)}
    for bad, message in (("{\"a\": 1}\n{}", "not one line"), ("[1, 2]", "not one line"),
                         ("not json", "not one line"), (3, "must be a dict")):
        base = str(tmp_path / "bad")
        with pytest.raises(ExportError, match=message):
            export_embeddings(tiny_model(), gallery, ids, base,
                              gallery_rows=GalleryRows([f"img-{i}" for i in range(6)], [{}] * 5 + [bad]))
        assert existing_versions(base) == []
    with pytest.raises(ExportError, match="5 metadata entries for 6"):
        export_embeddings(tiny_model(), gallery, ids, str(tmp_path / "bad"),
                          gallery_rows=GalleryRows([f"img-{i}" for i in range(6)], [{}] * 5))


def test_reindex_after_changing_one_percent_embeds_one_percent(tmp_path, counted):
    catalog = write_catalog(tmp_path, 200)
    base = str(tmp_path / "shop")
    index_catalog(tiny_model(), catalog, base)
    assert len(counted) == 200
    counted.clear()
    for i in (17, 123):  # 1% of the rows get new photos
        write_image(str(tmp_path / "img" / f"products-{i:04d}.png"), seed=999 + i)
    second = index_catalog(tiny_model(), catalog, base)
    assert sorted(counted) == sorted(str(tmp_path / "img" / f"products-{i:04d}.png") for i in (17, 123))
    assert second.counts["embedded"] == 2 and second.counts["cached"] == 198
    assert second.export.version == 2
    # a different model (other weights) never reuses the first model's vectors
    counted.clear()
    other = tiny_model()
    other.set_weights([w + 0.01 for w in other.get_weights()])
    index_catalog(other, catalog, base)
    assert len(counted) == 200


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
    catalog = write_catalog(tmp_path, 30)
    os.remove(tmp_path / "img" / "products-0003.png")
    (tmp_path / "img" / "products-0004.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "img" / "products-0008.png").write_bytes(b"")
    result = index_catalog(tiny_model(), catalog, str(tmp_path / "shop"))
    counts = load_manifest(result.export.path)["catalog"]
    assert counts["indexed"] == 27 and counts["skipped_missing"] == 2 and counts["skipped_corrupt"] == 1
    assert {s["image_id"] for s in result.skipped} == {f"img/products-000{i}.png" for i in (3, 4, 8)}


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_strict_stops_and_writes_nothing(tmp_path, bad):
    catalog = write_catalog(tmp_path, 12)
    target = tmp_path / "img" / "products-0002.png"
    if bad == "missing":
        os.remove(target)
    else:
        target.write_bytes(b"GIF89a garbage")
    base = str(tmp_path / "shop")
    with pytest.raises(CatalogError, match="products-0002.png"):
        index_catalog(tiny_model(), catalog, base, strict=True)
    assert existing_versions(base) == []
    assert [n for n in os.listdir(base) if not n.startswith(".embedding-cache")] == []


def test_add_and_remove_edit_the_latest_version_embedding_only_new_rows(tmp_path, counted):
    catalog = write_catalog(tmp_path, 20)
    base = str(tmp_path / "shop")
    index_catalog(tiny_model(), catalog, base)
    counted.clear()
    extra = write_catalog(tmp_path, 4, seed=7, name="new.csv", item="new")
    result = index_catalog(tiny_model(), None, base, add=extra, remove=["sku-0", "sku-3"])
    assert len(counted) == 4
    assert result.counts["removed"] == 4 and result.counts["added"] == 4
    ids = (open(os.path.join(result.export.path, "assets", "gallery_ids.txt")).read().split())
    assert len(ids) == 20 and "sku-0" not in ids and "sku-3" not in ids
    image_ids = open(os.path.join(result.export.path, "assets", "gallery_image_ids.txt")).read().split()
    assert "img/new-0000.png" in image_ids


def test_folder_catalog_and_jsonl(tmp_path):
    folder = tmp_path / "photos" / "shirts"
    folder.mkdir(parents=True)
    for i in range(3):
        write_image(str(folder / f"s{i}.jpg"), i)
    rows = read_index_catalog(str(tmp_path / "photos"))
    assert [(r.item_id, r.image_id) for r in rows] == [(f"shirts/s{i}", f"shirts/s{i}.jpg") for i in range(3)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"image": "photos/shirts/s1.jpg", "item_id": "A", "price": 3}\n')
    (row,) = read_index_catalog(str(jsonl))
    assert row.metadata == {"price": 3} and row.image.endswith("s1.jpg")
    with pytest.raises(CatalogError, match="item_id"):
        bad = tmp_path / "bad.csv"
        bad.write_text("image\nx.png\n")
        read_index_catalog(str(bad))


def test_atl_index_cli(tmp_path, capsys):
    from atl_keras import cli

    catalog = write_catalog(tmp_path, 10)
    model_path = str(tmp_path / "model.keras")
    tiny_model().save(model_path)
    code = cli.main(["index", "--model", model_path, "--catalog", catalog, "--output-base",
                     str(tmp_path / "shop"), "--portable-output-base", str(tmp_path / "shop-p"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Indexed version 1" in out and existing_versions(str(tmp_path / "shop-p")) == [1]
    assert cli.main(["index", "--model", model_path, "--output-base", str(tmp_path / "none")]) == 2
    assert cli.main(["index", "--model", model_path, "--catalog", catalog, "--output-base",
                     str(tmp_path / "x"), "--leaves-to-search", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_cache_survives_a_torn_append(tmp_path):
    cache = ci.EmbeddingCache(str(tmp_path), "key", dim=4)
    cache.append(["a" * 64, "b" * 64], np.ones((2, 4), np.float32))
    with open(os.path.join(cache.folder, ci.RECORDS_NAME), "ab") as f:  # a kill mid-record
        f.write(np.zeros((1, 4), np.float32).tobytes())
    reopened = ci.EmbeddingCache(str(tmp_path), "key", dim=4)
    assert len(reopened) == 2
    reopened.append(["c" * 64], np.full((1, 4), 2, np.float32))
    np.testing.assert_array_equal(reopened.gather(["c" * 64, "a" * 64]), [[2] * 4, [1] * 4])


def test_cache_appends_see_other_writers_and_their_torn_appends(tmp_path):
    """Two open caches on one folder (two `atl index` runs): each append folds in the other's
    rows, and a torn append another writer left is trimmed before the next rows land."""
    first = ci.EmbeddingCache(str(tmp_path), "key", dim=4)
    second = ci.EmbeddingCache(str(tmp_path), "key", dim=4)
    first.append(["a" * 64], np.full((1, 4), 1, np.float32))
    second.append(["b" * 64, "a" * 64], np.full((2, 4), 2, np.float32))  # "a" is already stored
    with open(os.path.join(first.folder, ci.RECORDS_NAME), "ab") as f:  # a third writer killed mid-append
        f.write(np.full((1, 4), 9, np.float32).tobytes())
    first.append(["c" * 64], np.full((1, 4), 3, np.float32))
    for cache in (first, ci.EmbeddingCache(str(tmp_path), "key", dim=4)):
        assert len(cache) == 3
        np.testing.assert_array_equal(cache.gather(["c" * 64, "b" * 64, "a" * 64]), [[3] * 4, [2] * 4, [1] * 4])


def test_served_results_carry_item_id_image_id_and_metadata_through_the_client(tmp_path, capsys):
    """A catalog export behind the gRPC server (127.0.0.1): `client.retrieve` and `atl query`
    return each result's item id, image id and metadata columns, for both retrieve signatures."""
    from atl_keras.serving import client
    from atl_keras.serving.model_config import ServedModel
    from atl_keras.serving.server import ModelServer, ServerConfig

    catalog = write_catalog(tmp_path, 40)
    base, portable = str(tmp_path / "shop"), str(tmp_path / "shop-portable")
    index_catalog(tiny_model(), catalog, base, portable_output_base=portable)
    rows = {r.image_id: r for r in read_index_catalog(catalog)}
    query_path = str(tmp_path / "img" / "products-0005.png")
    query = open(query_path, "rb").read()
    server = ModelServer(ServerConfig([ServedModel("shop", base), ServedModel("shop-portable", portable)],
                                      port=0, file_system_poll_wait_seconds=0)).start()
    try:
        target = f"127.0.0.1:{server.port}"
        for model, signature in (("shop", "retrieve"), ("shop", "retrieve_exact"), ("shop-portable", "retrieve_exact")):
            (result,) = client.retrieve(target, model, [query], k=4, signature=signature, wait_for_ready=True)
            ids, scores = result  # still an (ids, scores) pair
            assert len(ids) == len(result.image_ids) == len(result.metadata) == 4
            assert result.image_ids[0] == "img/products-0005.png" and ids[0] == "sku-2"
            for item, image_id, metadata in zip(ids, result.image_ids, result.metadata):
                assert rows[image_id].item_id == item and rows[image_id].metadata == metadata
        assert client.main(["--server", target, "--model", "shop", "--image", query_path, "--k", "2"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["query", "rank", "id", "score", "image_id", "metadata"]
        assert table[2].split()[2] == "sku-2" and "img/products-0005.png" in table[2] and '{"colour": "blue"}' in table[2]
    finally:
        server.stop(grace=0)
