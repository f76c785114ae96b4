"""Tests of ``fairseq-kd-distill``: order, selection, resumption, filters, training."""

import json
import math
import os

import corpus
import pytest
import sacrebleu
from conftest import USER_DIR

from fairseq_kd import distill
from fairseq_kd.seqkd import filters, nbest_choice, parts
from fairseq_kd.seqkd.filters import EMPTY, LENGTH_RATIO, REPEAT, FilterConfig
from fairseq_kd.seqkd.merge import Selector
from fairseq_kd.seqkd.parts import DistillError

# ---------------------------------------------------------------- unit tests

REPEATS = [
    # tokens, n, longest run of one n-gram
    ("a b c d", 1, 1),
    ("a a b", 1, 2),
    ("a b a a a a", 1, 4),
    ("x a b a b a b y", 2, 3),
    ("a b c a b c", 3, 2),
    ("a b", 3, 0),
    ("", 1, 0),
]


@pytest.mark.parametrize("tokens,n,expected", REPEATS)
def test_longest_repeat(tokens, n, expected):
    assert filters.longest_repeat(tokens.split(), n) == expected


def test_has_loop_agrees_with_longest_repeat():
    import random

    rng = random.Random(0)
    for _ in range(3000):
        tokens = [
            rng.choice("ab" if rng.random() < 0.5 else "abc")
            for _ in range(rng.randrange(12))
        ]
        n, count = rng.randrange(1, 5), rng.randrange(1, 5)
        expected = any(
            filters.longest_repeat(tokens, m) >= count for m in range(1, n + 1)
        )
        assert filters.has_loop(tokens, n, count) == expected, (tokens, n, count)


CFG = FilterConfig(
    min_len_ratio=0.5, max_len_ratio=2.0, ratio_min_tokens=4, repeat_ngram=3
)
DEGENERATE = [
    # hypothesis, source, first filter that fires
    ("", "s1 s2 s3", EMPTY),
    ("t1 t1 t1 t2", "s1 s2 s3 s4", REPEAT),
    ("t1 t2 t3 t2 t3 t2 t3", "s1 s2 s3 s4 s5 s6", REPEAT),
    # a 4-gram loop is longer than repeat_ngram=3: only the ratio catches it
    ("t1 t2 t3 t4 t1 t2 t3 t4 t1 t2 t3 t4", "s1 s2 s3 s4", LENGTH_RATIO),
    ("t1 t2 t3 t4 t5 t6 t7 t8 t9", "s1 s2 s3 s4", LENGTH_RATIO),
    ("t1", "s1 s2 s3 s4 s5", LENGTH_RATIO),
    ("t1 t2 t3", "s1", None),  # ratio 3 but both sides shorter than 4 tokens
    ("t1 t2 t1 t2 t3 t4", "s1 s2 s3 s4 s5", None),  # two copies are allowed
    ("t1 t2 t3 t4", "s1 s2 s3 s4 s5", None),
]


@pytest.mark.parametrize("hyp,src,expected", DEGENERATE)
def test_degenerate_reason(hyp, src, expected):
    assert filters.degenerate_reason(hyp.split(), src.split(), CFG) == expected


@pytest.mark.parametrize(
    "line,scheme,expected",
    [
        ("\u2581Ein \u2581Hund \u2581läuft .", "sentencepiece", "Ein Hund läuft."),
        ("\u2581A \u2581dog s \u2581run", "sentencepiece", "A dogs run"),
        ("ein Hun@@ d läu@@ ft", "subword_nmt", "ein Hund läuft"),
        ("a@@ b", "subword_nmt", "ab"),
        ("t1 t2", "none", "t1 t2"),
    ],
)
def test_detokenize(line, scheme, expected):
    assert nbest_choice.detokenize(line, scheme) == expected


def test_detokenize_names_the_option():
    with pytest.raises(ValueError, match="--post-process"):
        nbest_choice.detokenize("a", "bpe")


