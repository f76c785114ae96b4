"""The multilingual task: stock losses, language tags, directions, teacher checks."""

import os

import pytest
import torch
from corpus import STUDENT_ARCH, TRAIN_FLAGS, USER_DIR, json_logs, run
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fakes import FakeModel
from multi_corpus import PAIRS, task_flags
from topk_util import dump

from fairseq_kd.checkpoints import load_teacher_ensemble
from fairseq_kd.criterions.word_kd import WordKDCriterion
from fairseq_kd.direction_dataset import DIRECTION_KEY
from fairseq_kd.tasks.kd_teacher import KD_MASK
from fairseq_kd.topk_dataset import TEACHER_KEY
from fairseq_kd.topk_store import TopKStore, TopKStoreMismatch

TASK = "translation_multi_simple_epoch_kd"


@pytest.fixture(scope="module")
def multi_topk(multi_bin, multi_teacher, tmp_path_factory):
    """Top-8 stores of every direction: ROOT/train/de-en, ROOT/valid/de-en..."""
    root = str(tmp_path_factory.mktemp("multi_topk"))
    flags = ["--task", "translation_multi_simple_epoch", *task_flags(), "--k", "8"]
    for split in ("train", "valid"):
        out = os.path.join(root, split)
        dump(multi_bin, multi_teacher, out, "--gen-subset", split, *flags)
    return root


def student_logs(data, save_dir, task, extra):
    """``fairseq-train`` a tiny student for 2 updates: (train_inner, valid) logs."""
    proc = run(
        ["fairseq-train", data, "--save-dir", save_dir, "--max-update", "2"]
        + ["--user-dir", USER_DIR, "--task", task, *task_flags(), "--no-save"]
        + STUDENT_ARCH
        + TRAIN_FLAGS
        + list(extra)
    )
    return json_logs(proc.stdout, "train_inner"), json_logs(proc.stdout, "valid")


def make_task(data, *flags):
    """The multilingual KD task and its config, parsed like ``fairseq-train``."""
    parser = options.get_training_parser()
    argv = [data, "--task", TASK, "--arch", "transformer", "--cpu", *task_flags()]
    args = options.parse_args_and_arch(parser, input_args=argv + list(flags))
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task), cfg


class TokenModel(FakeModel):
    """Logits looked up from the previous target token: a model of any batch."""

    def forward(self, prev_output_tokens, **net_input):
        return self.logits[prev_output_tokens], {"attn": None}  # B x T x V


def valid_batch(task):
    task.load_dataset("valid")
    itr = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=4000)
    return next(iter(itr.next_epoch_itr(shuffle=False)))


def test_alpha_zero_equals_label_smoothed_cross_entropy(
    multi_bin, multi_teacher, tmp_path
):
    lsce = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    stock = student_logs(
        multi_bin, str(tmp_path / "a"), "translation_multi_simple_epoch", lsce
    )
    kd = ["--criterion", "word_kd", "--kd-alpha", "0", "--label-smoothing", "0.1"]
    ours = student_logs(
        multi_bin, str(tmp_path / "b"), TASK, kd + ["--teacher-path", multi_teacher]
    )
    for a, b in zip(stock[0], ours[0]):
        assert (a["loss"], a["nll_loss"], a["gnorm"]) == (
            b["loss"],
            b["nll_loss"],
            b["gnorm"],
        )
        assert "kd_loss" in b  # the teacher ran: the KD term is logged only
    assert len(stock[1]) == len(ours[1]) == 2
    for a, b in zip(stock[1], ours[1]):
        assert (a["valid_loss"], a["valid_nll_loss"]) == (
            b["valid_loss"],
            b["valid_nll_loss"],
        )
        for pair in PAIRS:
            assert f"valid_nll_loss_{pair}" in b and f"valid_kd_loss_{pair}" in b


def test_live_and_offline_kd_loss_agree(multi_bin, multi_teacher, multi_topk, tmp_path):
    kd = ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-topk", "8"]
    live = student_logs(
        multi_bin, str(tmp_path / "a"), TASK, kd + ["--teacher-path", multi_teacher]
    )
    offline = student_logs(
        multi_bin, str(tmp_path / "b"), TASK, kd + ["--teacher-topk", multi_topk]
    )
    keys = ["kd_loss", "loss"]
    valid_keys = [f"valid_kd_loss_{p}" for p in PAIRS] + ["valid_kd_loss"]
    for logs, names in ((0, keys), (1, valid_keys)):
        assert len(live[logs]) == len(offline[logs]) == 2
        for a, b in zip(live[logs], offline[logs]):
            for name in names:
                # the store keeps float16 log-probabilities; logs round to 3 places
                assert float(a[name]) == pytest.approx(float(b[name]), abs=2e-3)
    per_direction = [float(live[1][0][f"valid_kd_loss_{p}"]) for p in PAIRS]
    assert len(set(per_direction)) == len(PAIRS)  # directions are told apart


