"""fairseq-kd-distill over the multilingual task: directions, tags, layout, refusals."""

import json
import math
import os
import re

import corpus
import pytest
from conftest import USER_DIR
from multi_corpus import PAIRS, task_flags

from fairseq_kd import distill
from fairseq_kd.seqkd import filters
from fairseq_kd.seqkd.filters import FilterConfig
from fairseq_kd.seqkd.parts import DistillError

MULTI = ["--task", "translation_multi_simple_epoch", *task_flags()]
#: every filter off but ``empty`` (which always replaces by the reference)
NO_FILTER = ["--repeat-ngram", "0", "--min-len-ratio", "0", "--max-len-ratio", "99"]


@pytest.fixture(scope="module")
def seq_teacher(multi_bin, tmp_path_factory):
    """A multilingual teacher trained long enough to translate (100 updates)."""
    save = str(tmp_path_factory.mktemp("multi_seq_teacher"))
    flags = MULTI + ["--criterion", "label_smoothed_cross_entropy"]
    corpus.train(multi_bin, save, flags + ["--label-smoothing", "0.1"], updates=100)
    return os.path.join(save, "checkpoint_last.pt")


def run_distill(data, teacher, out, *extra):
    argv = [data, "--path", teacher, "--output", str(out), "--cpu"]
    argv += ["--no-progress-bar", "--beam", "5", *MULTI, *map(str, extra)]
    return distill.main(distill.parse_args(argv))


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def stock_generate(data, teacher, pair, split):
    """Stock ``fairseq-generate --task translation_multi_simple_epoch`` of one
    direction (beam 5): its hypotheses by sentence id."""
    src, tgt = pair.split("-")
    proc = corpus.run(
        ["fairseq-generate", data, "--path", teacher, *MULTI, "-s", src, "-t", tgt]
        + ["--gen-subset", split, "--beam", "5", "--cpu", "--max-tokens", "4000"]
        # ve-fairseq drops the last partial batch with the default multiple of 8
        + ["--required-batch-size-multiple", "1", "--user-dir", USER_DIR]
    )
    hyps = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"H-(\d+)\t\S+\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    return [hyps[i] for i in range(len(hyps))]


def decode_bin(folder, split, pair, lang):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(folder, f"dict.{lang}.txt"))
    ds = data_utils.load_indexed_dataset(
        os.path.join(folder, f"{split}.{pair}.{lang}"), d, "mmap"
    )
    return [d.string(ds[i]) for i in range(len(ds))]


@pytest.mark.slow
def test_each_direction_is_the_stock_multilingual_translation(
    multi_bin, multi_text, seq_teacher, tmp_path
):
    out = tmp_path / "out"
    summary = run_distill(
        multi_bin, seq_teacher, out, "--gen-subset", "valid", *NO_FILTER,
        "--max-tokens", 30, "--chunk-size", 5,
    )  # fmt: skip
    assert summary["lang_pairs"] == list(PAIRS)
    assert sorted(summary["directions"]) == sorted(PAIRS)
    n_hyps = 0
    for pair in PAIRS:
        src, tgt = pair.split("-")
        source = read_lines(os.path.join(multi_text, f"valid.{pair}.{src}"))
        reference = read_lines(os.path.join(multi_text, f"valid.{pair}.{tgt}"))
        stock = stock_generate(multi_bin, seq_teacher, pair, "valid")
        assert len(stock) == len(source)
        dist_src = read_lines(out / pair / f"valid.{src}")
        dist_tgt = read_lines(out / pair / f"valid.{tgt}")
        assert dist_src == source  # corpus order, no source tag written
        expected = []
        for i, hyp in enumerate(stock):
            bad = filters.degenerate_reason(
                hyp.split(), source[i].split(), FilterConfig()
            )
            expected.append(reference[i] if bad == filters.EMPTY else hyp)
            n_hyps += bad != filters.EMPTY
        assert dist_tgt == expected
        assert dist_tgt != reference  # the teacher's words, not the references
        assert not any("__" in line for line in dist_tgt)  # no language tag
        # binarized for translation_multi_simple_epoch, with DATA's dictionaries
        assert decode_bin(out / "bin", "valid", pair, src) == dist_src
        assert decode_bin(out / "bin", "valid", pair, tgt) == dist_tgt
        direction = summary["directions"][pair]
        assert direction["direction"] == {
            "lang_pair": pair,
            "source_langtok": f"__{src}__",
            "target_langtok": f"__{tgt}__",
        }
        assert direction["sentences"] == direction["output_pairs"] == len(source)
        saved = json.loads((out / pair / "valid.summary.json").read_text())
        assert saved == direction
        config = json.loads((out / "work" / pair / "config.json").read_text())
        assert config["direction"] == direction["direction"]
    assert n_hyps > len(PAIRS) * 6  # mostly non-empty hypotheses: a real check
    assert summary["sentences"] == sum(
        s["sentences"] for s in summary["directions"].values()
    )
    for name in ("dict.cs.txt", "dict.de.txt", "dict.en.txt", "train.cs-en.cs.bin"):
        assert (out / "bin" / name).exists()


