"""The top-k store: format, dump fidelity, resume, shards and refused stores."""

import filecmp
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from corpus import run
from fairseq.data import LanguagePairDataset
from topk_util import (
    SentenceReference,
    assert_entries_match,
    dump,
    dump_argv,
    make_task,
)

from fairseq_kd.dump_topk import ABORT_ENV
from fairseq_kd.topk_store import (
    PROGRESS,
    TopKStore,
    TopKStoreError,
    TopKStoreMismatch,
    index_dtype,
    merge_shards,
)

STORE_FILES = ("header.json", "indices.bin", "lprobs.bin", "offsets.bin")


@pytest.fixture(scope="module")
def valid_task(data_bin):
    task, _ = make_task(data_bin)
    task.load_dataset("valid")
    return task


def same_store(a, b):
    """Whether two store folders hold byte-identical files."""
    match, mismatch, errors = filecmp.cmpfiles(a, b, STORE_FILES, shallow=False)
    return not mismatch and not errors


def test_format_and_size(topk_root, valid_task):
    store = TopKStore(os.path.join(topk_root, "valid"), verify_checksums=True)
    dataset = valid_task.dataset("valid")
    h = store.header
    assert h["split"] == "valid" and h["k"] == store.k == 8
    assert h["num_sentences"] == len(store) == len(dataset)
    assert h["num_tokens"] == int(dataset.tgt_sizes.sum())
    assert h["target_dictionary"]["size"] == len(valid_task.target_dictionary)
    assert len(h["teachers"]) == 1 and len(h["teachers"][0]["sha256"]) == 64
    assert np.array_equal(store.lengths(), dataset.tgt_sizes)  # EOS included
    assert h["arrays"]["indices"]["dtype"] == "uint16"
    assert h["arrays"]["lprobs"]["dtype"] == "float16"
    arrays = sum(spec["bytes"] for name, spec in h["arrays"].items())
    per_token = (arrays - h["arrays"]["offsets"]["bytes"]) / store.num_tokens
    assert per_token == 4 * store.k  # + 8 bytes per sentence for the offsets
    assert 0.0 < h["avg_topk_mass"] <= 1.0
    store.verify_against(
        dataset, valid_task.source_dictionary, valid_task.target_dictionary, "valid"
    )
    assert index_dtype(65535) == np.uint16 and index_dtype(65536) == np.int32


def test_entries_are_the_teachers_per_sentence_top_k(topk_root, teacher, valid_task):
    store = TopKStore(os.path.join(topk_root, "valid"))
    dataset = valid_task.dataset("valid")
    reference = SentenceReference(teacher, valid_task, dataset)
    for i in range(len(dataset)):
        lprobs, indices = store.entry(i)
        assert_entries_match(
            torch.from_numpy(lprobs), torch.from_numpy(indices), reference(i)
        )
    # the final position (EOS target) is stored: the trained teacher expects EOS
    # there, unlike at the first position
    eos = valid_task.target_dictionary.eos()
    top1 = [store.entry(i)[1][:, 0] for i in range(len(dataset))]
    assert np.mean([t[-1] == eos for t in top1]) > 0.6
    assert np.mean([t[0] == eos for t in top1]) < 0.1


def test_ensemble_path_agrees_with_the_single_teacher_path(
    topk_root, data_bin, teacher, tmp_path
):
    # an "ensemble" of one teacher twice takes the generic (full-softmax) path
    out = str(tmp_path / "twice")
    dump(
        data_bin,
        teacher,
        out,
        "--gen-subset",
        "valid",
        "--path",
        f"{teacher}:{teacher}",
    )
    single, twice = TopKStore(os.path.join(topk_root, "valid")), TopKStore(out)
    assert len(twice.header["teachers"]) == 2
    for i in range(len(single)):
        (lp1, ix1), (lp2, ix2) = single.entry(i), twice.entry(i)
        assert np.allclose(lp1.astype(np.float32), lp2.astype(np.float32), atol=1e-2)
        assert (ix1 == ix2).mean() > 0.95  # equal up to ties


def test_store_pickles_without_its_memory_maps(topk_root):
    store = TopKStore(os.path.join(topk_root, "train"))
    first = store.entry(7)
    blob = pickle.dumps(store)
    assert len(blob) < 20000  # the header, not the arrays
    clone = pickle.loads(blob)
    assert clone._maps is None
    for a, b in zip(first, clone.entry(7)):
        assert np.array_equal(a, b)