def test_select_bleu_and_chrf_pick_the_argmax():
    ref = "\u2581a \u2581small \u2581dog \u2581runs \u2581on \u2581the \u2581grass"
    nbest = [
        "\u2581a \u2581dog",
        "\u2581the \u2581small \u2581dog \u2581runs \u2581on \u2581grass",
        "\u2581a \u2581small \u2581dog \u2581runs \u2581on \u2581the \u2581grass",
        "\u2581a \u2581small \u2581dog \u2581runs \u2581on \u2581the \u2581grass",
    ]
    detok = [nbest_choice.detokenize(h, "sentencepiece") for h in nbest]
    ref_d = nbest_choice.detokenize(ref, "sentencepiece")
    bleu = [sacrebleu.sentence_bleu(h, [ref_d]).score for h in detok]
    chrf = [sacrebleu.sentence_chrf(h, [ref_d]).score for h in detok]
    assert nbest_choice.choose_index(nbest, ref, "top", "sentencepiece") == 0
    # ties (candidates 2 and 3) go to the teacher's better-ranked one
    assert nbest_choice.choose_index(nbest, ref, "bleu", "sentencepiece") == bleu.index(
        max(bleu)
    )
    assert nbest_choice.choose_index(nbest, ref, "chrf", "sentencepiece") == chrf.index(
        max(chrf)
    )
    assert nbest_choice.choose_index(nbest, ref, "bleu", "sentencepiece") == 2


@pytest.mark.parametrize("n,size,shards", [(10, 3, 1), (10, 3, 2), (7, 10, 3)])
def test_chunks_and_shards_partition_the_corpus(n, size, shards):
    ranges = parts.chunk_ranges(n, size)
    assert [i for r in ranges for i in r] == list(range(n))
    owned = [parts.shard_chunks(len(ranges), shards, s) for s in range(shards)]
    assert sorted(k for o in owned for k in o) == list(range(len(ranges)))


def test_shard_id_is_checked():
    with pytest.raises(ValueError, match="--shard-id"):
        parts.shard_chunks(4, 2, 2)


def test_part_files_are_verified(tmp_path):
    work = str(tmp_path)
    parts.check_config(work, {"beam": 5})
    recs = [{"id": i} for i in (3, 2, 4)]
    parts.write_part(work, 1, range(2, 5), recs, {"seconds": 1})
    _, back = parts.read_part(work, 1, range(2, 5))
    assert [r["id"] for r in back] == [2, 3, 4]
    with pytest.raises(DistillError, match="duplicated \\[3\\]"):
        parts.write_part(work, 1, range(2, 5), [{"id": i} for i in (2, 3, 3)], {})
    with pytest.raises(DistillError, match="missing \\[4\\]"):
        parts.write_part(work, 1, range(2, 5), [{"id": i} for i in (2, 3)], {})
    with pytest.raises(DistillError, match="does not describe chunk"):
        parts.read_part(work, 1, range(2, 6))
    with pytest.raises(DistillError, match="beam: recorded 5, now 4"):
        parts.check_config(work, {"beam": 4})
    assert not [f for f in os.listdir(os.path.join(work, "parts")) if "tmp" in f]


def _args(**kw):
    base = dict(
        select="top",
        post_process="none",
        on_degenerate="reference",
        min_len_ratio=0.5,
        max_len_ratio=2.0,
        ratio_min_tokens=4,
        repeat_ngram=3,
        repeat_count=3,
    )
    base.update(kw)
    return distill.parse_args(
        ["data", "--path", "x", "--output", "o"]
        + [
            f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
            for k, v in base.items()
        ]
    )


def _records():
    src = "s1 s2 s3 s4"
    hyps = [
        ("t1 t2 t3 t4", None),
        ("", EMPTY),
        ("t9 t9 t9 t9", REPEAT),
        ("t1 t2 t1 t2 t1 t2", REPEAT),
        ("t1 t2 t3 t4 t5 t6 t7 t8 t9", LENGTH_RATIO),
        ("t1", LENGTH_RATIO),
        ("t4 t3 t2 t1", None),
    ]
    records = [
        {"id": i, "src": src, "ref": f"r{i} r r r", "nbest": [h], "scores": [-1.0]}
        for i, (h, _) in enumerate(hyps)
    ]
    records.append({"id": len(hyps), "src": src, "ref": "r r", "nbest": []})
    records[-1]["skipped"] = distill.TOO_LONG
    return records, [reason for _, reason in hyps] + [distill.TOO_LONG]


def choose_all(records, args):
    """The streaming selector over ``records``: ``(pairs, summary)``."""
    sel = Selector(
        args.select,
        args.post_process,
        FilterConfig(**{k: getattr(args, k) for k in vars(FilterConfig())}),
        args.on_degenerate,
        args.nbest_stats,
        args.min_score,
    )
    pairs = []
    for rec in records:
        tgt = sel.target(rec)
        if tgt is not None:
            pairs.append((rec["id"], rec["src"], tgt))
    return pairs, sel.summary()


