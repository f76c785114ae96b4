"""Streaming seq-KD, fake engine: order, shards, kill -9, source-only, score, memory."""

import json
import math
import os
import sys
import tracemalloc
import zlib

import corpus
import numpy as np
import pytest

from fairseq_kd import distill
from fairseq_kd.seqkd import backward, engines, merge, parts
from fairseq_kd.seqkd.distiller import ABORT_ENV

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import bench_distill  # noqa: E402


def fake(data, out, *extra):
    args = distill.parse_args(
        [str(data), "--output", str(out), "--engine", "fake", "--no-progress-bar"]
        + [str(x) for x in extra]
    )
    return distill.distill(args)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def output_bytes(out, split="valid"):
    """Every file a run leaves outside its work folder, by relative path."""
    found = {}
    for root, _, files in os.walk(out):
        if os.path.relpath(root, out).split(os.sep)[0] == "work":
            continue
        for name in files:
            if name.endswith(".summary.json"):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, out)] = f.read()
    return found


def fake_translation(src_line, k=0):
    return " ".join(src_line.split()[::-1][k:])


def test_token_string_equals_dictionary_string(data_bin):
    from fairseq.data import Dictionary

    d = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(d), size=rng.integers(0, 20))
        ids = np.append(ids, d.eos())
        import torch

        t = torch.from_numpy(ids)
        assert engines.token_string(d, t) == d.string(t)


def test_line_i_and_binarized_corpus(data_bin, corpus_text, tmp_path):
    from fairseq.data import Dictionary, data_utils

    out = tmp_path / "o"
    summary = fake(data_bin, out, "--gen-subset", "valid", "--chunk-size", 7,
                   "--on-degenerate", "drop", "--repeat-ngram", 0)  # fmt: skip
    src = read_lines(os.path.join(corpus_text, "valid.src"))
    assert read_lines(out / "valid.src") == src
    assert read_lines(out / "valid.tgt") == [fake_translation(x) for x in src]
    assert summary["output_pairs"] == len(src)
    d = Dictionary.load(os.path.join(data_bin, "dict.tgt.txt"))
    ds = data_utils.load_indexed_dataset(str(out / "bin" / "valid.src-tgt.tgt"), d)
    assert [d.string(ds[i]) for i in range(len(ds))] == read_lines(out / "valid.tgt")


def test_shards_merge_byte_identical_to_one_run(data_bin, tmp_path):
    common = ["--gen-subset", "valid", "--chunk-size", 9, "--nbest", 2, "--beam", 2]
    fake(data_bin, tmp_path / "one", *common, "--concat-original")
    out = tmp_path / "sharded"
    for shard in (2, 0):
        assert fake(data_bin, out, *common, "--num-shards", 3, "--shard-id", shard,
                    "--concat-original") is None  # fmt: skip
    summary = fake(data_bin, out, *common, "--num-shards", 3, "--shard-id", 1,
                   "--concat-original")  # fmt: skip
    assert summary["sentences"] == 80
    one, sharded = output_bytes(tmp_path / "one"), output_bytes(out)
    assert "bin/valid.src-tgt.tgt.bin" in one and "concat/valid.tgt" in one
    assert sharded == one


def test_kill_9_and_resume_byte_identical(data_bin, tmp_path):
    common = ["--gen-subset", "valid", "--chunk-size", 10]
    fake(data_bin, tmp_path / "whole", *common)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fairseq_kd.distill", data_bin, "--output", str(out)]
    cmd += ["--engine", "fake", "--no-progress-bar"] + [str(x) for x in common]
    proc = corpus.run(cmd, env={ABORT_ENV: "3:kill"}, check=False)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert len(os.listdir(out / "work" / "parts")) == 3
    assert not (out / "valid.tgt").exists()
    proc = corpus.run(cmd)
    assert "resuming: 3 of this shard's 8 chunks (30 sentences)" in (
        proc.stdout + proc.stderr
    )
    assert output_bytes(out) == output_bytes(tmp_path / "whole")


def test_merge_refuses_parts_of_another_input(data_bin, tmp_path):
    out = tmp_path / "o"
    fake(data_bin, out, "--gen-subset", "valid", "--chunk-size", 40)
    path = parts.part_path(str(out / "work"), 1)
    lines = read_lines(path)
    rec = __import__("json").loads(lines[5])
    rec["src_crc"] += 1
    lines[5] = __import__("json").dumps(rec)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(parts.DistillError, match=f"sentence {rec['id']} of the part"):
        fake(data_bin, out, "--gen-subset", "valid", "--chunk-size", 40, "--merge")