def test_resume_after_a_killed_dump_is_byte_identical(data_bin, teacher, tmp_path):
    flags = ("--gen-subset", "valid", "--batch-size", "8", "--commit-interval", "2")
    whole = str(tmp_path / "whole")
    dump(data_bin, teacher, whole, *flags)
    killed = str(tmp_path / "killed")
    proc = run(
        dump_argv(data_bin, teacher, killed, *flags), env={ABORT_ENV: "5"}, check=False
    )
    assert proc.returncode == 3
    assert not os.path.exists(os.path.join(killed, "header.json"))
    with open(os.path.join(killed, PROGRESS)) as f:
        assert json.load(f)["batches_done"] == 4  # batch 5 was not committed
    with pytest.raises(TopKStoreError, match="unfinished dump"):
        TopKStore(killed)
    with pytest.raises(TopKStoreError, match="other settings"):
        dump(
            data_bin, teacher, killed, *flags[:-2], "--commit-interval", "2", "--k", "4"
        )
    stats = dump(data_bin, teacher, killed, *flags)
    assert 0 < stats["sentences"] < TopKStore(whole).num_sentences  # resumed
    assert same_store(whole, killed)
    assert not os.path.exists(os.path.join(killed, PROGRESS))
    with pytest.raises(TopKStoreError, match="already holds a finished"):
        dump(data_bin, teacher, killed, *flags)