@pytest.mark.parametrize("policy", ["drop", "reference"])
def test_filter_counts_and_policies(policy):
    records, reasons = _records()
    pairs, out = choose_all(records, _args(on_degenerate=policy))
    expected = {name: reasons.count(name) for name in out["filtered"]}
    assert out["filtered"] == expected
    bad = [i for i, r in enumerate(reasons) if r is not None]
    good = [i for i, r in enumerate(reasons) if r is None]
    if policy == "drop":
        assert [p[0] for p in pairs] == good
        assert out["dropped"] == len(bad) and out["replaced"] == 0
    else:
        assert [p[0] for p in pairs] == list(range(len(records)))
        for i, _, tgt in pairs:
            assert tgt == (records[i]["ref"] if i in bad else records[i]["nbest"][0])
        assert out["replaced"] == len(bad) and out["dropped"] == 0


def test_top_computes_no_sentence_bleu_unless_asked():
    records, _ = _records()
    _, quiet = choose_all(records, _args())
    assert quiet["mean_sentence_bleu_chosen"] is None
    assert quiet["corpus_bleu_chosen"] is None
    _, stats = choose_all(records, _args(nbest_stats=True))
    # --select top: the chosen hypothesis is the teacher's best
    assert stats["mean_sentence_bleu_chosen"] == stats["mean_sentence_bleu_top"]
    assert stats["mean_sentence_bleu_chosen"] is not None


def test_streamed_corpus_bleu_equals_sacrebleu():
    records, _ = _records()
    _, out = choose_all(records, _args(nbest_stats=True))
    hyps = [r["nbest"][0] for r in records if r["nbest"]]
    refs = [r["ref"] for r in records if r["nbest"]]
    assert out["corpus_bleu_chosen"] == round(
        sacrebleu.corpus_bleu(hyps, [refs]).score, 2
    )


# ------------------------------------------------------- end-to-end helpers


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def translate_alone(data_bin, teacher, source_file, nbest):
    """Each source line translated alone (beam 5) with fairseq's hub interface.

    Returns:
        A list (corpus order) of n-best lists of subword strings.
    """
    from fairseq.models.transformer import TransformerModel

    from fairseq_kd.checkpoints import trusted_checkpoint_loading

    with trusted_checkpoint_loading():
        hub = TransformerModel.from_pretrained(
            os.path.dirname(teacher),
            checkpoint_file=os.path.basename(teacher),
            data_name_or_path=data_bin,
        )
    hub.eval()
    return [
        [
            hub.decode(h["tokens"])
            for h in hub.generate(hub.encode(line), beam=5)[:nbest]
        ]
        for line in read_lines(source_file)
    ]


def run_distill(data_bin, teacher, out, *extra):
    args = distill.parse_args(
        [data_bin, "--path", teacher, "--output", str(out), "--cpu"]
        + ["--no-progress-bar", "--beam", "5"]
        + [str(x) for x in extra]
    )
    return distill.main(args)


