"""Training from a top-k store: same losses as live, alignment, start-up checks, DDP."""

import os
import re
import socket
import subprocess

import numpy as np
import pytest
import torch
from corpus import BIN, STUDENT_ARCH, TRAIN_FLAGS, json_logs, run, train
from fairseq.data import Dictionary, LanguagePairDataset, bucket_pad_length_dataset
from fakes import FakeModel
from topk_util import SentenceReference, assert_entries_match, dump, make_task

from fairseq_kd.checkpoints import load_teacher_ensemble
from fairseq_kd.topk_dataset import TopKTeacherDataset, collate_teacher
from fairseq_kd.topk_store import TopKStore, TopKStoreError, TopKStoreMismatch

USER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fairseq_kd")


@pytest.fixture(scope="module")
def full_vocab_root(data_bin, teacher, tmp_path_factory):
    """Stores with k = the whole target vocabulary (train and valid)."""
    vocab = len(Dictionary.load(os.path.join(data_bin, "dict.tgt.txt")))
    root = str(tmp_path_factory.mktemp("topk_full"))
    for split in ("train", "valid"):
        dump(
            data_bin,
            teacher,
            os.path.join(root, split),
            "--gen-subset",
            split,
            "--k",
            str(vocab),
        )
    return root


def kd_flags(T, topk, alpha=1.0):
    return [
        "--criterion", "word_kd", "--kd-alpha", str(alpha),
        "--kd-temperature", str(T), "--kd-topk", str(topk), "--label-smoothing", "0",
    ]  # fmt: skip


def valid_batches(task, n=3):
    itr = task.get_batch_iterator(
        dataset=task.dataset("valid"), max_tokens=250, seed=3
    ).next_epoch_itr(shuffle=True)
    return [sample for _, sample in zip(range(n), itr)]


@pytest.mark.parametrize(
    "store,live_topk,offline_topk,T",
    [
        ("full", 0, 0, 1.0),
        ("full", 0, 0, 2.0),
        ("top8", 8, 0, 1.0),
        ("top8", 8, 8, 2.0),
        ("top8", 3, 3, 2.0),
    ],
)
def test_offline_kd_loss_equals_live(
    data_bin, teacher, topk_root, full_vocab_root, store, live_topk, offline_topk, T
):
    root = full_vocab_root if store == "full" else topk_root
    live, cfg_live = make_task(
        data_bin, "--teacher-path", teacher, *kd_flags(T, live_topk)
    )
    offline, cfg_off = make_task(
        data_bin, "--teacher-topk", root, *kd_flags(T, offline_topk)
    )
    live.teachers = load_teacher_ensemble(teacher, live)
    for task in (live, offline):
        task.load_dataset("valid")
    assert isinstance(offline.dataset("valid"), TopKTeacherDataset)
    crit_live = live.build_criterion(cfg_live.criterion)
    crit_off = offline.build_criterion(cfg_off.criterion)
    torch.manual_seed(0)
    for a, b in zip(valid_batches(live), valid_batches(offline)):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["target"], b["target"])
        model = FakeModel(torch.randn(*a["target"].shape, len(live.target_dictionary)))
        live.attach_teacher(a, model)
        assert b["teacher"]["lprobs"].dtype == torch.float16
        _, _, log_live = crit_live(model, a)
        _, _, log_off = crit_off(model, b)
        assert float(log_off["kd_loss"]) == pytest.approx(
            float(log_live["kd_loss"]), rel=2e-3
        )
        assert torch.equal(log_off["nll_loss"], log_live["nll_loss"])


def _get_buckets(sizes, num_buckets):
    """fairseq's ``get_buckets`` without numpy's removed ``interpolation=``."""
    edges = np.percentile(sizes, np.linspace(0, 100, num_buckets + 1), method="lower")
    return np.unique(edges[1:])


@pytest.fixture(scope="module")
def train_reference(data_bin, teacher):
    task, _ = make_task(data_bin)
    task.load_dataset("train", combine=True)
    return SentenceReference(teacher, task, task.dataset("train"), group=16)


