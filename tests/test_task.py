"""In-process tests of the ``translation_kd`` task and its live teacher."""

import logging
import os

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from topk_util import reversed_dictionary_data, teacher_with_data, train_short_teacher

from fairseq_kd.checkpoints import load_checkpoint, load_teacher_ensemble
from fairseq_kd.tasks.translation_kd import TranslationKDConfig, TranslationKDTask

# values fairseq interpolates from the global config when run from its CLIs
RESOLVED = {
    "dataset_impl": "mmap",
    "train_subset": "train",
    "required_seq_len_multiple": 1,
}


@pytest.fixture(scope="module")
def model_cfg(teacher):
    return load_checkpoint(teacher)["cfg"].model


def kd_task(data_bin, teacher_path, **options):
    resolved = dict(RESOLVED, valid_subset="valid", disable_validation=False)
    cfg = TranslationKDConfig(
        data=data_bin, teacher_path=teacher_path, **resolved, **options
    )
    return TranslationKDTask.setup_task(cfg)


@pytest.fixture(scope="module")
def reversed_bin(corpus_text, data_bin, tmp_path_factory):
    """The corpus binarized with the teacher's symbols in another order."""
    dest = str(tmp_path_factory.mktemp("reversed_bin"))
    return reversed_dictionary_data(corpus_text, data_bin, dest)


@pytest.fixture(scope="module")
def teacher_without_data(teacher, tmp_path_factory):
    """The teacher, its config naming a data folder that no longer exists."""
    dest = str(tmp_path_factory.mktemp("moved") / "checkpoint.pt")
    return teacher_with_data(teacher, dest, "/nonexistent/data-bin")


def first_difference(data_bin, reversed_bin):
    ours = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    theirs = Dictionary.load(os.path.join(reversed_bin, "dict.src.txt"))
    assert len(ours) == len(theirs) and ours.symbols != theirs.symbols
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return i, ours[i], theirs[i]


def test_same_size_dictionary_with_other_symbols_is_refused(
    data_bin, reversed_bin, teacher, model_cfg
):
    i, ours, theirs = first_difference(data_bin, reversed_bin)
    task = kd_task(reversed_bin, teacher)
    message = (
        f"another source dictionary .* both have {len(task.source_dictionary)} "
        f"symbols: the first difference is at index {i}: '{ours}' in the "
        f"teacher's .*dict.src.txt .*'{theirs}' in this task's"
    )
    with pytest.raises(ValueError, match=message):
        task.build_model(model_cfg)


def test_teacher_dict_dir_names_the_teachers_dictionaries(
    data_bin, reversed_bin, teacher_without_data, model_cfg, caplog
):
    with caplog.at_level(logging.WARNING, logger="fairseq_kd.checkpoints"):
        kd_task(data_bin, teacher_without_data).build_model(model_cfg)
    assert "could not compare the symbols" in caplog.text
    assert (
        "/nonexistent/data-bin" in caplog.text and "sizes were compared" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fairseq_kd.checkpoints"):
        task = kd_task(data_bin, teacher_without_data, teacher_dict_dir=data_bin)
        task.build_model(model_cfg)
    assert len(task.teachers) == 1 and "could not compare" not in caplog.text
    task = kd_task(data_bin, teacher_without_data, teacher_dict_dir=reversed_bin)
    with pytest.raises(ValueError, match="index [0-9]+: .* in the teacher's"):
        task.build_model(model_cfg)
    task = kd_task(data_bin, teacher_without_data, teacher_dict_dir="/nowhere")
    with pytest.raises(FileNotFoundError, match="--teacher-dict-dir /nowhere"):
        task.build_model(model_cfg)


def test_teacher_not_loaded_when_rebuilding_a_saved_model(data_bin, model_cfg):
    task = kd_task(data_bin, "/nonexistent/teacher.pt")
    task.build_model(model_cfg, from_checkpoint=True)
    assert task.teachers is None
    with pytest.raises(FileNotFoundError, match="/nonexistent/teacher.pt"):
        task.build_model(model_cfg)


def test_teacher_loading_leaves_the_student_initialisation_unchanged(
    data_bin, teacher, model_cfg
):
    torch.manual_seed(3)
    kd = kd_task(data_bin, teacher)
    student_kd = kd.build_model(model_cfg)
    after_kd = torch.rand(3)
    torch.manual_seed(3)
    plain = TranslationTask.setup_task(TranslationConfig(data=data_bin, **RESOLVED))
    student = plain.build_model(model_cfg)
    after = torch.rand(3)
    for (name, a), (_, b) in zip(
        student_kd.state_dict().items(), student.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert torch.equal(after_kd, after)  # the RNG stream is where it was
    assert len(kd.teachers) == 1


def test_teacher_is_frozen_separate_and_follows_the_student(
    data_bin, teacher, model_cfg
):
    task = kd_task(data_bin, teacher)
    student = task.build_model(model_cfg).to(torch.bfloat16)
    (t,) = task.teachers
    assert not t.training
    assert all(not p.requires_grad for p in t.parameters())
    teacher_ids = {id(p) for p in t.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}

    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(6)])
    task.attach_teacher(sample, student)
    lprobs = sample["teacher"]["lprobs"]
    assert next(t.parameters()).dtype == torch.bfloat16  # student's precision
    assert lprobs.dtype == torch.float32  # log-probs computed in float32
    assert not lprobs.requires_grad
    B, T = sample["target"].shape
    assert lprobs.shape == (B, T, len(task.target_dictionary))
    assert torch.allclose(lprobs.logsumexp(-1), torch.zeros(B, T), atol=1e-4)
    # the teacher predicts the reference far better than chance
    gold = lprobs.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)
    mask = sample["target"].ne(task.target_dictionary.pad())
    assert gold[mask].exp().mean() > 0.5