@pytest.mark.parametrize("scheme", ["none", "spm", "bpe", "bin"])
def test_source_only_input(scheme, data_bin, corpus_text, tmp_path):
    """Line i of the distilled corpus is the translation of input line i."""
    src = read_lines(os.path.join(corpus_text, "valid.src"))
    extra = []
    if scheme == "bin":  # fairseq-preprocess --only-source with DATA's dictionary
        mono = tmp_path / "mono"
        corpus.run(
            ["fairseq-preprocess", "--only-source", "--source-lang", "src"]
            + [
                "--trainpref",
                os.path.join(corpus_text, "valid"),
                "--destdir",
                str(mono),
            ]
            + ["--srcdict", os.path.join(data_bin, "dict.src.txt"), "--workers", "1"]
        )
        extra = ["--source-bin", mono, "-s", "src", "-t", "tgt"]
        expected_src = src
    else:
        raw = tmp_path / "raw.txt"
        raw.write_text("".join(x + "\n" for x in src))
        extra = ["--source-text", raw]
        expected_src = src
        if scheme == "spm":
            import sentencepiece

            sentencepiece.SentencePieceTrainer.train(
                input=str(raw), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                model_type="word", minloglevel=2,
            )  # fmt: skip
            sp = sentencepiece.SentencePieceProcessor(
                model_file=str(tmp_path / "sp.model")
            )
            expected_src = [" ".join(sp.encode(x, out_type=str)) for x in src]
            extra += ["--spm-model", tmp_path / "sp.model"]
        elif scheme == "bpe":
            from subword_nmt.apply_bpe import BPE
            from subword_nmt.learn_bpe import learn_bpe

            with open(raw) as f, open(tmp_path / "codes", "w") as g:
                learn_bpe(f, g, 20)
            with open(tmp_path / "codes") as f:
                bpe = BPE(f)
            expected_src = [bpe.process_line(x).strip() for x in src]
            extra += ["--bpe-codes", tmp_path / "codes"]
    out = tmp_path / "out"
    summary = fake(data_bin, out, *extra, "--chunk-size", 30, "--repeat-ngram", 0)
    assert read_lines(out / "train.src") == expected_src
    from fairseq.data import Dictionary

    d = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    # the fake engine reverses the source ids: pieces outside DATA's
    # dictionary come back as <unk>
    in_dict = [d.string(d.encode_line(x, add_if_not_exist=False)) for x in expected_src]
    assert read_lines(out / "train.tgt") == [fake_translation(x) for x in in_dict]
    assert read_lines(out / "train.ids") == [str(i) for i in range(len(src))]
    assert summary["output_pairs"] == len(src)
    # resumable: a second run finds every chunk and writes the same corpus
    before = output_bytes(out)
    again = fake(data_bin, out, *extra, "--chunk-size", 30, "--repeat-ngram", 0)
    assert again["this_process"]["sentences"] == 0 and output_bytes(out) == before
    assert (out / "bin" / "train.src-tgt.tgt.idx").exists()
    assert (out / "bin" / "valid.src-tgt.tgt.idx").exists()  # DATA's other splits


def fake_score(ids):
    """The fake engine's score of its best hypothesis, computed independently."""
    return round(
        -0.1 - (zlib.crc32(np.asarray(ids, np.int32).tobytes()) % 1000) / 1000, 4
    )


@pytest.mark.parametrize("how", ["threshold", "fraction", 0.2, 0.5, 0.8])
def test_score_filter_keeps_what_an_independent_computation_keeps(
    how, data_bin, tmp_path
):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    ds = data_utils.load_indexed_dataset(os.path.join(data_bin, "valid.src-tgt.src"), d)
    scores = [fake_score(ds[i].numpy()) for i in range(len(ds))]
    if how == "threshold":
        t = -0.5
        flags = ["--min-score", t]
    else:  # the sentence at the threshold is kept (scores are not cut to float32)
        f = 0.3 if how == "fraction" else how
        flags = ["--score-keep-fraction", f]
        t = sorted(scores, reverse=True)[math.ceil(f * len(scores)) - 1]
    keep = [i for i, s in enumerate(scores) if s >= t]
    assert 0 < len(keep) < len(scores)
    out = tmp_path / str(how)
    summary = fake(data_bin, out, "--gen-subset", "valid", "--chunk-size", 13,
                   "--on-degenerate", "drop", "--repeat-ngram", 0,
                   "--max-len-ratio", 99, *flags)  # fmt: skip
    assert read_lines(out / "valid.ids") == [str(i) for i in keep]
    assert summary["filtered"][merge.SCORE] == len(scores) - len(keep)
    assert summary["score_filter"]["threshold"] == pytest.approx(t, abs=1e-6)