@pytest.mark.parametrize(
    "kd_topk,temperature", [(0, 1.0), (0, 2.0), (4, 1.0), (4, 2.0)]
)
def test_kd_is_zero_at_language_tags_and_the_rest_is_bilingual(
    multi_bin, multi_teacher, kd_topk, temperature
):
    task, _ = make_task(multi_bin, "--teacher-path", multi_teacher)
    task.teachers = load_teacher_ensemble(multi_teacher, task)
    sample = valid_batch(task)
    target = sample["target"]  # B x T, a language tag first (--decoder-langtok)
    tags = {task.target_dictionary.index(f"__{lang}__") for lang in ("de", "en")}
    assert {int(t) for t in target[:, 0]} == tags  # rows of en-de and of x-en
    model = FakeModel(torch.randn(*target.shape, len(task.target_dictionary)))
    criterion = WordKDCriterion(
        task, False, 0.1, kd_alpha=0.5, kd_temperature=temperature, kd_topk=kd_topk
    )
    task.prepare_teacher(sample, model, criterion)
    teacher = sample[TEACHER_KEY]
    assert torch.equal(teacher[KD_MASK][:, 0], torch.zeros_like(target[:, 0]).bool())
    assert bool(teacher[KD_MASK][:, 1:].all())
    net_output = model(**sample["net_input"])
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    kd, _ = criterion.compute_kd_per_token(model, net_output, sample, teacher, lprobs)
    kd = kd.reshape(target.shape)
    assert bool((kd[:, 0] == 0).all())
    assert bool((kd[:, 1:][target[:, 1:].ne(1)] > 0).all())
    # the same sentences without the tag position: a bilingual sample
    bilingual = {
        "net_input": sample["net_input"],
        "target": target[:, 1:],
        "ntokens": int(target[:, 1:].ne(1).sum()),
        TEACHER_KEY: {k: v[:, 1:] for k, v in teacher.items() if k != KD_MASK},
    }
    bi_model = FakeModel(model.logits.data[:, 1:])
    bi_output = bi_model(**sample["net_input"])
    bi_lprobs = bi_model.get_normalized_probs(bi_output, log_probs=True)
    bi_kd, _ = criterion.compute_kd_per_token(
        bi_model, bi_output, bilingual, bilingual[TEACHER_KEY], bi_lprobs
    )
    torch.testing.assert_close(kd[:, 1:], bi_kd.reshape(target[:, 1:].shape))
    # every code path of the criterion (one gather, fused, per token) agrees
    _, _, log = criterion(model, sample)
    _, _, bi_log = criterion(bi_model, bilingual)
    torch.testing.assert_close(log["kd_loss"], bi_log["kd_loss"])


def test_kd_on_langtok_keeps_the_tag_positions(multi_bin, multi_teacher):
    task, _ = make_task(multi_bin, "--teacher-path", multi_teacher, "--kd-on-langtok")
    task.teachers = load_teacher_ensemble(multi_teacher, task)
    sample = valid_batch(task)
    model = FakeModel(torch.randn(*sample["target"].shape, len(task.target_dictionary)))
    criterion = WordKDCriterion(task, False, 0.1, kd_alpha=0.5)
    task.prepare_teacher(sample, model, criterion)
    assert KD_MASK not in sample[TEACHER_KEY]
    net_output = model(**sample["net_input"])
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    kd, _ = criterion.compute_kd_per_token(
        model, net_output, sample, sample[TEACHER_KEY], lprobs
    )
    assert bool((kd.reshape(sample["target"].shape)[:, 0] > 0).all())