def test_ensemble_is_the_average_of_its_members(data_bin, teacher, teacher_early):
    task = kd_task(data_bin, f"{teacher}:{teacher_early}")
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(4)])
    members = load_teacher_ensemble(f"{teacher}:{teacher_early}", task)
    with torch.no_grad():
        probs = [
            m.get_normalized_probs(m(**sample["net_input"]), log_probs=False)
            for m in members
        ]
    task.teachers = members
    student = members[0]
    task.attach_teacher(sample, student)
    expected = torch.log((probs[0] + probs[1]) / 2)
    assert torch.allclose(sample["teacher"]["lprobs"], expected, atol=1e-5)
    assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # really two teachers


@pytest.fixture(scope="module")
def short_teacher(data_bin, tmp_path_factory):
    """A teacher with learned positional tables of 8 positions (a few updates)."""
    save = str(tmp_path_factory.mktemp("short_teacher"))
    return train_short_teacher(data_bin, save)


def test_max_positions_are_within_the_teachers(data_bin, short_teacher, model_cfg):
    task = kd_task(data_bin, short_teacher)
    assert task.max_positions() == (1024, 1024)  # no teacher loaded yet
    task.build_model(model_cfg)
    assert task.max_positions() == (8, 8)


def test_a_teacher_with_fewer_positions_filters_long_sentences(
    data_bin, short_teacher, tmp_path
):
    from corpus import STUDENT_ARCH, json_logs, train

    flags = ["--user-dir", os.path.join(os.path.dirname(__file__), "..", "fairseq_kd")]
    flags += ["--task", "translation_kd", "--teacher-path", short_teacher]
    flags += ["--criterion", "word_kd", "--kd-alpha", "0.5", "--no-save"]
    flags += ["--skip-invalid-size-inputs-valid-test", "--max-tokens", "300"]
    proc = train(data_bin, str(tmp_path / "s"), flags, arch=STUDENT_ARCH, updates=8)
    output = proc.stdout + proc.stderr
    assert "IndexError" not in output
    assert "max_positions=(8, 8)" in output  # fairseq's filter, with the teacher's
    steps = json_logs(proc.stdout, "train_inner")
    assert len(steps) == 8 and all(float(r["kd_loss"]) > 0 for r in steps)


def test_resume_refuses_another_teacher(data_bin, teacher, teacher_early, tmp_path):
    from corpus import STUDENT_ARCH, TRAIN_FLAGS, run, train

    from fairseq_kd import compat
    from fairseq_kd.topk_store import file_sha256

    if not compat.restores_task_checkpoint_dict():
        pytest.skip("this fairseq does not restore task.get_checkpoint_dict()")
    save = str(tmp_path / "student")
    user_dir = os.path.join(os.path.dirname(__file__), "..", "fairseq_kd")

    def flags(path, *extra):
        return ["--user-dir", user_dir, "--task", "translation_kd"] + [
            "--teacher-path", path, "--criterion", "word_kd", "--kd-alpha", "0.5",
            "--disable-validation", *extra,
        ]  # fmt: skip

    train(data_bin, save, flags(teacher), arch=STUDENT_ARCH, updates=2)
    saved = torch.load(os.path.join(save, "checkpoint_last.pt"), weights_only=False)
    recorded = saved["extra_state"]["TranslationKDTask"]["teachers"]
    assert [t["sha256"] for t in recorded] == [file_sha256(teacher)]

    def resume(path, updates, *extra):
        cmd = ["fairseq-train", data_bin, "--save-dir", save]
        cmd += ["--max-update", str(updates), *STUDENT_ARCH, *TRAIN_FLAGS]
        return run(cmd + flags(path, *extra), check=False)

    proc = resume(teacher_early, 4)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    original = file_sha256(teacher)[:12]
    assert f"trained with teacher(s) {teacher} (sha256 {original})" in output
    early = file_sha256(teacher_early)[:12]
    assert f"this run's teacher is {teacher_early} (sha256 {early})" in output
    assert "--teacher-allow-change" in output
    proc = resume(teacher_early, 4, "--teacher-allow-change")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--teacher-allow-change: resuming" in proc.stdout + proc.stderr
    proc = resume(teacher_early, 6)  # the checkpoint now records the new teacher
    assert proc.returncode == 0, proc.stderr[-3000:]
