"""The teacher forward: precision, top-K in chunks at the source, the dump's writer."""

import os
import threading

import numpy as np
import pytest
import torch
from fairseq import models, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fakes import FakeModel, make_dictionary

from fairseq_kd import dump_topk
from fairseq_kd.checkpoints import teacher_log_probs
from fairseq_kd.criterions.word_kd import WordKDCriterion
from fairseq_kd.tasks.translation_kd import TranslationKDConfig, TranslationKDTask
from fairseq_kd.teacher import (
    TeacherPrecision,
    resolve_precision,
    teacher_distribution,
)
from fairseq_kd.topk_store import TopKStore

VOCAB = 60  # words besides the 4 special symbols
DIMS = [
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]  # fmt: skip
RESOLVED = {"dataset_impl": "mmap", "train_subset": "train"}
RESOLVED["required_seq_len_multiple"] = 1
# kd_loss agreement with the fp32 teacher, relative (bf16 keeps 8 bits of mantissa)
TOLERANCE = {"fp32": 0.0, "bf16": 3e-2, "fp16": 5e-3, "amp-bf16": 3e-2}


def kd_task(precision="auto"):
    d = make_dictionary(VOCAB)
    cfg = TranslationKDConfig(
        data="unused", teacher_path="in-memory", teacher_precision=precision, **RESOLVED
    )
    return TranslationKDTask(cfg, d, d)


def random_transformer(task, seed):
    parser = options.get_training_parser()
    argv = ["unused", "--task", "translation", "--arch", "transformer", *DIMS]
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(parser, input_args=argv)
    )
    torch.manual_seed(seed)
    model = models.build_model(cfg.model, task)
    model.eval().requires_grad_(False)
    return model


def random_sample(task, bsz=5, src_len=7, tgt_len=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.target_dictionary
    n = len(d)
    src = torch.randint(d.nspecial, n, (bsz, src_len), generator=g)
    target = torch.randint(d.nspecial, n, (bsz, tgt_len), generator=g)
    lengths = torch.randint(2, tgt_len + 1, (bsz,), generator=g)
    lengths[0] = tgt_len
    for row, length in enumerate(lengths.tolist()):
        target[row, length:] = d.pad()
    prev = torch.cat([torch.full((bsz, 1), d.eos()), target[:, :-1]], dim=1)
    prev = prev.masked_fill(prev.eq(d.pad()), d.pad())
    return {
        "id": torch.arange(bsz),
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((bsz,), src_len),
            "prev_output_tokens": prev,
        },
        "target": target,
        "ntokens": int(target.ne(d.pad()).sum()),
    }


def independent_log_probs(teachers, net_input):
    """log of the mean of the members' softmax, computed without the plugin."""
    probs = [
        torch.softmax(t(**net_input)[0].float(), dim=-1) for t in teachers
    ]  # B x T x V each
    return torch.log(sum(probs) / len(probs))


def criterion(task, topk=0, T=1.0, **kw):
    crit = WordKDCriterion(
        task, False, 0.1, kd_alpha=0.5, kd_temperature=T, kd_topk=topk, **kw
    )
    task.criterion = crit
    return crit


def student_for(sample, seed=1):
    torch.manual_seed(seed)
    return FakeModel(torch.randn(*sample["target"].shape, VOCAB + 4))


# --- top-K where it is computed ---------------------------------------------


@pytest.mark.parametrize("members", [1, 2, 3])
@pytest.mark.parametrize("rows", [256, 7])
def test_topk_in_chunks_equals_the_full_distributions_topk(members, rows):
    task = kd_task()
    teachers = [random_transformer(task, seed) for seed in range(members)]
    sample = random_sample(task)
    with torch.no_grad():
        full, none = teacher_distribution(teachers, sample["net_input"], rows=rows)
        values, indices = teacher_distribution(
            teachers, sample["net_input"], topk=8, rows=rows
        )
        expected = independent_log_probs(teachers, sample["net_input"])
    assert none is None and full.dtype == torch.float32
    assert full.shape == expected.shape
    assert torch.allclose(full, expected, atol=1e-5)
    ref_values, ref_indices = full.topk(8, dim=-1)
    assert values.shape == indices.shape == (*sample["target"].shape, 8)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)
    assert torch.equal(indices, expected.topk(8, dim=-1).indices)


