"""oclear-index, oclear-search and oclear-eval --checkpoint on a trained run; their bad-input errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from cli_helpers import assert_cli_error
from search_fixtures import built_index, trained_run

from oclear_ext.eval.cli import main as eval_main
from oclear_ext.search import CatalogIndex, load_model
from oclear_ext.search.cli import main_index, main_search
from oclear_ext.train.evaluation import evaluate_on_manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-cli")
    run_dir, manifest = trained_run(folder)
    return run_dir, manifest, built_index(run_dir, manifest, folder / "index")


def query_images(manifest, colours=("red", "green", "blue", "yellow")) -> list[str]:
    return [str(manifest.parent / "img" / f"{c}-1.png") for c in colours]


def test_index_then_search_prints_one_json_line_per_image_best_first(run, capsys):
    run_dir, manifest, index_dir = run
    meta = json.loads((index_dir / "index.json").read_text())
    assert meta["count"] == 8 and meta["kind"] == "flat" and meta["model"]["run_dir"] == str(run_dir.resolve())
    images = query_images(manifest)
    capsys.readouterr()
    main_search(["--index", str(index_dir), "--k", "3", *images])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == images
    for line in lines:
        results = line["results"]
        assert len(results) == 3 and set(results[0]) == {"id", "score", "label", "text", "image", "category"}
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # the trained model retrieves each colour's own catalogue item first
    assert sum(line["results"][0]["label"] == colour for line, colour in zip(lines, ("red", "green", "blue", "yellow"))) >= 3
    # the same answer through the Python API
    model = load_model(run_dir)
    ids, scores = CatalogIndex.load(index_dir, model=model).search_images(model, images, 3)
    np.testing.assert_allclose([[r["score"] for r in line["results"]] for line in lines], scores, rtol=1e-6)


def test_every_index_kind_builds_from_the_cli(run, tmp_path, capsys):
    run_dir, manifest, _ = run
    main_index(["--checkpoint", str(run_dir), "--manifest", str(manifest), "--out", str(tmp_path / "hnsw"),
                "--kind", "hnsw", "--no-progress"])
    assert "indexed 8 docs (dim 16, hnsw)" in capsys.readouterr().out
    # ivfpq needs >= 256 docs to train its 8-bit codebooks: the error says so and names the alternatives
    assert_cli_error(capsys, main_index, ["--checkpoint", str(run_dir), "--manifest", str(manifest), "--out",
                                          str(tmp_path / "pq"), "--kind", "ivfpq", "--no-progress"],
                     "oclear-index", "needs at least 256 docs to train, got 8", "kind='flat'")


def test_oclear_eval_with_a_checkpoint_equals_evaluate_on_the_same_model(run, tmp_path):
    run_dir, manifest, _ = run
    eval_main(["--manifest", str(manifest), "--checkpoint", str(run_dir), "--out", str(tmp_path / "eval"),
               "--grid-queries", "0"])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    result, _ = evaluate_on_manifest(load_model(run_dir), manifest)
    assert written["instance"] == result.metrics["instance"]
    assert written["embeddings"].startswith("model ") and str(run_dir.resolve()) in written["embeddings"]


def test_search_and_index_errors_are_one_line_with_exit_status_2(run, tmp_path, capsys):
    run_dir, manifest, index_dir = run
    images = query_images(manifest, ("red",))
    assert_cli_error(capsys, main_search, ["--index", str(tmp_path / "none"), *images], "oclear-search",
                     "no catalogue index at", "oclear-index")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert_cli_error(capsys, main_search, ["--index", str(index_dir), images[0], str(bad), str(tmp_path / "gone.png")],
                     "oclear-search", f"cannot decode image {bad}", f"cannot read image {tmp_path / 'gone.png'}")
    # another run's model: same architecture, other weights
    other, _ = trained_run(tmp_path / "other", steps=3)
    assert_cli_error(capsys, main_search, ["--index", str(index_dir), "--checkpoint", str(other), *images],
                     "oclear-search", "its weights differ")
    # an index whose recorded checkpoint has gone
    moved = tmp_path / "moved-index"
    shutil.copytree(index_dir, moved)
    meta = json.loads((moved / "index.json").read_text())
    meta["model"]["checkpoint"] = str(tmp_path / "deleted-run" / "checkpoints" / "step-00000030")
    (moved / "index.json").write_text(json.dumps(meta))
    assert_cli_error(capsys, main_search, ["--index", str(moved), *images], "oclear-search",
                     "no longer exists; pass --checkpoint")
    assert_cli_error(capsys, main_index, ["--checkpoint", str(tmp_path / "nowhere"), "--manifest", str(manifest),
                                          "--out", str(tmp_path / "i")], "oclear-index", "does not exist")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "x.png", "text": null, "label": "a", "role": "doc"}\n{"oops": 1}\n')
    line = assert_cli_error(capsys, main_index, ["--checkpoint", str(run_dir), "--manifest", str(broken),
                                                 "--out", str(tmp_path / "i")], "oclear-index", "3 bad line(s)", "line 1: image file not found", "line 2:")
    assert "x.png" in line
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors also exit 2
        main_search(["--index", str(index_dir), "--k", "0", *images])
    assert exit_info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_an_index_of_another_dimension_is_refused(run, tmp_path, capsys):
    run_dir, manifest, _ = run
    index = CatalogIndex.build(np.eye(8, 32, dtype=np.float32), [{"id": str(i)} for i in range(8)])
    index.save(tmp_path / "dim32")
    assert_cli_error(capsys, main_search, ["--index", str(tmp_path / "dim32"), "--checkpoint", str(run_dir),
                                           *query_images(manifest, ("red",))],
                     "oclear-search", "query embeddings have dimension 16, the index has dimension 32")


@pytest.mark.parametrize("script", ["oclear-index", "oclear-search", "oclear-serve", "oclear-eval"])
def test_console_scripts_are_installed(script):
    assert shutil.which(script), f"{script} is not on PATH: reinstall with pip install -e ."
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"usage: {script}" in done.stdout