def test_score_keep_fraction_keeps_the_selection_statistics(data_bin, tmp_path):
    common = ["--gen-subset", "valid", "--nbest", 2, "--beam", 2, "--select", "bleu",
              "--work-dir", tmp_path / "w"]  # fmt: skip
    alone = fake(data_bin, tmp_path / "a", *common)
    kept = fake(data_bin, tmp_path / "b", *common, "--score-keep-fraction", 1)
    assert alone["mean_sentence_bleu_chosen"] is not None
    for key in ("mean_sentence_bleu_chosen", "mean_sentence_bleu_top", "not_top"):
        assert kept[key] == alone[key], key


def merge_peak(data, out, n_chunks):
    """tracemalloc peak (bytes) of merging an existing fake run."""
    args = distill.parse_args(
        [str(data), "--output", str(out), "--engine", "fake", "--no-progress-bar"]
        + ["--gen-subset", "train", "--chunk-size", "100", "--merge", "--nbest", "5"]
        + ["--beam", "5"]
    )
    tracemalloc.start()
    summary = distill.distill(args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary["sentences"] == 100 * n_chunks
    return peak


def test_merge_memory_does_not_grow_with_the_record_count(tmp_path):
    peaks = {}
    for n in (1000, 4000):
        data = bench_distill.make_corpus(str(tmp_path / f"d{n}"), n, mean_len=10)
        out = tmp_path / f"o{n}"
        fake(data, out, "--gen-subset", "train", "--chunk-size", 100, "--nbest", 5,
             "--beam", 5)  # fmt: skip
        peaks[n] = merge_peak(data, out, n // 100)
    assert peaks[4000] <= 1.2 * peaks[1000], peaks


# ------------------------------------------------------- backward-model filter


def backward_scores_alone(model_path, data_bin, hyps, srcs):
    """Each pair's backward score, computed alone by a hand-written forced decoding.

    The model reads the hypothesis and is teacher-forced on the source: the
    mean over the source tokens and ``</s>`` of their log-probabilities.
    """
    import torch
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    from fairseq_kd.checkpoints import trusted_checkpoint_loading

    with trusted_checkpoint_loading():
        (model,), _ = checkpoint_utils.load_model_ensemble(
            [model_path], arg_overrides={"data": data_bin}
        )
    model.eval()
    d_src = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    d_tgt = Dictionary.load(os.path.join(data_bin, "dict.tgt.txt"))
    out = []
    with torch.no_grad():
        for hyp, src in zip(hyps, srcs):
            h = d_tgt.encode_line(hyp, add_if_not_exist=False).long()[None]
            s = d_src.encode_line(src, add_if_not_exist=False).long()
            prev = torch.cat([s.new_tensor([d_src.eos()]), s[:-1]])[None]
            logits = model(h, torch.tensor([h.size(1)]), prev)[0]
            lprobs = torch.log_softmax(logits.float(), dim=-1)[0]  # T x V
            out.append(lprobs.gather(1, s[:, None]).mean().item())
    return out


def gap_threshold(scores, near):
    """A threshold between two consecutive distinct scores, about ``near`` of
    them kept, with room for rounding on both sides; and the number kept."""
    ordered = sorted(scores, reverse=True)
    for m in sorted(range(1, len(ordered)), key=lambda m: abs(m - near)):
        if ordered[m - 1] - ordered[m] > 1e-3:
            return (ordered[m - 1] + ordered[m]) / 2, m
    raise AssertionError("no gap in the scores")


@pytest.mark.parametrize("how", ["threshold", "fraction", "with-forward"])
def test_backward_filter_keeps_what_an_independent_computation_keeps(
    how, data_bin, corpus_text, teacher, tmp_path
):
    # the tiny corpus has one joined dictionary, so the src->tgt teacher also
    # passes as a tgt->src model: its scores are low, but they differ
    assert read_lines(os.path.join(data_bin, "dict.src.txt")) == read_lines(
        os.path.join(data_bin, "dict.tgt.txt")
    )
    src = read_lines(os.path.join(corpus_text, "valid.src"))
    hyps = [fake_translation(x) for x in src]
    bwd = backward_scores_alone(teacher, data_bin, hyps, src)
    n = len(src)
    threshold, m = gap_threshold(bwd, n // 2)
    fwd_ok = [True] * n
    if how == "fraction":
        flags = ["--backward-keep-fraction", (m - 0.5) / n]
    else:
        flags = ["--min-backward-score", threshold]
    if how == "with-forward":
        from fairseq.data import Dictionary, data_utils

        d = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
        ds = data_utils.load_indexed_dataset(
            os.path.join(data_bin, "valid.src-tgt.src"), d
        )
        fwd_ok = [fake_score(ds[i].numpy()) >= -0.6 for i in range(n)]
        flags += ["--min-score", -0.6]
    bwd_ok = [b >= threshold for b in bwd]
    keep = [i for i in range(n) if fwd_ok[i] and bwd_ok[i]]
    assert 0 < len(keep) < sum(fwd_ok)
    out = tmp_path / how
    common = ["--gen-subset", "valid", "--chunk-size", 13, "--on-degenerate", "drop",
              "--repeat-ngram", 0, "--max-len-ratio", 99, "--backward-path",
              teacher, "--max-tokens", 50]  # fmt: skip
    summary = fake(data_bin, out, *common, *flags)
    assert read_lines(out / "valid.ids") == [str(i) for i in keep]
    assert summary["filtered"][merge.SCORE] == n - sum(fwd_ok)
    assert summary["filtered"][merge.BACKWARD_SCORE] == sum(fwd_ok) - len(keep)
    # the stored scores are the independent ones (batched with padding here)
    work = out / "work"
    (side,) = [p for p in os.listdir(work) if p.startswith("backward-")]
    rows = [
        row
        for k, ids in enumerate(parts.chunk_ranges(n, 13))
        for row in backward.read_scores(str(work / side), k, ids)
    ]
    assert [r[3] for r in rows] == pytest.approx(bwd, abs=2e-4)
    if how == "fraction":
        assert summary["backward_filter"]["threshold"] == pytest.approx(
            sorted(bwd, reverse=True)[m - 1], abs=2e-4
        )
    # resumable: the scores are not recomputed, one deleted chunk is
    stamps = {f: os.stat(work / side / f).st_mtime_ns for f in os.listdir(work / side)}
    os.remove(work / side / "chunk-000002.jsonl")
    before = output_bytes(out)
    fake(data_bin, out, *common, *flags, "--merge")
    after = {f: os.stat(work / side / f).st_mtime_ns for f in os.listdir(work / side)}
    changed = sorted(f for f in after if after[f] != stamps.get(f))
    assert changed == ["chunk-000002.jsonl"] and output_bytes(out) == before


def test_backward_scores_must_belong_to_the_chosen_hypothesis(
    data_bin, teacher, tmp_path
):
    out = tmp_path / "o"
    common = ["--gen-subset", "valid", "--chunk-size", 40, "--backward-path", teacher,
              "--min-backward-score", -5]  # fmt: skip
    fake(data_bin, out, *common)
    (side,) = [p for p in os.listdir(out / "work") if p.startswith("backward-")]
    path = out / "work" / side / "chunk-000001.jsonl"
    lines = read_lines(path)
    row = json.loads(lines[3])
    row[2] += 1  # another hypothesis's score
    lines[3] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(parts.DistillError, match=f"sentence {row[0]} is not that"):
        fake(data_bin, out, *common, "--merge")


def test_backward_model_dictionaries_are_checked_reversed(data_bin, teacher, tmp_path):
    """A src->tgt model with dictionaries A->B is refused on data A->B, and
    accepted on data B->A."""
    import torch
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    a = read_lines(os.path.join(data_bin, "dict.src.txt"))
    b = a[:]
    b[10], b[11] = b[11], b[10]  # the same size, two symbols swapped
    folders = {}
    for name, (s, t) in {"model": (a, b), "fwd": (a, b), "rev": (b, a)}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "dict.src.txt").write_text("\n".join(s) + "\n")
        (folders[name] / "dict.tgt.txt").write_text("\n".join(t) + "\n")
    state = torch.load(teacher, map_location="cpu", weights_only=False)
    state["cfg"]["task"].update(
        data=str(folders["model"]), source_lang="src", target_lang="tgt"
    )
    state["cfg"]["model"].share_all_embeddings = False  # two dictionaries now
    ckpt = str(tmp_path / "ab.pt")
    torch.save(state, ckpt)

    def task(folder):
        cfg = TranslationConfig(data=str(folder), source_lang="src", target_lang="tgt")
        return TranslationTask.setup_task(cfg)

    with pytest.raises(parts.DistillError, match="--backward-path: .* tgt->src"):
        backward.BackwardScorer(ckpt, task(folders["fwd"]), 1000, None, cpu=True)
    scorer = backward.BackwardScorer(ckpt, task(folders["rev"]), 1000, None, cpu=True)
    assert scorer.score([("s1 s2", "t1")])[0] < 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--min-backward-score", -1], "need --backward-path"),
        (["--backward-path", "x.pt"], "give --min-backward-score or"),
        (["--backward-path", "x.pt", "--min-backward-score", -1,
          "--backward-keep-fraction", 0.5], "not both"),  # fmt: skip
        (["--backward-path", "x.pt", "--backward-keep-fraction", 0], r"\(0, 1\]"),
        (["--backward-path", "x.pt", "--min-backward-score", -1],
         "checkpoint not found: x.pt"),  # fmt: skip
    ],
)
def test_backward_options_are_checked(flags, message, data_bin, tmp_path):
    with pytest.raises(parts.DistillError, match=message):
        fake(data_bin, tmp_path / "o", "--gen-subset", "valid", *flags)
