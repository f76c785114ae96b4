"""End-to-end tests through fairseq's real entry points on a synthetic corpus."""

import os
import random
import shutil
import sys

import pytest
import torch
from conftest import USER_DIR
from corpus import STUDENT_ARCH, TINY_ARCH, binarize, json_logs, run, train

pytestmark = pytest.mark.slow

# torch loads weights-only whatever the call asks: nothing is unpickled fully
WEIGHTS_ONLY = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}


def kd_flags(teacher, alpha="0.5", temperature="2", extra=()):
    return [
        "--user-dir", USER_DIR, "--task", "translation_kd",
        "--teacher-path", teacher, "--criterion", "word_kd",
        "--kd-alpha", alpha, "--kd-temperature", temperature,
        "--label-smoothing", "0.1",
    ] + list(extra)  # fmt: skip


def logs(proc, kind):
    return json_logs(proc.stdout + proc.stderr, kind)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_student_trains_logs_kd_loss_and_generates_without_plugin(
    data_bin, teacher, tmp_path
):
    # the teacher lives in a folder that is deleted after training
    teacher_copy = tmp_path / "gone" / "teacher.pt"
    teacher_copy.parent.mkdir()
    shutil.copy(teacher, teacher_copy)
    save = str(tmp_path / "student")
    proc = train(
        data_bin, save, kd_flags(str(teacher_copy)), arch=STUDENT_ARCH, updates=40
    )
    inner = logs(proc, "train_inner")
    assert len(inner) == 40
    kd = [float(r["kd_loss"]) for r in inner]
    assert all(k >= 0 for k in kd)
    assert kd[-1] < kd[0]  # the student moves towards the teacher
    assert "valid_kd_loss" in logs(proc, "valid")[-1]
    shutil.rmtree(teacher_copy.parent)

    # the checkpoint holds the student only: a plain fairseq transformer
    student = os.path.join(save, "checkpoint_last.pt")
    state = load(student)
    teacher_state = load(teacher)
    assert set(state["model"]) == set(teacher_state["model"])  # same architecture
    shapes = {k: v.shape for k, v in state["model"].items()}
    assert shapes["encoder.embed_tokens.weight"][1] == 16  # the student's width
    assert state["criterion"] is None

    # fairseq-generate, teacher files gone: the plugin lets torch load the
    # student weights-only
    gen = run(
        ["fairseq-generate", data_bin, "--path", student, "--gen-subset", "test"]
        + ["--beam", "2", "--batch-size", "16", "--cpu", "--user-dir", USER_DIR]
        + ["--required-batch-size-multiple", "1"],
        env=WEIGHTS_ONLY,
    )
    hyps = [line for line in gen.stdout.splitlines() if line.startswith("H-")]
    assert len(hyps) == 60

    # stock fairseq-generate, no --user-dir: on the exported student
    exported = os.path.join(save, "exported.pt")
    run([sys.executable, "-m", "fairseq_kd.export", student, "--output", exported])
    gen = run(
        ["fairseq-generate", data_bin, "--path", exported, "--gen-subset", "test"]
        + ["--beam", "2", "--batch-size", "16", "--cpu"]
        + ["--required-batch-size-multiple", "1"],
        env=WEIGHTS_ONLY,
    )
    assert sorted(x for x in gen.stdout.splitlines() if x.startswith("H-")) == sorted(
        hyps
    )


