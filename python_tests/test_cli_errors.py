"""Console scripts: expected errors are one `error: ...` line with exit status 2; corrupt images stop training
before its first step (or are skipped, counted, behind an explicit flag)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from cli_helpers import assert_cli_error
from train_data import planted_manifest

from oclear_ext.data.govern import main as govern_main
from oclear_ext.data.image_check import check_manifest_images
from oclear_ext.data.manifest import ManifestError, load_manifest
from oclear_ext.train.cli import main as train_main

TINY = ["--dim", "16", "--num-concepts", "4", "--num-heads", "2", "--image-size", "16", "--batch-size", "8",
        "--no-progress", "--max-steps", "2"]


@pytest.fixture()
def corrupt_manifest(tmp_path):
    path = planted_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    truncated = tmp_path / "data" / rows[1]["image"]
    truncated.write_bytes(truncated.read_bytes()[:60])           # a cut-off PNG: the header reads, pixels don't
    (tmp_path / "data" / rows[5]["image"]).write_text("not a png")  # not an image at all
    return path


def test_training_stops_before_the_first_step_naming_every_bad_image(corrupt_manifest, tmp_path, capsys):
    line = assert_cli_error(capsys, train_main, ["--train-manifest", str(corrupt_manifest), "--out-dir",
                                                 str(tmp_path / "run"), *TINY], "oclear-train",
                            "2 bad line(s)", "line 2: image", "line 6: image", "cannot be decoded")
    assert "red-1.png" in line
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_skip_bad_images_trains_without_them_and_says_how_many(corrupt_manifest, tmp_path):
    with pytest.warns(UserWarning, match=r"skipped 2 row\(s\) whose image cannot be decoded \(lines 2, 6\)"):
        train_main(["--train-manifest", str(corrupt_manifest), "--out-dir", str(tmp_path / "run"), "--skip-bad-images", *TINY])
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_the_image_check_caches_good_files_and_rechecks_changed_ones(tmp_path):
    path = planted_manifest(tmp_path / "data")
    cache = tmp_path / "check.json"
    manifest = load_manifest(path)
    assert check_manifest_images(manifest, cache_file=cache) is manifest
    assert len(json.loads(cache.read_text())) == len(manifest.items)
    victim = manifest.items[3].image
    shutil.copyfile(path, victim)  # changed after the first check: its size and time no longer match the cache
    with pytest.raises(ManifestError, match="line 4: image .* cannot be decoded"):
        check_manifest_images(manifest, cache_file=cache)
    assert victim not in json.loads(cache.read_text())


def test_train_config_errors_are_one_line(tmp_path, capsys):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("lr = [\n")
    assert_cli_error(capsys, train_main, ["--config", str(bad_toml)], "oclear-train", "bad.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rate = 0.1\n")
    assert_cli_error(capsys, train_main, ["--config", str(unknown)], "oclear-train", "unknown keys ['learning_rate']")
    assert_cli_error(capsys, train_main, ["--config", str(tmp_path / "missing.toml")], "oclear-train", "missing.toml")
    assert_cli_error(capsys, train_main, ["--train-manifest", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path / "r"),
                                          *TINY], "oclear-train", "nope.jsonl does not exist")
    with pytest.raises(SystemExit) as exit_info:  # a bad flag value: argparse's usage line and exit 2
        train_main(["--negatives", "sometimes"])
    assert exit_info.value.code == 2 and "negatives must be none, topk:K" in capsys.readouterr().err


def test_govern_errors_are_one_line(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"doc_id": "a", "image": "a.png", "text": "t", "category": "c"}\n')
    logs = tmp_path / "logs.jsonl"
    logs.write_text('{"query_image": "q.png", "doc_id": "a", "count": 0}\n')
    assert_cli_error(capsys, govern_main, ["--logs", str(tmp_path / "none.jsonl"), "--docs", str(docs), "--out",
                                           str(tmp_path / "o")], "oclear-govern", "no file at")
    assert_cli_error(capsys, govern_main, ["--logs", str(logs), "--docs", str(docs), "--out", str(tmp_path / "o")],
                     "oclear-govern", "line 1: count must be >= 1")


def test_an_installed_console_script_prints_no_traceback(tmp_path):
    done = subprocess.run(["oclear-train", "--train-manifest", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: oclear-train: manifest")