def test_merged_shards_equal_one_unsharded_dump(data_bin, teacher, tmp_path):
    flags = ("--gen-subset", "valid", "--batch-size", "8")
    whole = str(tmp_path / "whole")
    dump(data_bin, teacher, whole, *flags)
    sharded = str(tmp_path / "sharded")
    for shard in (0, 2):
        dump(
            data_bin,
            teacher,
            sharded,
            *flags,
            "--num-shards",
            "3",
            "--shard-id",
            str(shard),
        )
    with pytest.raises(TopKStoreError, match=r"missing shard ids \[1\]"):
        merge_shards(sharded)
    with pytest.raises(TopKStoreError, match="fairseq-kd-merge-topk"):
        TopKStore(sharded)
    dump(data_bin, teacher, sharded, *flags, "--num-shards", "3", "--shard-id", "1")
    shard = TopKStore(os.path.join(sharded, "shard-001-of-003"))
    assert 0 < len(shard.ids) < shard.header["num_sentences"]
    run(["fairseq-kd-merge-topk", sharded, "--output", str(tmp_path / "merged")])
    assert same_store(whole, str(tmp_path / "merged"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _other_dictionary(task):
    d = task.target_dictionary
    other = type(d)()
    for s in d.symbols[other.nspecial :]:
        other.add_symbol(s)
    other.add_symbol("extra")
    return other


def _edited_dataset(task, sentence, drop_token):
    """The valid split with one target sentence changed, as another binarization."""
    ds = task.dataset("valid")
    tgt = [ds.tgt[i] for i in range(len(ds))]
    if drop_token:
        tgt[sentence] = tgt[sentence][1:]
    else:
        tgt[sentence] = tgt[sentence].flip(0)
    sizes = np.array([len(t) for t in tgt])
    return LanguagePairDataset(
        ds.src, ds.src_sizes, ds.src_dict, tgt, sizes, ds.tgt_dict
    )


@pytest.mark.parametrize(
    "case,message",
    [
        ("other split", r"split: store has 'valid', data has 'test'"),
        ("other dictionary", r"target_dictionary: store has \d+ symbols"),
        ("other lengths", r"the first is sentence 5: \d+ target tokens in the store"),
        ("other tokens", "tokens_sample_sha256"),
    ],
)
def test_store_of_other_data_is_refused(topk_root, valid_task, case, message):
    store = TopKStore(os.path.join(topk_root, "valid"))
    t = valid_task
    dataset, src_dict, tgt_dict, split = (
        t.dataset("valid"),
        t.source_dictionary,
        t.target_dictionary,
        "valid",
    )
    if case == "other split":
        t.load_dataset("test")
        dataset, split = t.dataset("test"), "test"
    elif case == "other dictionary":
        tgt_dict = _other_dictionary(t)
    elif case == "other lengths":
        dataset = _edited_dataset(t, 5, drop_token=True)
    else:
        dataset = _edited_dataset(t, 5, drop_token=False)
    with pytest.raises(TopKStoreMismatch, match=message):
        store.verify_against(dataset, src_dict, tgt_dict, split)


def test_damaged_stores_are_refused(topk_root, tmp_path):
    good = os.path.join(topk_root, "valid")
    truncated = _copy(good, str(tmp_path / "truncated"))
    with open(os.path.join(truncated, "lprobs.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(TopKStoreError, match="lprobs.bin has 100 bytes.*truncated"):
        TopKStore(truncated)
    flipped = _copy(good, str(tmp_path / "flipped"))
    with open(os.path.join(flipped, "indices.bin"), "r+b") as f:
        f.seek(123)
        byte = f.read(1)
        f.seek(123)
        f.write(bytes([byte[0] ^ 0xFF]))
    TopKStore(flipped)  # sizes are right: only the checksum tells
    with pytest.raises(TopKStoreError, match="indices.bin has sha256 .* corrupt"):
        TopKStore(flipped, verify_checksums=True)
    bad_header = _copy(good, str(tmp_path / "bad_header"))
    with open(os.path.join(bad_header, "header.json"), "a") as f:
        f.write("}")
    with pytest.raises(TopKStoreError, match="not valid JSON"):
        TopKStore(bad_header)
    with pytest.raises(TopKStoreError, match="does not exist"):
        TopKStore(str(tmp_path / "nowhere"))


def test_task_refuses_a_store_of_another_split(data_bin, topk_root):
    # a single store given as --teacher-topk serves the training split
    task, _ = make_task(data_bin, "--teacher-topk", os.path.join(topk_root, "valid"))
    with pytest.raises(TopKStoreMismatch, match="split: store has 'valid'"):
        task.load_dataset("train", combine=True)


@pytest.fixture(scope="module")
def reversed_bin(corpus_text, data_bin, tmp_path_factory):
    """The corpus binarized with the teacher's symbols in another order."""
    from topk_util import reversed_dictionary_data

    dest = str(tmp_path_factory.mktemp("reversed_bin"))
    return reversed_dictionary_data(corpus_text, data_bin, dest)


def test_dump_refuses_a_teacher_with_other_symbols(
    data_bin, reversed_bin, teacher, topk_root, tmp_path
):
    from fairseq.data import Dictionary

    ours = Dictionary.load(os.path.join(data_bin, "dict.tgt.txt"))
    theirs = Dictionary.load(os.path.join(reversed_bin, "dict.tgt.txt"))
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    message = f"index {i}: '{ours[i]}' in the teacher's .*'{theirs[i]}' in this task's"
    with pytest.raises(ValueError, match=message):
        dump(reversed_bin, teacher, str(tmp_path / "out"), "--gen-subset", "valid")
    assert not os.path.exists(tmp_path / "out")
    # the explicit option names the teacher's dictionaries
    with pytest.raises(ValueError, match=message.replace("teacher's", "teacher's .*")):
        dump(
            reversed_bin, teacher, str(tmp_path / "out"), "--gen-subset", "valid",
            "--teacher-dict-dir", data_bin,
        )  # fmt: skip
    # a store against data with other symbols names the first difference too
    task, _ = make_task(reversed_bin)
    task.load_dataset("valid")
    store = TopKStore(os.path.join(topk_root, "valid"))
    with pytest.raises(TopKStoreMismatch, match=rf"target_dictionary: .*index {i}: "):
        store.verify_against(
            task.dataset("valid"), task.source_dictionary, task.target_dictionary,
            "valid",
        )  # fmt: skip
    store.header["data_folder"] = "/nonexistent"
    with pytest.raises(TopKStoreMismatch, match="only the sha256 of its symbols"):
        store.verify_against(
            task.dataset("valid"), task.source_dictionary, task.target_dictionary,
            "valid",
        )  # fmt: skip


def test_dump_refuses_sentences_longer_than_the_teachers_positions(data_bin, tmp_path):
    from topk_util import train_short_teacher

    short = train_short_teacher(data_bin, str(tmp_path / "short"))
    out = str(tmp_path / "out")
    with pytest.raises(
        ValueError,
        match=r"sentences of split 'valid' are longer "
        r"than the teacher's maximum positions \(8, 8\)",
    ):
        dump(data_bin, short, out, "--gen-subset", "valid")
    assert not os.path.exists(out)