def test_valid_step_sums_per_direction(multi_bin, multi_teacher):
    from fairseq.logging import metrics

    task, _ = make_task(multi_bin, "--teacher-path", multi_teacher)
    task.teachers = load_teacher_ensemble(multi_teacher, task)
    sample = valid_batch(task)
    assert len(set(sample[DIRECTION_KEY])) == len(PAIRS)
    vocab = len(task.target_dictionary)
    model = TokenModel(torch.randn(vocab, vocab))
    criterion = WordKDCriterion(task, False, 0.1, kd_alpha=0.5)
    loss, sample_size, log = task.valid_step(sample, model, criterion)
    assert sample_size == sample["ntokens"] == log["ntokens"]
    for key in ("loss", "nll_loss", "kd_loss", "ntokens"):
        parts = sum(float(log[f"{key}_{pair}"]) for pair in PAIRS)
        assert parts == pytest.approx(float(log[key]), rel=1e-6)
    _, _, whole = criterion(model, sample)  # the batch at once, no split
    assert float(log["kd_loss"]) == pytest.approx(float(whole["kd_loss"]), rel=1e-5)
    with metrics.aggregate() as agg:
        task.reduce_metrics([log, log], criterion)
    stats = agg.get_smoothed_values()
    for pair in PAIRS:
        expected = float(log[f"kd_loss_{pair}"]) / log[f"ntokens_{pair}"] / 0.6931472
        assert stats[f"kd_loss_{pair}"] == pytest.approx(expected, abs=1e-3)


def edited_teacher(path, dest, **changes):
    """A copy of the teacher whose saved task options are changed."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key, value in changes.items():
        setattr(state["cfg"]["task"], key, value)
    torch.save(state, dest)
    return dest


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"lang_tok_style": "mbart"},
            r"--lang-tok-style: the teacher's 'mbart', this task's 'multilingual'",
        ),
        (
            {"lang_pairs": "de-en,cs-en"},
            r"--lang-pairs: this task's en-de not among the teacher's de-en,cs-en",
        ),
        (
            {"langs": None, "lang_pairs": "de-en,cs-en,en-de,fr-en"},
            r"languages .*the teacher's cs,de,en,fr, this task's cs,de,en",
        ),
        ({"decoder_langtok": False}, r"--decoder-langtok: the teacher's False"),
    ],
)
def test_teacher_with_other_settings_is_refused(
    multi_bin, multi_teacher, tmp_path, changes, message
):
    other = edited_teacher(multi_teacher, str(tmp_path / "t.pt"), **changes)
    task, _ = make_task(multi_bin, "--teacher-path", other)
    with pytest.raises(ValueError, match=message):
        load_teacher_ensemble(other, task)


def test_teacher_with_other_tag_style_is_refused_by_fairseq_train(
    multi_bin, multi_teacher, tmp_path
):
    other = edited_teacher(
        multi_teacher, str(tmp_path / "t.pt"), lang_tok_style="mbart"
    )
    proc = run(
        ["fairseq-train", multi_bin, "--save-dir", str(tmp_path / "s")]
        + ["--user-dir", USER_DIR, "--task", TASK, *task_flags()]
        + ["--criterion", "word_kd", "--teacher-path", other, "--max-update", "1"]
        + STUDENT_ARCH
        + TRAIN_FLAGS,
        check=False,
    )
    assert proc.returncode != 0
    assert "other multilingual settings" in proc.stderr + proc.stdout
    assert "--lang-tok-style: the teacher's 'mbart'" in proc.stderr + proc.stdout


def test_store_of_another_direction_is_refused(multi_bin, multi_topk, tmp_path):
    root = tmp_path / "topk"
    for pair, source in (("de-en", "cs-en"), ("cs-en", "de-en"), ("en-de", "en-de")):
        os.makedirs(root / "train", exist_ok=True)
        os.symlink(os.path.join(multi_topk, "train", source), root / "train" / pair)
    task, _ = make_task(multi_bin, "--teacher-topk", str(root), "--disable-validation")
    with pytest.raises(
        TopKStoreMismatch,
        match=r"dumped for cs-en \(source tag __cs__, target tag __en__\), but it "
        r"is read for de-en \(source tag __de__, target tag __en__\) of split 'train'",
    ):
        task.load_dataset("train")


def test_dump_of_a_subset_of_directions(multi_bin, multi_teacher, tmp_path):
    out = str(tmp_path / "valid")
    flags = ["--task", "translation_multi_simple_epoch", *task_flags(), "--k", "4"]
    stats = dump(
        multi_bin, multi_teacher, out, "--gen-subset", "valid", *flags,
        "--dump-lang-pairs", "en-de",
    )  # fmt: skip
    assert sorted(os.listdir(out)) == ["en-de"]
    header = TopKStore(os.path.join(out, "en-de")).header
    assert header["direction"]["lang_pair"] == "en-de"
    assert header["direction"]["target_langtok"] == "__de__"
    assert stats["sentences"] == header["num_sentences"] > 0