def test_positions_select_rows_and_full_vocabulary_reuses_nothing_it_should_not():
    task = kd_task()
    teachers = [random_transformer(task, 0), random_transformer(task, 1)]
    sample = random_sample(task)
    mask = sample["target"].ne(task.target_dictionary.pad())
    positions = mask.reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        full, _ = teacher_distribution(teachers, sample["net_input"])
        values, indices = teacher_distribution(
            teachers, sample["net_input"], topk=5, positions=positions, rows=3
        )
        picked, _ = teacher_distribution(
            teachers[:1], sample["net_input"], positions=positions
        )
        single, _ = teacher_distribution(teachers[:1], sample["net_input"])
    ref_values, ref_indices = full[mask].topk(5, dim=-1)  # sum(L) x 5
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)
    assert torch.equal(picked, single[mask])
    # the thin alias and a fake model whose logits are a parameter (not overwritten)
    fake = FakeModel(torch.randn(2, 3, 7)).eval()
    before = fake.logits.detach().clone()
    lp = teacher_log_probs([fake], {})
    assert torch.equal(fake.logits.detach(), before)
    assert torch.allclose(lp, torch.log_softmax(before, -1))


def test_topk_larger_than_the_vocabulary_is_refused():
    task = kd_task()
    sample = random_sample(task)
    with pytest.raises(ValueError, match="top-100 asked of a teacher"):
        teacher_distribution(
            [random_transformer(task, 0)], sample["net_input"], topk=100
        )


@pytest.mark.parametrize("T,selection", [(1.0, "none"), (2.0, "none"), (1.0, "batch")])
def test_live_kd_topk_attaches_topk_and_keeps_the_loss_and_gradients(T, selection):
    task = kd_task()
    task.teachers = [random_transformer(task, 0)]
    sample = random_sample(task)
    full_sample = {k: v for k, v in sample.items()}
    crit = criterion(task, topk=8, T=T, kd_selection=selection)
    # today's path: the whole vocabulary attached, restricted by the criterion
    task.attach_teacher(full_sample, student_for(sample), criterion=object())
    assert full_sample["teacher"]["lprobs"].shape[-1] == VOCAB + 4
    assert "indices" not in full_sample["teacher"]
    task.attach_teacher(sample, student_for(sample))  # K from task.criterion
    teacher = sample["teacher"]
    assert teacher["lprobs"].shape == (*sample["target"].shape, 8)
    assert teacher["indices"].dtype == torch.int64
    results = []
    for s in (full_sample, sample):
        student = student_for(s)
        loss, _, log = crit(student, s)
        loss.backward()
        results.append((loss.detach(), log["kd_loss"], student.logits.grad))
    (loss_a, kd_a, grad_a), (loss_b, kd_b, grad_b) = results
    assert torch.allclose(kd_a, kd_b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_a, grad_b, rtol=1e-5, atol=1e-7)


def test_ensemble_train_step_gives_the_criterion_the_averaged_distribution():
    task = kd_task()
    members = [random_transformer(task, 0), random_transformer(task, 1)]
    task.teachers = members
    sample = random_sample(task)
    seen = {}

    class Recording(WordKDCriterion):
        def forward(self, model, sample, reduce=True):
            seen["teacher"] = {k: v.clone() for k, v in sample["teacher"].items()}
            return super().forward(model, sample, reduce)

    crit = Recording(task, False, 0.1, kd_alpha=0.5, kd_topk=4)
    task.criterion = crit

    class Optimizer:
        def backward(self, loss):
            loss.backward()

    student = student_for(sample)
    student.set_num_updates = lambda n: None  # what fairseq's train_step calls
    task.train_step(sample, student, crit, Optimizer(), update_num=0)
    with torch.no_grad():
        expected = independent_log_probs(members, sample["net_input"])  # B x T x V
        single = independent_log_probs(members[:1], sample["net_input"])
    values, indices = expected.topk(4, dim=-1)
    assert torch.equal(seen["teacher"]["indices"], indices)
    assert torch.allclose(seen["teacher"]["lprobs"], values, atol=1e-5)
    assert not torch.allclose(values, single.topk(4, dim=-1).values, atol=1e-3)