@pytest.mark.parametrize(
    "num_workers,num_shards,shard_id,extra",
    [
        (0, 1, 0, []),
        (2, 2, 1, []),
        (0, 1, 0, ["--left-pad-target"]),
    ],
)
def test_every_batch_carries_its_sentences_entries(
    data_bin, topk_root, train_reference, num_workers, num_shards, shard_id, extra
):
    task, _ = make_task(data_bin, "--teacher-topk", topk_root, *extra)
    task.load_dataset("train", combine=True)
    dataset = task.dataset("train")
    pad = task.target_dictionary.pad()
    itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=400,
        seed=7,
        num_shards=num_shards,
        shard_id=shard_id,
        num_workers=num_workers,
        epoch=2,
    ).next_epoch_itr(shuffle=True)
    seen = 0
    for sample in itr:
        if not sample:  # the dummy batch that evens out shards
            continue
        teacher_out = sample["teacher"]
        assert teacher_out["lprobs"].shape[:2] == sample["target"].shape
        for row, sentence in enumerate(sample["id"].tolist()):
            seen += 1
            if sentence % 4 != shard_id:  # a quarter of the sentences, every batch
                continue
            mask = sample["target"][row].ne(pad)
            ref = train_reference(sentence)
            assert_entries_match(
                teacher_out["lprobs"][row][mask], teacher_out["indices"][row][mask], ref
            )
            assert (teacher_out["indices"][row][~mask] == pad).all()
    assert seen >= len(dataset) // num_shards - 50


def test_bucket_padded_items_align(data_bin, topk_root, train_reference, monkeypatch):
    # fairseq 0.12's --num-batch-buckets fails on numpy 2 (np.compat, percentile's
    # interpolation=); build the same padded items by hand
    monkeypatch.setattr(bucket_pad_length_dataset, "get_buckets", _get_buckets)
    task, _ = make_task(data_bin)
    task.load_dataset("train", combine=True)
    plain = task.dataset("train")
    padded = [
        bucket_pad_length_dataset.BucketPadLengthDataset(
            ds, sizes, 3, task.target_dictionary.pad(), left_pad
        )
        for ds, sizes, left_pad in (
            (plain.src, plain.src_sizes, True),
            (plain.tgt, plain.tgt_sizes, False),
        )
    ]
    bucketed = LanguagePairDataset(
        padded[0],
        padded[0].sizes,
        plain.src_dict,
        padded[1],
        padded[1].sizes,
        plain.tgt_dict,
    )
    store = TopKStore(os.path.join(topk_root, "train"))
    args = (task.source_dictionary, task.target_dictionary, "train")
    store.verify_against(bucketed, *args)  # compares the unpadded lengths
    dataset = TopKTeacherDataset(bucketed, store, task.target_dictionary.pad())
    pad = task.target_dictionary.pad()
    for start in range(0, 1500, 250):
        sample = dataset.collater([dataset[i] for i in range(start, start + 40)])
        assert sample["target"].eq(pad).any()  # some items were padded
        for row, sentence in enumerate(sample["id"].tolist()):
            mask = sample["target"][row].ne(pad)
            assert_entries_match(
                sample["teacher"]["lprobs"][row][mask],
                sample["teacher"]["indices"][row][mask],
                train_reference(sentence),
            )


def test_collate_teacher_follows_left_and_right_padding():
    pad, k = 1, 2
    entries = [
        {"lprobs": torch.full((3, k), -1.0), "indices": torch.full((3, k), 7)},
        {"lprobs": torch.full((1, k), -2.0), "indices": torch.full((1, k), 9)},
    ]
    right = torch.tensor([[5, 6, 2], [2, pad, pad]])
    left = torch.tensor([[5, 6, 2], [pad, pad, 2]])
    out = collate_teacher(entries, right, pad, k)
    assert out["indices"][:, :, 0].tolist() == [[7, 7, 7], [9, pad, pad]]
    out = collate_teacher(entries, left, pad, k)
    assert out["indices"][:, :, 0].tolist() == [[7, 7, 7], [pad, pad, 9]]
    assert out["lprobs"][1, 2, 0] == -2.0 and out["lprobs"].dtype == torch.float16
    with pytest.raises(RuntimeError, match="misaligned"):
        collate_teacher(entries[::-1], right, pad, k)


def test_start_up_errors(data_bin, teacher, topk_root):
    with pytest.raises(ValueError, match="mutually exclusive"):
        make_task(data_bin, "--teacher-path", teacher, "--teacher-topk", topk_root)
    task, cfg = make_task(data_bin, *kd_flags(1.0, 0, alpha=0.5))
    with pytest.raises(ValueError, match="--teacher-path .* or\\s+--teacher-topk"):
        task.build_criterion(cfg.criterion)
    task, cfg = make_task(data_bin, "--teacher-topk", topk_root, *kd_flags(1.0, 16))
    with pytest.raises(ValueError, match="--kd-topk 16 is larger than the 8"):
        task.build_criterion(cfg.criterion)
    task, cfg = make_task(data_bin, "--teacher-topk", os.path.dirname(topk_root))
    with pytest.raises(TopKStoreError, match="no store for the training split"):
        task.load_dataset("train", combine=True)


