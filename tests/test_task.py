"""In-process tests of the ``translation_kd`` task and its live teacher."""

import pytest
import torch
from fairseq.tasks.translation import TranslationConfig, TranslationTask

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


def kd_task(data_bin, teacher_path):
    cfg = TranslationKDConfig(data=data_bin, teacher_path=teacher_path, **RESOLVED)
    return TranslationKDTask.setup_task(cfg)


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
