"""`atl index` says on the console what it did: skipped rows, what the image ids are, the
index it chose; the portable export and the preprocessing are remembered per output base."""

from __future__ import annotations

import os

from atl_keras.cli import index as index_cli
from atl_keras.export import existing_versions, load_manifest
from test_catalog_index import tiny_model, write_catalog


def test_atl_index_console_skips_ids_and_remembered_portable_base(tmp_path, capsys):
    model_path = str(tmp_path / "model.keras")
    tiny_model().save(model_path)
    catalog = write_catalog(tmp_path, 8)
    with open(catalog, "a", encoding="utf-8") as f:
        f.write("img/gone.png,sku-9,red\n")  # a missing image: skipped, and said so
    base, portable = str(tmp_path / "shop"), str(tmp_path / "shop-portable")
    common = ["--model", model_path, "--catalog", catalog, "--output-base", base]

    assert index_cli.main([*common, "--portable-output-base", portable, "--resize", "stretch"]) == 0
    first = capsys.readouterr()
    assert "Skipped 1 of 9 rows: 1 with a missing or empty image" in first.out and "gone.png" in first.out
    assert "Image ids (query results, --remove): the catalog's image_id column, else each row's image path " \
           "as written in the catalog (e.g. 'img/products-0000.png')" in first.out
    assert "brute force (every item), exact scoring" in first.out  # not "ah" for a brute-force index
    manifest = load_manifest(os.path.join(base, "1"))
    assert manifest["scann_config"]["scoring"] == "exact"
    assert "\r" not in first.err  # not a terminal: plain progress lines
    assert "embedding 8/8" in first.err

    # The next run without the flags keeps writing the portable version and the preprocessing.
    assert index_cli.main(common) == 0
    second = capsys.readouterr()
    assert f"also writing the portable version to {portable} (remembered from version 1" in second.out
    assert "--resize stretch (as version 1" in second.out
    assert existing_versions(portable) == [1, 2] and existing_versions(base) == [1, 2]
    assert load_manifest(os.path.join(base, "2"))["preprocessing"]["resize"] == "stretch"
    assert index_cli.main([*common, "--no-portable"]) == 0
    assert "No portable version" in capsys.readouterr().out
    assert existing_versions(portable) == [1, 2]