def test_alpha_zero_reproduces_label_smoothed_cross_entropy(
    data_bin, teacher, tmp_path
):
    common = ["--label-smoothing", "0.1", "--dropout", "0.1"]
    ls = train(
        data_bin,
        str(tmp_path / "ls"),
        ["--criterion", "label_smoothed_cross_entropy"] + common,
        arch=STUDENT_ARCH,
        updates=25,
    )
    kd = train(
        data_bin,
        str(tmp_path / "kd"),
        kd_flags(teacher, alpha="0", temperature="2") + ["--dropout", "0.1"],
        arch=STUDENT_ARCH,
        updates=25,
    )
    for key in ("loss", "nll_loss", "gnorm"):
        a = [r[key] for r in logs(ls, "train_inner")]
        b = [r[key] for r in logs(kd, "train_inner")]
        assert len(a) == 25 and a == b, key
    ma = load(str(tmp_path / "ls" / "checkpoint_last.pt"))["model"]
    mb = load(str(tmp_path / "kd" / "checkpoint_last.pt"))["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_distillation_transfers_the_teacher_knowledge(
    corpus_text, data_bin, teacher, tmp_path
):
    """Students trained on noisy references: the KD one learns the clean teacher.

    40% of the target words of the students' training references are replaced
    by random target words; the teacher was trained on clean data. With the
    same updates, the word-KD student ends closer to the teacher (KL) and
    better on the clean validation references (NLL) than the same student
    trained on the noisy references alone.
    """
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = random.Random(0)
    vocab = sorted(
        {
            w
            for line in open(os.path.join(corpus_text, "train.tgt"))
            for w in line.split()
        }
    )
    for split in ("train", "valid", "test"):
        shutil.copy(os.path.join(corpus_text, f"{split}.src"), noisy / f"{split}.src")
        lines = open(os.path.join(corpus_text, f"{split}.tgt")).read().splitlines()
        if split == "train":
            lines = [
                " ".join(
                    rng.choice(vocab) if rng.random() < 0.4 else w for w in x.split()
                )
                for x in lines
            ]
        (noisy / f"{split}.tgt").write_text("\n".join(lines) + "\n")
    dicts = ["--srcdict", os.path.join(data_bin, "dict.src.txt")]
    dicts += ["--tgtdict", os.path.join(data_bin, "dict.tgt.txt")]
    noisy_bin = binarize(str(noisy), str(tmp_path / "noisy_bin"), dicts)
    valid = {}
    for alpha in ("0", "0.9"):
        proc = train(
            noisy_bin,
            str(tmp_path / alpha),
            kd_flags(teacher, alpha=alpha, temperature="1"),
            arch=TINY_ARCH,
            updates=150,
        )
        valid[alpha] = logs(proc, "valid")[-1]
    kl = {a: float(v["valid_kd_loss"]) for a, v in valid.items()}
    nll = {a: float(v["valid_nll_loss"]) for a, v in valid.items()}
    assert kl["0.9"] < 0.7 * kl["0"], kl
    assert nll["0.9"] < nll["0"], nll


def test_ensemble_of_two_teachers(data_bin, teacher, teacher_early, tmp_path):
    proc = train(
        data_bin,
        str(tmp_path / "ens"),
        kd_flags(f"{teacher}:{teacher_early}", extra=["--kd-topk", "4"]),
        arch=STUDENT_ARCH,
        updates=5,
    )
    out = proc.stdout + proc.stderr
    assert out.count("loaded teacher") == 2
    assert all(float(r["kd_loss"]) > 0 for r in logs(proc, "train_inner"))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--kd-alpha", "1.5"], "--kd-alpha must be in [0, 1]"),
        (["--kd-temperature", "0"], "--kd-temperature must be > 0"),
        (["--kd-topk", "-1"], "--kd-topk must be >= 0"),
    ],
)
def test_bad_options_fail_at_start_up(data_bin, teacher, tmp_path, flags, message):
    proc = run(
        ["fairseq-train", data_bin, "--save-dir", str(tmp_path), "--cpu"]
        + STUDENT_ARCH
        + ["--optimizer", "adam", "--lr", "0.001", "--max-tokens", "1000"]
        + kd_flags(teacher)
        + flags,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "| train_inner |" not in proc.stderr  # nothing trained


def test_word_kd_without_teacher_fails_at_start_up(data_bin, tmp_path):
    proc = run(
        ["fairseq-train", data_bin, "--save-dir", str(tmp_path), "--cpu"]
        + STUDENT_ARCH
        + ["--optimizer", "adam", "--lr", "0.001", "--max-tokens", "1000"]
        + ["--user-dir", USER_DIR, "--criterion", "word_kd"],
        check=False,
    )
    assert proc.returncode != 0
    assert "needs a teacher" in proc.stderr


def test_teacher_with_other_dictionary_is_refused(corpus_text, teacher, tmp_path):
    from corpus import write_corpus

    other = write_corpus(str(tmp_path / "text"), sizes=(("train", 50),) * 1)
    for split in ("valid", "test"):
        shutil.copy(
            os.path.join(other, "train.src"), os.path.join(other, f"{split}.src")
        )
        shutil.copy(
            os.path.join(other, "train.tgt"), os.path.join(other, f"{split}.tgt")
        )
    # a dictionary with fewer symbols than the teacher's
    with open(os.path.join(other, "train.src"), "w") as f:
        f.write("s1 s2\n" * 50)
    with open(os.path.join(other, "train.tgt"), "w") as f:
        f.write("t1 t2\n" * 50)
    data = binarize(other, str(tmp_path / "bin"))
    proc = run(
        ["fairseq-train", data, "--save-dir", str(tmp_path / "s"), "--cpu"]
        + STUDENT_ARCH
        + ["--optimizer", "adam", "--lr", "0.001", "--max-tokens", "1000"]
        + kd_flags(teacher),
        check=False,
    )
    assert proc.returncode != 0
    teacher_size = load(teacher)["model"]["encoder.embed_tokens.weight"].shape[0]
    with open(os.path.join(data, "dict.src.txt")) as f:
        ours = 4 + len(f.readlines())
    assert ours != teacher_size
    assert f"dictionaries of {teacher_size} (source)" in proc.stderr
    assert f"this task's dictionaries have {ours} (source)" in proc.stderr