def test_validation_without_a_store_is_label_smoothed_ce(data_bin, topk_root):
    # one store given: it serves the training split only
    task, cfg = make_task(
        data_bin, "--teacher-topk", os.path.join(topk_root, "train"), *kd_flags(2.0, 0)
    )
    task.load_dataset("valid")
    assert not isinstance(task.dataset("valid"), TopKTeacherDataset)
    crit = task.build_criterion(cfg.criterion)
    (sample,) = valid_batches(task, 1)
    model = FakeModel(torch.randn(*sample["target"].shape, len(task.target_dictionary)))
    model.eval()
    loss, _, log = crit(model, sample)
    assert "kd_loss" not in log and torch.equal(loss, log["nll_loss"])
    model.train()
    with pytest.raises(RuntimeError, match="no teacher distributions"):
        crit(model, sample)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_training_from_the_store_equals_one_process(
    data_bin, topk_root, tmp_path
):
    flags = ["--user-dir", USER_DIR, "--task", "translation_kd"]
    flags += ["--teacher-topk", topk_root, *kd_flags(2.0, 0, alpha=0.5)]
    flags += ["--label-smoothing", "0.1", "--dropout", "0", "--max-tokens", "600"]
    flags += ["--no-save", "--disable-validation"]
    updates = 4
    single = train(
        data_bin, str(tmp_path / "one"), flags + ["--update-freq", "2"],
        arch=STUDENT_ARCH, updates=updates,
    )  # fmt: skip
    port = _free_port()
    procs = []
    for rank in (0, 1):
        cmd = [os.path.join(BIN, "fairseq-train"), data_bin]
        cmd += [
            "--save-dir",
            str(tmp_path / f"rank{rank}"),
            "--max-update",
            str(updates),
        ]
        cmd += STUDENT_ARCH + TRAIN_FLAGS + flags
        cmd += ["--distributed-world-size", "2", "--distributed-rank", str(rank)]
        cmd += ["--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        cmd += ["--distributed-no-spawn", "--distributed-backend", "gloo"]
        cmd += ["--ddp-backend", "legacy_ddp"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    one = json_logs(single.stdout, "train_inner")
    two = json_logs(outputs[0], "train_inner")
    assert len(one) == len(two) == updates
    for a, b in zip(one, two):
        assert a["wpb"] == b["wpb"] and a["bsz"] == b["bsz"]  # same global batch
        for key in ("loss", "nll_loss", "kd_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), key


@pytest.mark.parametrize(
    "kd_topk,eps,dtype",
    [(0, 0.1, torch.float32), (3, 0.1, torch.float32), (0, 0.0, torch.float64)],
)
def test_one_gather_path_equals_the_two_term_path(kd_topk, eps, dtype):
    from fakes import FakeTask, make_dictionary, make_sample

    from fairseq_kd.criterions.word_kd import WordKDCriterion

    torch.manual_seed(3)
    d = make_dictionary(20)
    pad, vocab = d.pad(), len(d)
    target = torch.tensor([[5, 6, 7, 2], [8, 9, 2, pad]])
    full = torch.log_softmax(torch.randn(2, 4, vocab) * 3, -1)
    values, indices = full.topk(8, dim=-1)
    logits = torch.randn(2, 4, vocab, dtype=dtype)
    results = []
    for share in (True, False):
        crit = WordKDCriterion(FakeTask(d), False, eps, kd_alpha=0.6, kd_topk=kd_topk)
        crit.share_gather = share
        teacher = {"indices": indices.to(torch.int32)}
        assert crit._shares_gather(teacher) is share
        model = FakeModel(logits)
        sample = make_sample(target, pad, values.half(), indices)
        loss, _, log = crit(model, sample)
        loss.backward()
        results.append((loss, log, model.logits.grad))
    (l1, log1, g1), (l2, log2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-6)
    assert torch.equal(log1["nll_loss"], log2["nll_loss"])
    assert torch.allclose(log1["kd_loss"], log2["kd_loss"], rtol=1e-6)
    assert torch.allclose(g1, g2, atol=1e-7)


@pytest.mark.parametrize(
    "option",
    [{"kd_temperature": 2.0}, {"kd_divergence": "js"}, {"kd_selection": "batch"}],
)
def test_one_gather_path_is_used_only_where_it_is_exact(option):
    from fakes import FakeTask, make_dictionary

    from fairseq_kd.criterions.word_kd import WordKDCriterion

    d = make_dictionary(20)
    teacher = {"lprobs": torch.zeros(1, 1, 2), "indices": torch.zeros(1, 1, 2)}
    assert WordKDCriterion(FakeTask(d), False, 0.1, kd_alpha=0.5)._shares_gather(
        teacher
    )
    crit = WordKDCriterion(FakeTask(d), False, 0.1, kd_alpha=0.5, **option)
    assert not crit._shares_gather(teacher)
    assert not crit._shares_gather({"lprobs": teacher["lprobs"]})  # live, full vocab


def _touch_store(path):
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, "header.json"), "w").close()
    return path


@pytest.mark.parametrize("layout", ["split folders", "data folders at the root"])
def test_each_epoch_reads_the_store_of_its_data_folder(data_bin, tmp_path, layout):
    root = str(tmp_path / "topk")
    train_dir = os.path.join(root, "train") if layout == "split folders" else root
    for i in range(2):
        _touch_store(os.path.join(train_dir, f"data-{i:03d}"))
    _touch_store(os.path.join(root, "valid"))
    task, _ = make_task(f"{data_bin}:{data_bin}", "--teacher-topk", root)
    paths = [task.topk_store_path("train", epoch) for epoch in (1, 2, 3)]
    assert paths == [
        os.path.join(train_dir, "data-000"),
        os.path.join(train_dir, "data-001"),
        os.path.join(train_dir, "data-000"),
    ]
    # other splits come from the first data folder, as fairseq reads them
    assert task.topk_store_path("valid", 2) == os.path.join(root, "valid")
    if layout == "split folders":
        # one data folder: today's layouts are unchanged
        task, _ = make_task(data_bin, "--teacher-topk", os.path.join(root, "valid"))
        assert task.topk_store_path("train") == os.path.join(root, "valid")
        assert task.topk_store_path("valid") is None
    # three data folders but two stores, or one store for two folders: refused
    task, _ = make_task(f"{data_bin}:{data_bin}:{data_bin}", "--teacher-topk", root)
    with pytest.raises(TopKStoreError, match="expected data-000, data-001, data-002"):
        task.topk_store_path("train", 1)
    task, _ = make_task(
        f"{data_bin}:{data_bin}", "--teacher-topk", os.path.join(root, "valid")
    )
    with pytest.raises(TopKStoreError, match="one store per data folder"):
        task.topk_store_path("train", 1)


@pytest.fixture(scope="module")
def two_data_folders(corpus_text, data_bin, tmp_path_factory):
    """The training corpus split in two folders binarized with one dictionary."""
    from corpus import binarize

    base = tmp_path_factory.mktemp("two_folders")
    folders = []
    for part in range(2):
        text = base / f"text{part}"
        text.mkdir()
        for split in ("train", "valid", "test"):
            for side in ("src", "tgt"):
                with open(os.path.join(corpus_text, f"{split}.{side}")) as f:
                    lines = f.readlines()
                if split == "train":
                    half = len(lines) // 2
                    lines = lines[:half] if part == 0 else lines[half:]
                (text / f"{split}.{side}").write_text("".join(lines))
        dicts = ["--srcdict", os.path.join(data_bin, "dict.src.txt")]
        dicts += ["--tgtdict", os.path.join(data_bin, "dict.tgt.txt")]
        folders.append(binarize(str(text), str(base / f"bin{part}"), dicts))
    return folders


def test_sharded_data_trains_two_epochs_from_one_store_per_folder(
    two_data_folders, teacher, tmp_path
):
    data = ":".join(two_data_folders)
    root = str(tmp_path / "topk")
    stats = dump(data, teacher, os.path.join(root, "train"))
    assert [s["output"] for s in stats["stores"]] == [
        os.path.join(root, "train", "data-000"),
        os.path.join(root, "train", "data-001"),
    ]
    folders = [s["header"]["data_folder"] for s in stats["stores"]]
    assert folders == [os.path.abspath(f) for f in two_data_folders]
    dump(data, teacher, os.path.join(root, "valid"), "--gen-subset", "valid")
    assert TopKStore(os.path.join(root, "valid")).header["split"] == "valid"
    flags = ["--user-dir", USER_DIR, "--task", "translation_kd"]
    flags += ["--teacher-topk", root, *kd_flags(1.0, 0, alpha=0.5)]
    flags += ["--max-epoch", "2", "--no-save"]
    proc = train(data, str(tmp_path / "s"), flags, arch=STUDENT_ARCH, updates=1000)
    records = json_logs(proc.stdout, "train_inner")
    epochs = {int(r["epoch"]) for r in records}
    assert epochs == {1, 2}
    assert all(float(r["kd_loss"]) > 0 for r in records)
    assert len(json_logs(proc.stdout, "valid")) == 2


@pytest.fixture(scope="module")
def mixed_roots(data_bin, teacher, teacher_early, topk_root, tmp_path_factory):
    """Folders whose train store is the top-8's, valid at k 4 or of another teacher."""
    base = tmp_path_factory.mktemp("mixed")
    roots = {}
    for name, path, k in (("k4", teacher, 4), ("other", teacher_early, 8)):
        root = base / name
        root.mkdir()
        os.symlink(os.path.join(topk_root, "train"), root / "train")
        dump(
            data_bin, path, str(root / "valid"), "--gen-subset", "valid", "--k", str(k)
        )
        roots[name] = str(root)
    return roots


def test_a_valid_store_with_fewer_entries_fails_at_start_up(
    data_bin, mixed_roots, tmp_path
):
    root = mixed_roots["k4"]
    task, cfg = make_task(data_bin, "--teacher-topk", root, *kd_flags(1.0, 8))
    assert task.teacher_support == 4  # the smallest k of all the stores
    valid = os.path.join(root, "valid")
    message = (
        "--kd-topk 8 is larger than the 4 entries per position of the top-k "
        f"store {valid} (split 'valid')"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        task.build_criterion(cfg.criterion)
    task, cfg = make_task(data_bin, "--teacher-topk", root, *kd_flags(1.0, 4))
    task.build_criterion(cfg.criterion)  # k 4 is served by every store
    flags = ["--user-dir", USER_DIR, "--task", "translation_kd"]
    flags += ["--teacher-topk", root, *kd_flags(1.0, 8, alpha=0.5), "--no-save"]
    cmd = ["fairseq-train", data_bin, "--save-dir", str(tmp_path / "s")]
    cmd += ["--max-update", "5", *STUDENT_ARCH, *TRAIN_FLAGS, *flags]
    proc = run(cmd, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not json_logs(proc.stdout, "train_inner")  # before any update


def test_a_valid_store_of_another_teacher_is_refused_at_start_up(data_bin, mixed_roots):
    root = mixed_roots["other"]
    task, cfg = make_task(data_bin, "--teacher-topk", root, *kd_flags(1.0, 0))
    message = (
        r"different teachers: .*train \(split 'train'\) has teacher\(s\) .*"
        r"valid \(split 'valid'\)"
    )
    with pytest.raises(TopKStoreMismatch, match=message):
        task.build_criterion(cfg.criterion)
    task, _ = make_task(data_bin, "--teacher-topk", root)
    with pytest.raises(TopKStoreMismatch, match="different teachers"):
        task.load_dataset("train", combine=True)
    task, _ = make_task(data_bin, "--teacher-topk", root, "--disable-validation")
    task.load_dataset("train", combine=True)  # the valid store is not read then


def test_a_store_records_its_teachers_in_the_checkpoint(data_bin, teacher, topk_root):
    from fairseq_kd.topk_store import file_sha256

    task, _ = make_task(data_bin, "--teacher-topk", topk_root)
    saved = task.get_checkpoint_dict()["TranslationKDTask"]
    assert [t["sha256"] for t in saved["teachers"]] == [file_sha256(teacher)]
    task.set_checkpoint_dict(saved)  # the same teacher resumes
    other = {"teachers": [{"path": "/old/teacher.pt", "sha256": "ab" * 32}]}
    with pytest.raises(ValueError, match=r"/old/teacher.pt \(sha256 abababababab\)"):
        task.set_checkpoint_dict(other)
    task, _ = make_task(data_bin, "--teacher-topk", topk_root, "--teacher-allow-change")
    task.set_checkpoint_dict(other)