@pytest.mark.slow
def test_a_subset_of_directions_trains_with_the_multilingual_kd_task(
    multi_bin, seq_teacher, tmp_path
):
    out = tmp_path / "out"
    summary = run_distill(
        multi_bin, seq_teacher, out, "--distill-lang-pairs", "de-en,en-de"
    )
    assert summary["lang_pairs"] == ["de-en", "en-de"]
    assert sorted(os.listdir(out)) == [
        "bin", "de-en", "en-de", "train.summary.json", "work"
    ]  # fmt: skip
    bins = sorted(n for n in os.listdir(out / "bin") if n.startswith("train."))
    assert bins == [
        f"train.{pair}.{lang}.{ext}"
        for pair in ("de-en", "en-de")
        for lang in sorted(pair.split("-"))
        for ext in ("bin", "idx")
    ]
    assert decode_bin(out / "bin", "train", "de-en", "en") == read_lines(
        out / "de-en" / "train.en"
    )
    flags = ["--lang-pairs", "de-en,en-de", "--langs", "cs,de,en"]
    flags += ["--encoder-langtok", "src", "--decoder-langtok"]
    proc = corpus.run(
        ["fairseq-train", str(out / "bin"), "--save-dir", str(tmp_path / "s")]
        + ["--user-dir", USER_DIR, "--task", "translation_multi_simple_epoch_kd"]
        + flags
        + ["--teacher-path", seq_teacher, "--criterion", "word_kd"]
        + ["--kd-alpha", "0.5", "--max-update", "3", "--no-save"]
        + corpus.STUDENT_ARCH
        + corpus.TRAIN_FLAGS
    )
    train = corpus.json_logs(proc.stdout, "train_inner")
    assert len(train) == 3
    assert all(math.isfinite(float(r["kd_loss"])) for r in train)
    valid = corpus.json_logs(proc.stdout, "valid")
    assert valid and "valid_kd_loss_en-de" in valid[0]
    assert "valid_kd_loss_cs-en" not in valid[0]


def test_resume_per_chunk_and_direction_refusals(multi_bin, tmp_path, monkeypatch):
    fake = ["--engine", "fake", "--gen-subset", "valid", "--chunk-size", 5]
    whole = tmp_path / "whole"
    run_distill(multi_bin, "fake", whole, *fake)
    # killed after the first chunk of de-en, then resumed: the same corpora
    out = tmp_path / "resumed"
    monkeypatch.setenv(distill.ABORT_ENV, "1")
    with pytest.raises(SystemExit) as stop:
        run_distill(multi_bin, "fake", out, *fake)
    assert stop.value.code == 3
    assert os.listdir(out / "work" / "de-en" / "parts") == ["chunk-000000.jsonl"]
    assert not (out / "work" / "cs-en").exists() and not (out / "bin").exists()
    monkeypatch.delenv(distill.ABORT_ENV)
    run_distill(multi_bin, "fake", out, *fake)
    for pair in PAIRS:
        for lang in pair.split("-") + ["ids"]:
            name = f"valid.{lang}"
            assert read_lines(out / pair / name) == read_lines(whole / pair / name)
    # a work folder of another direction is refused, naming both
    work = tmp_path / "work"
    os.makedirs(work)
    os.symlink(whole / "work" / "cs-en", work / "de-en")
    message = (
        r"work folder \S+de-en was written for cs-en \(source tag __cs__, target "
        r"tag __en__\), but this run distils de-en \(source tag __de__, target tag "
        r"__en__\) of split 'valid'"
    )
    with pytest.raises(DistillError, match=message):
        run_distill(multi_bin, "fake", tmp_path / "o", *fake, "--work-dir", work,
                    "--distill-lang-pairs", "de-en")  # fmt: skip
    # so is a bilingual run's work folder
    os.remove(work / "de-en")
    os.makedirs(work / "de-en")
    (work / "de-en" / "config.json").write_text(json.dumps({"beam": 5}))
    with pytest.raises(DistillError, match=r"was written for a bilingual run"):
        run_distill(multi_bin, "fake", tmp_path / "o", *fake, "--work-dir", work,
                    "--distill-lang-pairs", "de-en")  # fmt: skip


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--distill-lang-pairs", "de-cs"], r"--distill-lang-pairs: de-cs not among"),
        (["--engine", "ctranslate2"], r"--engine ctranslate2 translates bilingual"),
        (["--source-text", "x.txt"], r"--source-text is not supported with --task"),
    ],
)
def test_multilingual_options_are_checked(multi_bin, tmp_path, extra, message):
    with pytest.raises(DistillError, match=message):
        run_distill(multi_bin, "fake", tmp_path / "o", "--engine", "fake", *extra)


def test_distill_lang_pairs_needs_the_multilingual_task(tmp_path):
    args = distill.parse_args(
        [str(tmp_path), "--path", "x", "--output", str(tmp_path), "--engine", "fake"]
        + ["--distill-lang-pairs", "de-en"]
    )
    with pytest.raises(DistillError, match="--distill-lang-pairs needs --task"):
        distill.main(args)
