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


# ------------------------------------------------- the CTranslate2 engine


@pytest.mark.slow
def test_ctranslate2_engine_translates_each_direction_as_fairseq(
    multi_bin, seq_teacher, tmp_path
):
    pytest.importorskip("ctranslate2")
    from fairseq_kd.seqkd import ct2_engine

    common = ["--gen-subset", "valid", "--nbest", 2, *NO_FILTER, "--chunk-size", 5]
    ref = run_distill(multi_bin, seq_teacher, tmp_path / "fs", *common)
    out = tmp_path / "ct2"
    summary = run_distill(
        multi_bin, seq_teacher, out, *common, "--engine", "ctranslate2"
    )
    assert summary["lang_pairs"] == ref["lang_pairs"] == list(PAIRS)
    model = out / "work" / "ct2-model"  # one conversion for every direction
    assert (model / "model.bin").is_file()
    key = json.loads((model / ct2_engine.KEY_FILE).read_text())
    assert key["langtok"]["langs"] == ["cs", "de", "en"]
    n_same = n_lines = 0
    for pair in PAIRS:
        src, tgt = pair.split("-")
        assert summary["directions"][pair]["engines"] == ["ctranslate2"]
        assert summary["directions"][pair]["direction"] == (
            ref["directions"][pair]["direction"]
        )
        fs = read_lines(tmp_path / "fs" / pair / f"valid.{tgt}")
        ct2 = read_lines(out / pair / f"valid.{tgt}")
        assert read_lines(out / pair / f"valid.{src}") == read_lines(
            tmp_path / "fs" / pair / f"valid.{src}"
        )
        assert len(ct2) == len(fs)
        same = sum(a == b for a, b in zip(ct2, fs))
        # two implementations of beam search: allow rare near-tie differences
        # (as for the bilingual engines, test_distill.py)
        assert same >= 0.9 * len(fs), (pair, ct2, fs)
        n_same, n_lines = n_same + same, n_lines + len(fs)
        # the target tag is forced and stripped: in no hypothesis of the
        # n-best (the part files), in no line of the corpus
        for name in sorted(os.listdir(out / "work" / pair / "parts")):
            with open(out / "work" / pair / "parts" / name) as f:
                records = [json.loads(line) for line in f][1:]
            for rec in records:
                assert len(rec["nbest"]) == 2
                assert not any("__" in h for h in rec["nbest"])
        assert not any("__" in line for line in ct2)
        assert decode_bin(out / "bin", "valid", pair, tgt) == ct2
    assert n_same >= 0.9 * n_lines
    # resumed with a chunk to translate again: the cached conversion serves
    mtime = os.path.getmtime(model / "model.bin")
    os.remove(out / "work" / "en-de" / "parts" / "chunk-000001.jsonl")
    before = read_lines(out / "en-de" / "valid.de")
    again = run_distill(multi_bin, seq_teacher, out, *common, "--engine", "ctranslate2")
    assert again["directions"]["en-de"]["this_process"]["sentences"] == 5
    assert os.path.getmtime(model / "model.bin") == mtime
    assert read_lines(out / "en-de" / "valid.de") == before


@pytest.mark.slow
def test_ctranslate2_engine_checks_the_teacher(multi_bin, seq_teacher, tmp_path):
    pytest.importorskip("ctranslate2")
    # the run's tags are not the teacher's: refused as the fairseq engine does
    argv = [multi_bin, "--path", seq_teacher, "--output", str(tmp_path / "o")]
    argv += ["--cpu", "--no-progress-bar", "--engine", "ctranslate2"]
    argv += ["--task", "translation_multi_simple_epoch", "--gen-subset", "valid"]
    argv += task_flags(style="mbart")
    with pytest.raises(DistillError, match=r"--lang-tok-style: the teacher's"):
        distill.main(distill.parse_args(argv))


@pytest.mark.parametrize(
    "teachers,extra,message",
    [
        (1, ["--min-len", 2], r"--engine ctranslate2 supports --beam, --nbest, "
         r"--lenpen and --max-len-a/b only; use --engine fairseq for --min-len"),
        (1, ["--prefix-size", 1], r"use --engine fairseq for --prefix-size"),
        (2, [], r"--engine ctranslate2 translates with one teacher: --path names "
         r"2; use --engine fairseq for an ensemble"),
    ],
)  # fmt: skip
def test_ctranslate2_engine_refusals(multi_bin, tmp_path, teachers, extra, message):
    pytest.importorskip("ctranslate2")
    teacher = tmp_path / "teacher.pt"  # refused before it is read
    teacher.write_bytes(b"")
    path = ":".join([str(teacher)] * teachers)
    with pytest.raises(DistillError, match=message):
        run_distill(multi_bin, path, tmp_path / "o", "--engine", "ctranslate2",
                    "--gen-subset", "valid", *extra)  # fmt: skip


def test_converted_teacher_cache_is_keyed(multi_bin, tmp_path):
    """The cached CTranslate2 teacher serves only the teacher and settings it
    was converted from: another teacher file, other tags or dictionaries
    convert again."""
    pytest.importorskip("ctranslate2")
    from fairseq.data import Dictionary

    from fairseq_kd import ct2_multilingual
    from fairseq_kd.seqkd import ct2_engine

    d = Dictionary.load(os.path.join(multi_bin, "dict.en.txt"))
    settings = {"lang_tok_style": "multilingual", "encoder_langtok": "src",
                "decoder_langtok": True, "langs": ["cs", "de", "en"],
                "lang_pairs": list(PAIRS)}  # fmt: skip
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"teacher a")
    b.write_bytes(b"teacher b")
    calls = []

    def convert(output_dir):
        calls.append(output_dir)
        os.makedirs(output_dir)
        with open(os.path.join(output_dir, "model.bin"), "w") as f:
            f.write(str(len(calls)))
        ct2_multilingual.write_settings(output_dir, settings)

    def get(path, langtok, dictionary=d):
        key = ct2_engine.conversion_key(str(path), dictionary, dictionary, langtok)
        out = ct2_engine.convert_teacher(
            str(path), multi_bin, None, None, str(tmp_path / "w"), key, convert
        )
        with open(os.path.join(out, "model.bin")) as f:
            return int(f.read())

    assert get(a, settings) == 1
    assert get(a, settings) == 1  # cached
    copy = tmp_path / "copy.pt"  # the same teacher elsewhere: the same key
    copy.write_bytes(a.read_bytes())
    assert get(copy, settings) == 1
    assert get(b, settings) == 2  # another teacher
    assert get(b, dict(settings, lang_tok_style="mbart")) == 3  # other tags
    assert get(b, dict(settings, encoder_langtok="tgt")) == 4
    assert get(b, None) == 5  # a bilingual conversion
    other = Dictionary.load(os.path.join(multi_bin, "dict.en.txt"))
    other.add_symbol("__xx__")
    assert get(b, None, other) == 6  # other dictionaries
    assert get(b, None, other) == 6
    b.write_bytes(b"teacher b, trained further")  # rewritten in place
    assert get(b, None, other) == 7
    assert sorted(os.listdir(tmp_path / "w")) == [ct2_engine.MODEL_DIR]
