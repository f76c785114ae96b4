"""Shared fixtures: a synthetic corpus, its binarization and a tiny teacher."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import corpus  # noqa: E402

from kd_bench.data import default_shared_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_kd")
MULTI30K = default_shared_folder("multi30k", REPO, env="MULTI30K_DIR")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: the workers share the machine's cores, and the
    # fairseq commands the tests start inherit it (corpus.run sets it too)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


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
        ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
        updates=300,
    )
    return save


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    """Path of the tiny teacher's best checkpoint."""
    return os.path.join(teacher_dir, "checkpoint_best.pt")


@pytest.fixture(scope="session")
def teacher_early(teacher, tmp_path_factory):
    """A second, different teacher: the first with noise added to its weights."""
    import torch

    state = torch.load(teacher, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for key, value in state["model"].items():
        if value.is_floating_point() and value.numel() > 1:
            noise = torch.randn(value.shape, generator=generator)
            state["model"][key] = value + 0.3 * value.std() * noise
    path = str(tmp_path_factory.mktemp("teacher2") / "checkpoint.pt")
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def topk_root(data_bin, teacher, tmp_path_factory):
    """Top-8 stores of the tiny teacher, one per split (``ROOT/train``...)."""
    from topk_util import dump

    root = str(tmp_path_factory.mktemp("topk"))
    for split in ("train", "valid"):
        dump(data_bin, teacher, os.path.join(root, split), "--gen-subset", split)
    return root


@pytest.fixture(scope="session")
def multi_text(tmp_path_factory):
    """The tiny multilingual corpus (de-en, cs-en, en-de) as text."""
    from multi_corpus import write_corpus

    return write_corpus(str(tmp_path_factory.mktemp("multi_text")))


@pytest.fixture(scope="session")
def multi_bin(multi_text, tmp_path_factory):
    """Three directions (de-en, cs-en, en-de) binarized with one dictionary."""
    from multi_corpus import binarize

    return binarize(multi_text, str(tmp_path_factory.mktemp("multi_bin")))


@pytest.fixture(scope="session")
def multi_teacher(multi_bin, tmp_path_factory):
    """A tiny teacher trained by stock translation_multi_simple_epoch (10 updates)."""
    from multi_corpus import task_flags

    save = str(tmp_path_factory.mktemp("multi_teacher"))
    flags = ["--task", "translation_multi_simple_epoch", *task_flags()]
    flags += ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    corpus.train(multi_bin, save, flags, updates=10)
    return os.path.join(save, "checkpoint_last.pt")
