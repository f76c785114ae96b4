"""Tests of the recipe building blocks and the quickstart on real Multi30k data."""

import json
import os
import subprocess
import sys

import pytest
from conftest import MULTI30K, REPO

from fairseq_kd import pipeline


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Ein  Mann\u00a0läuft. ", "Ein Mann läuft."),
        ("\tZwei Hunde\n", "Zwei Hunde"),
        ("ok", "ok"),
    ],
)
def test_normalise_line(raw, expected):
    assert pipeline.normalise_line(raw) == expected


def test_generate_output_is_restored_to_corpus_order():
    out = "\n".join(
        [
            "S-2\tc",
            "H-2\t-0.1\t▁c",
            "D-2\t-0.1\tc",
            "H-0\t-0.2\t▁a",
            "D-0\t-0.2\ta",
            "H-1\t-0.3\t",
            "D-1\t-0.3\t",
        ]
    )
    assert pipeline.parse_generate_output(out) == ["a", "", "c"]
    with pytest.raises(RuntimeError, match="missing sentence ids"):
        pipeline.parse_generate_output("D-0\t-1\ta\nD-2\t-1\tc")


def test_corrupted_multi30k_file_is_refused(tmp_path):
    (tmp_path / "train.de").write_text("not the real data\n")
    with pytest.raises(ValueError, match="sha256 .* differs"):
        pipeline.verify_multi30k(str(tmp_path), "de", "en")
    # files without a published checksum (other languages) are not checked
    pipeline.verify_multi30k(str(tmp_path), "fr", "en")


def test_prepare_text_refuses_misaligned_sides(tmp_path):
    for split in ("train", "val", "test_2016_flickr"):
        (tmp_path / f"{split}.de").write_text("a\nb\n")
        (tmp_path / f"{split}.en").write_text("a\n")
    with pytest.raises(ValueError, match="2 de lines but 1 en lines"):
        pipeline.prepare_text(str(tmp_path), str(tmp_path / "out"), "de", "en")


@pytest.mark.slow
@pytest.mark.skipif(MULTI30K is None, reason="Multi30k is not on this machine")
def test_quickstart_on_a_slice_of_multi30k(tmp_path):
    script = os.path.join(REPO, "examples", "quickstart", "quickstart.py")
    cmd = [sys.executable, script, "--preset", "tiny", "--work", str(tmp_path)]
    cmd += ["--beam", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    teacher, student = (
        results["models"]["teacher"],
        results["models"]["student (word_kd)"],
    )
    assert teacher["params"] > 2 * student["params"]
    for scores in (teacher, student):
        assert 0 <= scores["bleu"] <= 100 and 0 < scores["chrf"] <= 100
    assert "tok:13a" in results["signature"] and "case:mixed" in results["signature"]
    # real data went through: the reference side is the detokenised raw text
    refs = pipeline.read_lines(str(tmp_path / "text" / "test.en"))
    raw = pipeline.read_lines(pipeline.find_file(MULTI30K, "test_2016_flickr.en"), 100)
    assert refs == [pipeline.normalise_line(x) for x in raw]
    # a rerun resumes: no stage runs again
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.count("done already, skipped") == 6