# --- precision ---------------------------------------------------------------


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize(
    "option,student,autocast,weights,teacher_autocast,name",
    [
        ("auto", F32, None, F32, None, "fp32"),
        ("auto", F16, None, F16, None, "fp16"),
        ("auto", BF16, None, BF16, None, "bf16"),
        ("auto", F32, F16, F32, F16, "amp-fp16"),
        ("auto", F32, BF16, F32, BF16, "amp-bf16"),
        ("fp32", BF16, None, F32, None, "fp32"),
        ("fp32", F32, F16, F32, None, "fp32"),
        ("bf16", F16, None, BF16, None, "bf16"),
        ("fp16", F32, BF16, F16, None, "fp16"),
    ],
)
def test_resolve_precision(option, student, autocast, weights, teacher_autocast, name):
    precision = resolve_precision(option, student, autocast)
    assert precision == TeacherPrecision(weights, teacher_autocast)
    assert precision.name == name


def test_unknown_precision_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--teacher-precision must be one of"):
        resolve_precision("fp8")


def _kd_loss(task, sample):
    crit = criterion(task)
    _, _, log = crit(student_for(sample), sample)
    return float(log["kd_loss"])


def _attach(option, student_dtype=F32, autocast=None):
    """Attach a precision's teacher; return the task, the sample and its kd_loss."""
    task = kd_task(option)
    task.teachers = [random_transformer(task, 0)]
    sample = random_sample(task)
    student = torch.nn.Linear(1, 1).to(student_dtype)
    if autocast is None:
        task.attach_teacher(sample, student)
    else:
        with torch.autocast("cpu", dtype=autocast):
            task.attach_teacher(sample, student)
    return task, sample, _kd_loss(task, sample)


@pytest.mark.parametrize(
    "option,student,autocast,weights,key",
    [
        ("auto", F32, None, F32, "fp32"),
        ("bf16", F32, None, BF16, "bf16"),
        ("auto", BF16, None, BF16, "bf16"),
        ("auto", F32, BF16, F32, "amp-bf16"),  # CPU autocast, fp32 weights
        ("fp32", BF16, None, F32, "fp32"),  # explicit fp32 under a bf16 student
        ("fp32", F32, BF16, F32, "fp32"),  # explicit fp32 inside autocast
        ("fp16", F32, None, F16, "fp16"),
    ],
)
def test_precision_combinations_on_cpu_agree_with_fp32(
    option, student, autocast, weights, key
):
    _, reference, kd_fp32 = _attach("fp32")
    task, sample, kd = _attach(option, student, autocast)
    (teacher,) = task.teachers
    assert next(teacher.parameters()).dtype == weights
    lprobs = sample["teacher"]["lprobs"]
    assert lprobs.dtype == torch.float32  # normalised in float32 from the logits
    assert torch.allclose(
        lprobs.logsumexp(-1), torch.zeros(lprobs.shape[:2]), atol=1e-5
    )
    assert kd == pytest.approx(kd_fp32, rel=TOLERANCE[key], abs=1e-6)
    if key == "fp32":
        assert torch.equal(lprobs, reference["teacher"]["lprobs"])
    else:  # it really ran in the lower precision
        assert not torch.equal(lprobs, reference["teacher"]["lprobs"])


def test_amp_autocast_is_only_set_up_for_a_cuda_student():
    from fairseq.optim.amp_optimizer import AMPOptimizer

    fake_amp = AMPOptimizer.__new__(AMPOptimizer)  # isinstance is all that counts
    student = torch.nn.Linear(1, 1)
    with TranslationKDTask._student_autocast(student, fake_amp):
        assert not torch.is_autocast_enabled("cuda")
        assert not torch.is_autocast_enabled("cpu")


# --- the dump's batch loop ---------------------------------------------------


def _arrays(path):
    store = TopKStore(path)
    return {
        name: open(os.path.join(path, spec["file"]), "rb").read()
        for name, spec in store.header["arrays"].items()
    }


def _dump(data, teacher, out, *flags, background=True):
    cfg = dump_topk.parse(
        [data, "--path", teacher, "--output", out, "--cpu", "--no-progress-bar"]
        + ["--gen-subset", "valid", "--max-tokens", "60", "--commit-interval", "2"]
        + list(flags)
    )
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.dump.background_writer = background
    return dump_topk.dump(cfg)


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "fairseq-kd-dump-writer"]


