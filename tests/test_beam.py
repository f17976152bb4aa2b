"""`atl embed` (Apache Beam, DirectRunner) + `atl index --embeddings` == `atl index` on the same catalog."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

pytest.importorskip("apache_beam", reason="the [beam] extra is not installed")

from atl_keras.catalog_index import CatalogError, index_catalog, index_embeddings  # noqa: E402
from atl_keras.cli.embed import main as embed_main  # noqa: E402
from atl_keras.cli.index import main as index_main  # noqa: E402
from atl_keras.embedding_files import read_embedding_files  # noqa: E402
from atl_keras.export import load_export, load_manifest  # noqa: E402

from test_embedding import tiny_model  # noqa: E402

ROWS = 300


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A CSV catalog of 300 small images (+ one missing and one corrupt row), a saved model
    and `atl index`'s export of it (main and portable)."""
    root = tmp_path_factory.mktemp("beam")
    os.makedirs(root / "img")
    rng = np.random.default_rng(0)
    with open(root / "cat.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "item_id", "colour"])
        for i in range(ROWS):
            path = f"img/{i:04d}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 256, (12 + i % 5, 16, 3), dtype=np.uint8)).save(root / path)
            writer.writerow([path, f"sku-{i // 3}", ["red", "blue", ""][i % 3]])
        writer.writerow(["img/missing.png", "sku-x", "red"])
    (root / "img" / "0007.png").write_bytes(b"not an image" * 10)
    model = tiny_model()
    model.save(root / "model.keras")
    single = index_catalog(str(root / "model.keras"), str(root / "cat.csv"), str(root / "single"),
                           portable_output_base=str(root / "single-portable"), min_recall=0)
    return root, single


def assert_same_results(x: dict, y: dict, tie: float = 1e-5) -> None:
    """Same scores per rank; per query the same rows (image ids, with their item ids and
    metadata) up to the order of scores within `tie`: the two exports embed through
    different graphs (~1e-7 apart), so near-ties may swap."""
    np.testing.assert_allclose(x["scores"], y["scores"], atol=tie)
    for q in range(len(x["scores"])):
        clear = x["scores"][q] > x["scores"][q].min() + tie  # cannot fall out of the other's top k
        theirs = {image_id: j for j, image_id in enumerate(y["image_ids"][q].tolist())}
        for j in np.flatnonzero(clear):
            k = theirs[x["image_ids"][q][j]]
            assert abs(x["scores"][q][j] - y["scores"][q][k]) <= tie
            assert (x["ids"][q][j], x["metadata"][q][j]) == (y["ids"][q][k], y["metadata"][q][k])


@pytest.fixture(scope="module")
def embedded(shop):
    """`atl embed` of the CSV catalog with the portable export, on the DirectRunner."""
    root, _ = shop
    assert embed_main(["--catalog", str(root / "cat.csv"), "--model", str(root / "single-portable"),
                       "--output", str(root / "emb"), "--runner", "DirectRunner", "--batch-size", "32"]) == 0
    return root / "emb"


def test_beam_embeddings_publish_the_same_retrieval_as_atl_index(shop, embedded):
    root, single = shop
    assert json.loads((embedded / "manifest.json").read_text())["counts"]["embedded"] == ROWS - 1
    assert index_main(["--embeddings", str(root / "emb"), "--model", str(root / "model.keras"),
                       "--output-base", str(root / "beam"), "--min-recall", "0"]) == 0
    beam_path = str(root / "beam" / "1")
    a, b = load_manifest(single.export.path), load_manifest(beam_path)
    assert a["model_sha256"] == b["model_sha256"] and a["gallery_size"] == b["gallery_size"] == ROWS - 1
    for key in ("rows", "indexed", "skipped_missing", "skipped_corrupt"):
        assert a["catalog"][key] == b["catalog"][key], key
    for asset in ("catalog_rows.jsonl", "gallery_ids.txt"):
        assert (root / "beam/1/assets" / asset).read_text() == open(os.path.join(single.export.path, "assets", asset)).read()
    import scann  # noqa: F401  (registers the ScaNN ops of the main exports)

    ours, theirs = load_export(single.export.path), load_export(beam_path)
    queries = tf.constant([(root / f"img/{i:04d}.{'png' if i % 2 else 'jpg'}").read_bytes() for i in range(20, 44)])
    for signature in ("retrieve", "retrieve_exact"):
        x = ours.signatures[signature](images=queries, k=tf.constant(10))
        y = theirs.signatures[signature](images=queries, k=tf.constant(10))
        assert_same_results({k: v.numpy() for k, v in x.items()}, {k: v.numpy() for k, v in y.items()})
    skipped = [json.loads(line) for line in open(next(embedded.glob("skipped-*.jsonl")))]
    assert sorted(s["reason"] for s in skipped) == ["cannot be decoded", "missing or empty"]


def test_tfrecord_and_jsonl_catalogs_give_the_same_rows(shop):
    root, single = shop
    rows = [json.loads(line) for line in open(os.path.join(single.export.path, "assets", "catalog_rows.jsonl"))]
    with open(root / "cat.jsonl", "w") as f:
        for row in rows[:40]:
            f.write(json.dumps({"image": row["image"], "item_id": row["item_id"], "image_id": row["image_id"]}) + "\n")
    with tf.io.TFRecordWriter(str(root / "cat.tfrecord")) as writer:
        for row in rows[:40]:
            feature = {name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
                       for name, value in (("image", open(row["image"], "rb").read()),
                                           ("item_id", row["item_id"].encode()), ("image_id", row["image_id"].encode()))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    vectors = {}
    for name in ("cat.jsonl", "cat.tfrecord"):
        assert embed_main(["--catalog", str(root / name), "--model", str(root / "single-portable"),
                           "--output", str(root / f"emb-{name}")]) == 0
        got, vectors[name], _ = read_embedding_files(str(root / f"emb-{name}"))
        assert [r.image_id for r in got] == [r["image_id"] for r in rows[:40]]
        assert [r.sha256 for r in got] == [r["sha256"] for r in rows[:40]]
    np.testing.assert_allclose(vectors["cat.jsonl"], vectors["cat.tfrecord"], atol=1e-6)


def test_other_weights_unfinished_folders_and_reruns_are_refused(shop, embedded, capsys):
    root, _ = shop
    with pytest.raises(CatalogError, match="another model"):
        index_embeddings(tiny_model(seed=9), str(root / "emb"), str(root / "refused"), min_recall=0)
    assert not os.path.exists(root / "refused" / "1")
    os.makedirs(root / "unfinished")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        index_embeddings(str(root / "model.keras"), str(root / "unfinished"), str(root / "refused"))
    assert embed_main(["--catalog", str(root / "cat.csv"), "--model", str(root / "single-portable"),
                       "--output", str(root / "emb")]) == 2
    assert "already holds embedding files" in capsys.readouterr().err