def decode_bin(folder, split, lang, dictionary_lang=None):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(folder, f"dict.{dictionary_lang or lang}.txt"))
    ds = data_utils.load_indexed_dataset(
        os.path.join(folder, f"{split}.src-tgt.{lang}"), d, "mmap"
    )
    return [d.string(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def single_sentence_valid(data_bin, teacher, corpus_text):
    """The teacher's beam-5 translation of each valid sentence, translated alone."""
    return translate_alone(data_bin, teacher, os.path.join(corpus_text, "valid.src"), 1)


# ------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    "batching",
    [
        ["--batch-size", "1"],
        ["--max-tokens", "60", "--chunk-size", "33"],
        ["--batch-size", "16", "--num-shards", "2", "--chunk-size", "25"],
    ],
    ids=["batch1", "max-tokens", "two-shards"],
)
def test_line_i_is_the_translation_of_source_i(
    batching, data_bin, teacher, corpus_text, single_sentence_valid, tmp_path
):
    out = tmp_path / "out"
    if "--num-shards" in batching:
        # shard 1 first: it cannot merge, shard 0 then finds every chunk done
        assert run_distill(data_bin, teacher, out, "--gen-subset", "valid",
                           *batching, "--shard-id", "1") is None  # fmt: skip
        summary = run_distill(
            data_bin, teacher, out, "--gen-subset", "valid", *batching, "--shard-id", 0
        )
    else:
        summary = run_distill(
            data_bin, teacher, out, "--gen-subset", "valid", *batching
        )
    source = read_lines(os.path.join(corpus_text, "valid.src"))
    reference = read_lines(os.path.join(corpus_text, "valid.tgt"))
    dist_src = read_lines(out / "valid.src")
    dist_tgt = read_lines(out / "valid.tgt")
    assert dist_src == source  # original corpus order, every line once
    assert read_lines(out / "valid.ids") == [str(i) for i in range(len(source))]
    assert summary["sentences"] == len(source)
    # expected: each sentence translated alone, or its reference when the
    # (default) filters reject that translation
    fcfg, expected, n_bad = FilterConfig(), [], 0
    for i, (hyp,) in enumerate(single_sentence_valid):
        bad = filters.degenerate_reason(hyp.split(), source[i].split(), fcfg)
        expected.append(reference[i] if bad else hyp)
        n_bad += bad is not None
    assert sum(summary["filtered"].values()) == summary["replaced"] == n_bad
    assert dist_tgt == expected
    assert dist_tgt != reference  # the teacher does not just copy the references
    # the binarized corpus holds the same lines, with the teacher's dictionaries
    assert decode_bin(out / "bin", "valid", "src") == dist_src
    assert decode_bin(out / "bin", "valid", "tgt") == dist_tgt
    for name in ("dict.src.txt", "train.src-tgt.src.bin", "test.src-tgt.tgt.idx"):
        assert (out / "bin" / name).exists()
    saved = json.loads((out / "valid.summary.json").read_text())
    assert saved["output_pairs"] == len(source) and saved["sentences_per_second"] > 0


@pytest.mark.slow
def test_select_bleu_is_the_sentence_bleu_argmax(
    data_bin, teacher, corpus_text, tmp_path
):
    nbest = translate_alone(
        data_bin, teacher, os.path.join(corpus_text, "valid.src"), 5
    )
    refs = read_lines_from_bin(data_bin, "valid")
    out = tmp_path / "bleu"
    no_filter = ["--repeat-ngram", "0", "--min-len-ratio", "0", "--max-len-ratio", 99]
    summary = run_distill(
        data_bin, teacher, out, "--gen-subset", "valid", "--nbest", 5,
        "--select", "bleu", "--nbest-stats", *no_filter,
    )  # fmt: skip
    chosen = read_lines(out / "valid.tgt")
    n_not_top = 0
    for i, cands in enumerate(nbest):
        scores = [sacrebleu.sentence_bleu(c, [refs[i]]).score for c in cands]
        assert chosen[i] in cands
        assert math.isclose(scores[cands.index(chosen[i])], max(scores))
        n_not_top += chosen[i] != cands[0]
    assert n_not_top > 0  # otherwise this test could not tell bleu from top
    assert summary["not_top"] == n_not_top
    assert summary["mean_sentence_bleu_chosen"] > summary["mean_sentence_bleu_top"]


def read_lines_from_bin(data_bin, split):
    return decode_bin(data_bin, split, "tgt")


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_identical_corpus(data_bin, teacher, tmp_path):
    whole = tmp_path / "whole"
    run_distill(data_bin, teacher, whole, "--gen-subset", "valid", "--chunk-size", 20)
    out = tmp_path / "killed"
    cmd = ["fairseq-kd-distill", data_bin, "--path", teacher, "--output", str(out)]
    cmd += ["--gen-subset", "valid", "--chunk-size", "20", "--cpu", "--beam", "5"]
    proc = corpus.run(cmd, env={distill.ABORT_ENV: "2"}, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    done = sorted(os.listdir(out / "work" / "parts"))
    assert done == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    assert not (out / "valid.tgt").exists() and not (out / "bin").exists()
    stamp = {f: os.stat(out / "work" / "parts" / f).st_mtime_ns for f in done}
    proc = corpus.run(cmd)
    assert "resuming: 2 of this shard's 4 chunks (40 sentences)" in (
        proc.stdout + proc.stderr
    )
    for f in done:  # finished chunks were not redone
        assert os.stat(out / "work" / "parts" / f).st_mtime_ns == stamp[f]
    for name in ("valid.src", "valid.tgt", "valid.ids"):
        assert read_lines(out / name) == read_lines(whole / name)
    # other generation settings refuse the existing parts
    bad = corpus.run(cmd[:-1] + ["4"], check=False)
    assert bad.returncode == 1 and "beam: recorded 5, now 4" in bad.stderr + bad.stdout
    # a damaged part file is caught at merge time
    part = out / "work" / "parts" / "chunk-000001.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:-1] + [lines[-2]]) + "\n")
    bad = corpus.run(cmd + ["--merge"], check=False)
    assert bad.returncode == 1 and "duplicated [38]" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_students_train_on_the_distilled_corpus(data_bin, teacher, tmp_path):
    out = tmp_path / "train"
    summary = run_distill(
        data_bin, teacher, out, "--max-tokens", 2000, "--concat-original"
    )
    n = summary["output_pairs"]
    assert len(read_lines(out / "concat" / "train.tgt")) == 2 * n
    assert decode_bin(out / "concat" / "bin", "train", "src")[n:] == read_lines(
        out / "train.src"
    )
    # seq-KD + word-KD from the live teacher, one epoch
    proc = corpus.train(
        str(out / "bin"),
        str(tmp_path / "seq_word_kd"),
        ["--user-dir", USER_DIR, "--task", "translation_kd", "--teacher-path"]
        + [teacher, "--criterion", "word_kd", "--kd-alpha", "0.5", "--max-epoch", "1"],
        arch=corpus.STUDENT_ARCH,
        updates=1000,
    )
    losses = [r["train_loss"] for r in corpus.json_logs(proc.stdout, "train")]
    assert losses and all(math.isfinite(float(x)) for x in losses)
    # seq-KD on original + distilled pairs with label-smoothed cross-entropy
    proc = corpus.train(
        str(out / "concat" / "bin"),
        str(tmp_path / "seq_kd"),
        ["--user-dir", USER_DIR, "--criterion", "label_smoothed_cross_entropy"]
        + ["--label-smoothing", "0.1", "--max-epoch", "1"],
        arch=corpus.STUDENT_ARCH,
        updates=1000,
    )
    assert corpus.json_logs(proc.stdout, "train")


@pytest.mark.slow
def test_ctranslate2_engine_writes_the_same_corpus(data_bin, teacher, tmp_path):
    pytest.importorskip("ctranslate2")
    ref = run_distill(data_bin, teacher, tmp_path / "fs", "--gen-subset", "valid")
    out = tmp_path / "ct2"
    summary = run_distill(
        data_bin, teacher, out, "--gen-subset", "valid", "--engine", "ctranslate2"
    )
    assert (out / "work" / "ct2-model" / "model.bin").exists()
    assert summary["engines"] == ["ctranslate2"] and ref["engines"] == ["fairseq"]
    assert read_lines(out / "valid.src") == read_lines(tmp_path / "fs" / "valid.src")
    ct2, fs = read_lines(out / "valid.tgt"), read_lines(tmp_path / "fs" / "valid.tgt")
    assert len(ct2) == len(fs)
    # two implementations of beam search: allow rare near-tie differences
    assert sum(a == b for a, b in zip(ct2, fs)) >= 0.9 * len(fs)
    assert decode_bin(out / "bin", "valid", "tgt") == ct2


@pytest.mark.slow
def test_runs_sharing_a_work_dir_share_their_translations(data_bin, teacher, tmp_path):
    # the recipe's seqkd:top and seqkd:bleu: one beam search, two selections
    shared = tmp_path / "nbest"
    common = ["--gen-subset", "valid", "--nbest", 5, "--work-dir", shared]
    top = run_distill(data_bin, teacher, tmp_path / "top", *common)
    bleu = run_distill(
        data_bin, teacher, tmp_path / "bleu", *common, "--select", "bleu"
    )
    assert top["this_process"]["sentences"] == top["sentences"] > 0
    assert bleu["this_process"]["sentences"] == 0  # nothing translated again
    run_distill(
        data_bin, teacher, tmp_path / "alone", "--gen-subset", "valid",
        "--nbest", 5, "--select", "bleu",
    )  # fmt: skip
    assert read_lines(tmp_path / "bleu" / "valid.tgt") == read_lines(
        tmp_path / "alone" / "valid.tgt"
    )
    assert bleu["not_top"] > 0  # the two selections differ
    with pytest.raises(DistillError, match="beam: recorded 5, now 3"):
        run_distill(
            data_bin, teacher, tmp_path / "b3", *common, "--beam", 3, "--nbest", 3
        )