@pytest.mark.parametrize("ensemble", [False, True])
def test_background_writer_writes_the_same_bytes(
    data_bin, teacher, teacher_early, tmp_path, ensemble
):
    path = f"{teacher}:{teacher_early}" if ensemble else teacher
    sync = _dump(data_bin, path, str(tmp_path / "sync"), background=False)
    bg = _dump(data_bin, path, str(tmp_path / "bg"))
    assert sync["tokens"] == bg["tokens"] > 0
    assert _arrays(sync["output"]) == _arrays(bg["output"])
    assert not _writer_threads()


def test_writes_overlap_the_next_batchs_forward(
    data_bin, teacher, tmp_path, monkeypatch
):
    """Batch 1's write waits until batch 2's forward has started: only a writer
    running beside the forward gets past it."""
    started = []
    next_forward = threading.Event()
    from fairseq_kd import topk_store

    original_forward = dump_topk.topk_of_batch
    original_write = topk_store.TopKWriter.write

    def forward(*args, **kw):
        started.append(threading.current_thread().name)
        if len(started) == 2:
            next_forward.set()
        return original_forward(*args, **kw)

    overlapped = []

    def write(self, *args):
        if not overlapped:
            overlapped.append(next_forward.wait(timeout=10))
        return original_write(self, *args)

    monkeypatch.setattr(dump_topk, "topk_of_batch", forward)
    monkeypatch.setattr(topk_store.TopKWriter, "write", write)
    _dump(data_bin, teacher, str(tmp_path / "store"))
    assert len(started) > 2 and overlapped == [True]


@pytest.mark.parametrize("where", ["writer", "forward"])
def test_the_writer_thread_is_joined_when_a_batch_fails(
    data_bin, teacher, tmp_path, monkeypatch, where
):
    from fairseq_kd import topk_store

    calls = []
    original = (
        topk_store.TopKWriter.write if where == "writer" else dump_topk.topk_of_batch
    )

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(f"injected failure in the {where}")
        return original(*args, **kw)

    if where == "writer":
        monkeypatch.setattr(topk_store.TopKWriter, "write", failing)
    else:
        monkeypatch.setattr(dump_topk, "topk_of_batch", failing)
    with pytest.raises(OSError, match=f"injected failure in the {where}"):
        _dump(data_bin, teacher, str(tmp_path / "store"))
    assert not _writer_threads()


def test_dump_precision_follows_bf16_and_the_option(data_bin, teacher, tmp_path):
    fp32 = _dump(data_bin, teacher, str(tmp_path / "fp32"))
    bf16 = _dump(data_bin, teacher, str(tmp_path / "bf16"), "--bf16")
    forced = _dump(
        data_bin,
        teacher,
        str(tmp_path / "forced"),
        "--bf16",
        "--teacher-precision",
        "fp32",
    )
    assert fp32["header"]["dump"]["precision"] == "fp32"
    assert bf16["header"]["dump"]["precision"] == "bf16"
    assert forced["header"]["dump"]["precision"] == "fp32"
    assert _arrays(forced["output"]) == _arrays(fp32["output"])
    assert _arrays(bf16["output"]) != _arrays(fp32["output"])  # really bf16
    a = TopKStore(fp32["output"])
    b = TopKStore(bf16["output"])
    lp_a = torch.from_numpy(np.asarray(a._arrays()["lprobs"], dtype=np.float32))
    lp_b = torch.from_numpy(np.asarray(b._arrays()["lprobs"], dtype=np.float32))
    assert lp_a.shape == lp_b.shape
    # the most probable entries agree within bf16's precision
    ids_a = np.asarray(a._arrays()["indices"])[:, 0]
    ids_b = np.asarray(b._arrays()["indices"])[:, 0]
    assert (ids_a == ids_b).mean() > 0.9
    assert (lp_a[:, 0].exp() - lp_b[:, 0].exp()).abs().mean() < 1e-2
    mass = [s["header"]["avg_topk_mass"] for s in (fp32, bf16)]
    assert mass[0] == pytest.approx(mass[1], abs=5e-3)
