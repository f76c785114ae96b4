"""Shared fixtures: a synthetic corpus, its binarization and a tiny teacher."""

import glob
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import corpus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_kd")
MULTI30K = os.path.join(REPO, "..", "shared", "data", "multi30k")


@pytest.fixture(scope="session")
def corpus_text(tmp_path_factory):
    """Folder with train/valid/test ``.src``/``.tgt`` text."""
    return corpus.write_corpus(str(tmp_path_factory.mktemp("text")))


@pytest.fixture(scope="session")
def data_bin(corpus_text, tmp_path_factory):
    """The synthetic corpus binarized with a joined dictionary."""
    return corpus.binarize(corpus_text, str(tmp_path_factory.mktemp("bin")))


@pytest.fixture(scope="session")
def teacher_dir(data_bin, tmp_path_factory):
    """A tiny teacher trained with label-smoothed CE (checkpoints folder)."""
    save = str(tmp_path_factory.mktemp("teacher"))
    corpus.train(
        data_bin,
        save,
        ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
        + ["--save-interval-updates", "150", "--keep-interval-updates", "2"],
        updates=300,
    )
    return save


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    """Path of the tiny teacher's best checkpoint."""
    return os.path.join(teacher_dir, "checkpoint_best.pt")


@pytest.fixture(scope="session")
def teacher_early(teacher_dir):
    """A second, different teacher: the same run after 150 updates."""
    (path,) = glob.glob(os.path.join(teacher_dir, "checkpoint_*_150.pt"))
    return path


@pytest.fixture(scope="session")
def topk_root(data_bin, teacher, tmp_path_factory):
    """Top-8 stores of the tiny teacher, one per split (``ROOT/train``...)."""
    from topk_util import dump

    root = str(tmp_path_factory.mktemp("topk"))
    for split in ("train", "valid"):
        dump(data_bin, teacher, os.path.join(root, split), "--gen-subset", split)
    return root
