"""Scoring and timing: sacreBLEU/chrF, CTranslate2 int8, parameters, summaries."""

import os
import time

from kd_bench.commands import max_decoding_length, parse_generate_output, parse_speed
from kd_bench.files import read_json, read_lines, write_json, write_lines
from kd_bench.teacher import read_given

#: Beam sizes every model is evaluated with (1 is greedy search).
EVAL_BEAMS = (1, 5)


def score(hyps, refs):
    """Corpus BLEU and chrF (sacrebleu, detokenised) and their signatures."""
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    return {
        "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def count_parameters(checkpoint):
    """Number of model parameters stored in a fairseq checkpoint.

    Loaded weights-only (:func:`fairseq_kd.checkpoints.load_checkpoint`): the
    recipes count the parameters of checkpoints they wrote.
    """
    from fairseq_kd.checkpoints import load_checkpoint

    return state_parameters(load_checkpoint(checkpoint, trusted_fallback=False))


def state_parameters(state):
    """Number of model parameters in a loaded fairseq checkpoint."""
    return sum(
        t.numel()
        for k, t in state["model"].items()
        if hasattr(t, "numel") and not k.endswith("_float_tensor")
    )


def save_translation(out_dir, name, ref_file):
    """``on_output`` of a fairseq-generate step: hypotheses and speed to files.

    Args:
        out_dir: where ``NAME.txt`` (hypotheses) and ``NAME.json`` go.
        name: ``<split>.beam<B>``.
        ref_file: the references (to check that every sentence came back).
    """

    def save(output, seconds):
        hyps = parse_generate_output(output)
        n_expected = len(read_lines(ref_file))
        if len(hyps) != n_expected:
            raise RuntimeError(
                f"{name}: {len(hyps)} translations for {n_expected} sentences"
            )
        speed = parse_speed(output)
        speed["wall_seconds"] = round(seconds, 2)
        write_lines(os.path.join(out_dir, name + ".txt"), hyps)
        write_json(os.path.join(out_dir, name + ".json"), speed)

    return save


def length_batches(sources, batch_size):
    """Batches of sentence ids, sorted by source length (as fairseq batches).

    Args:
        sources: token lists.
        batch_size: sentences per batch.
    """
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def ct2_translate(
    model_dir, source_file, out_dir, beams, batch_size, symbol, a, b, direction=None
):
    """Translate subword source lines with CTranslate2 and time each beam size.

    The output length is bounded per batch as fairseq-generate bounds it
    (:func:`~kd_bench.commands.max_decoding_length`): batches of
    ``batch_size`` sentences of similar length.

    Args:
        model_dir: a converted CTranslate2 model.
        source_file: subword-encoded source lines.
        out_dir: where ``test.beamB.txt``/``.json`` go.
        beams: beam sizes.
        batch_size: sentences per batch (as for fairseq-generate).
        symbol: fairseq post-processing symbol (``sentencepiece``...).
        a: ``--max-len-a``.
        b: ``--max-len-b``.
        direction: ``(src, tgt)`` of a multilingual model (converted by
            :func:`fairseq_kd.ct2_multilingual.convert`): each source gets its
            language tag and each translation starts with the target's, as
            fairseq-generate gives them (:class:`fairseq_kd.ct2_multilingual.
            Translator`, which bounds the length the same way, the tag
            counted); None for a bilingual model.
    """
    import torch
    from fairseq.data.data_utils import post_process

    threads = torch.get_num_threads()
    lines = read_lines(source_file)
    translate = (
        _bilingual_translator(model_dir, lines, batch_size, a, b, threads)
        if direction is None
        else _multilingual_translator(
            model_dir, lines, direction, batch_size, a, b, threads
        )
    )
    for beam in beams:
        start = time.time()
        hyps = translate(beam)
        seconds = time.time() - start
        hyps = [post_process(h, symbol) for h in hyps]
        write_lines(os.path.join(out_dir, f"test.beam{beam}.txt"), hyps)
        write_json(
            os.path.join(out_dir, f"test.beam{beam}.json"),
            {
                "sentences": len(lines),
                "seconds": round(seconds, 3),
                "sentences_per_second": round(len(lines) / seconds, 2),
                "threads": threads,
            },
        )
        print(
            f"    CTranslate2 int8 beam {beam}: {len(lines)} sentences in "
            f"{seconds:.1f}s",
            flush=True,
        )


def _bilingual_translator(model_dir, lines, batch_size, a, b, threads):
    """``translate(beam)`` -> subword hypotheses of a bilingual CTranslate2 model."""
    import ctranslate2

    translator = ctranslate2.Translator(
        model_dir, device="cpu", compute_type="int8", intra_threads=threads
    )
    sources = [line.split() for line in lines]
    batches = length_batches(sources, batch_size)

    def translate(beam):
        hyps = [None] * len(sources)
        for ids in batches:
            batch = [sources[i] for i in ids]
            results = translator.translate_batch(
                batch,
                beam_size=beam,
                max_batch_size=batch_size,
                max_decoding_length=max_decoding_length(map(len, batch), a, b),
            )
            for i, r in zip(ids, results):
                hyps[i] = " ".join(r.hypotheses[0])
        return hyps

    return translate


def _multilingual_translator(model_dir, lines, direction, batch_size, a, b, threads):
    """``translate(beam)`` -> subword hypotheses of one direction of a
    multilingual CTranslate2 model (its language tags added, the target's
    left out of the output)."""
    from fairseq_kd import ct2_multilingual

    translator = ct2_multilingual.Translator(
        model_dir, device="cpu", compute_type="int8", intra_threads=threads
    )
    src, tgt = direction

    def translate(beam):
        return translator.translate(
            lines,
            src,
            tgt,
            beam_size=beam,
            batch_size=batch_size,
            max_len_a=a,
            max_len_b=b,
        )

    return translate


def compare_engines(runs, split, tgt, out_path):
    """Speed and agreement of ``fairseq-kd-distill`` engines on one corpus.

    Args:
        runs: ``{engine: the --output folder of a run with that engine}``; the
            first is the reference the others are compared with.
        split: the distilled split.
        tgt: target language (``OUTPUT/<split>.<tgt>`` is compared line by line).
        out_path: the JSON file to write.

    Returns:
        ``{"sentences", "reference": the first engine, "engines": {engine:
        {"sentences_per_second", "generation_seconds"}}, "speedup": {engine:
        ratio to the reference}, "identical_lines": {engine: lines equal to
        the reference's}}``.

    Raises:
        RuntimeError: the runs distilled different numbers of sentences.
    """
    engines, lines = {}, {}
    for engine, folder in runs.items():
        summary = read_json(os.path.join(folder, f"{split}.summary.json"))
        engines[engine] = {
            "sentences_per_second": summary["sentences_per_second"],
            "generation_seconds": summary["generation_seconds"],
        }
        lines[engine] = read_lines(os.path.join(folder, f"{split}.{tgt}"))
    first = next(iter(runs))
    counts = {e: len(x) for e, x in lines.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the engines distilled different line counts: {counts}")
    out = {
        "sentences": counts[first],
        "reference": first,
        "engines": engines,
        "speedup": {
            e: round(
                v["sentences_per_second"] / engines[first]["sentences_per_second"], 2
            )
            for e, v in engines.items()
        },
        "identical_lines": {
            e: sum(a == b for a, b in zip(lines[first], x)) for e, x in lines.items()
        },
    }
    write_json(out_path, out)
    return out


#: What the results keep of a ``fairseq-kd-distill`` summary.
SEQKD_SUMMARY_KEYS = (
    "engines",
    "sentences",
    "output_pairs",
    "generation_seconds",
    "sentences_per_second",
    "filtered",
    "dropped",
    "replaced",
    "not_top",
    "mean_sentence_bleu_chosen",
    "mean_sentence_bleu_top",
    "corpus_bleu_chosen",
)


def seqkd_summaries(folders):
    """The distillation summaries of the seq-KD corpora that exist (and, for
    a multilingual corpus, each direction's).

    Args:
        folders: ``{selection: the corpus's folder}``.
    """
    out = {}
    for select, folder in folders.items():
        path = os.path.join(folder, "train.summary.json")
        if os.path.exists(path):
            summary = read_json(path)
            out[select] = keep = {k: summary.get(k) for k in SEQKD_SUMMARY_KEYS}
            if "directions" in summary:  # multilingual: the figures per direction
                keep["directions"] = {
                    pair: {k: d.get(k) for k in SEQKD_SUMMARY_KEYS}
                    for pair, d in summary["directions"].items()
                }
    return out


def stage_seconds(stamp_dir, exclude=("score", "table")):
    """Wall time of the run that made each stage's outputs, from its stamp.

    Args:
        stamp_dir: the runner's stamp folder.
        exclude: stages left out (the report's own, still running).

    Returns:
        ``[[stage, seconds], ...]`` in the order the stages finished (a list:
        the JSON files are written with sorted keys).
    """
    stamps = []
    if os.path.isdir(stamp_dir):
        for name in os.listdir(stamp_dir):
            if name.endswith(".json"):
                stamp = read_json(os.path.join(stamp_dir, name))
                if "seconds" in stamp and stamp.get("stage") not in exclude:
                    stamps.append((stamp.get("finished", ""), stamp["stage"], stamp))
    stamps.sort(key=lambda x: (x[0], x[1]))
    return [[stage, stamp["seconds"]] for _, stage, stamp in stamps]


def score_curve(translations, ref_file, out_path):
    """Valid BLEU/chrF at each intermediate checkpoint of one row.

    Args:
        translations: ``{updates: hypotheses file}``.
        ref_file: the valid references.
        out_path: the JSON file (``{"points": [{"updates", "bleu", "chrf"}]}``).
    """
    refs = read_lines(ref_file)
    points = []
    for updates in sorted(translations):
        s = score(read_lines(translations[updates]), refs)
        points.append({"updates": updates, "bleu": s["bleu"], "chrf": s["chrf"]})
    write_json(out_path, {"points": points})
    return points


def read_curves(paths, rows, pair=None):
    """``{row: curve}`` of the ``curve:ROW`` stages of ``rows`` (one direction's).

    Args:
        paths: the recipe's :class:`~kd_bench.plan.Paths`.
        rows: the run's curve rows.
        pair: the direction of the multilingual recipe (None: bilingual).
    """
    found = {
        row: os.path.join(paths.curve_dir(row, pair), "curve.json") for row in rows
    }
    return {row: read_json(f) for row, f in found.items() if os.path.exists(f)}


def model_scores(paths, name, eval_sets, refs, pair=None):
    """BLEU/chrF and speeds of one model's translations (of one direction).

    Args:
        paths: the recipe's :class:`~kd_bench.plan.Paths`.
        name: the model's name.
        eval_sets: fairseq split -> name shown in the table.
        refs: fairseq split -> reference lines.
        pair: the direction (``src-tgt``) of the multilingual recipe, None for
            the bilingual one.

    Returns:
        ``({"scores", "speed"[, "ct2_int8"]}, {"bleu", "chrf"}: signatures)``.
    """
    entry, signatures = {"scores": {}, "speed": {}}, {}
    tdir = paths.translations(name, pair)
    for split in eval_sets:
        entry["scores"][split], entry["speed"][split] = {}, {}
        for beam in EVAL_BEAMS:
            hyps = read_lines(os.path.join(tdir, f"{split}.beam{beam}.txt"))
            s = score(hyps, refs[split])
            signatures["bleu"] = s.pop("bleu_signature")
            signatures["chrf"] = s.pop("chrf_signature")
            entry["scores"][split][f"beam{beam}"] = s
            speed = read_json(os.path.join(tdir, f"{split}.beam{beam}.json"))
            entry["speed"][split][f"beam{beam}"] = speed["sentences_per_second"]
    cdir = paths.ct2(name, pair)
    if os.path.isdir(cdir):
        entry["ct2_int8"] = {}
        for beam in EVAL_BEAMS:
            hyps = read_lines(os.path.join(cdir, f"test.beam{beam}.txt"))
            speed = read_json(os.path.join(cdir, f"test.beam{beam}.json"))
            s = score(hyps, refs["test"])
            entry["ct2_int8"][f"beam{beam}"] = {
                "sentences_per_second": speed["sentences_per_second"],
                "bleu": s["bleu"],
            }
    return entry, signatures


def model_facts(ckpt):
    """Parameters, training time and updates of one model (and a given
    teacher's path and sha256)."""
    given = read_given(os.path.dirname(ckpt))  # a teacher not trained here
    params = given["params"] if given else count_parameters(ckpt)
    entry = {"params": params}
    if given:
        entry["given"] = {k: given[k] for k in ("checkpoint", "sha256")}
    timing = os.path.join(os.path.dirname(ckpt), "train_time.json")
    if os.path.exists(timing):
        entry.update({f"train_{k}": v for k, v in read_json(timing).items()})
    return entry


def compute_scores(
    paths,
    models,
    eval_sets,
    tgt,
    environment,
    out_path,
    lang_pairs=None,
    curve_rows=(),
):
    """Score every translation; gather parameters and training times.

    Args:
        paths: the recipe's :class:`~kd_bench.plan.Paths`.
        models: model name -> checkpoint.
        eval_sets: fairseq split -> name shown in the table.
        tgt: target language (of the bilingual recipe).
        environment: date, machine and versions (recorded beside the scores).
        out_path: where the JSON goes.
        lang_pairs: the directions of the multilingual recipe (``["de-en",
            ...]``): the scores then go under ``directions: {pair: {"models":
            ..., "curves": ...}}``, one entry per model and direction, each
            with the model's parameters and training time.
        curve_rows: the rows whose ``curve:ROW`` scores go under ``curves``.
    """
    scores = {"eval_sets": dict(eval_sets), **environment}
    facts = {name: model_facts(ckpt) for name, ckpt in models.items()}

    def direction(pair, target):
        refs = {
            split: read_lines(os.path.join(paths.text, f"{split}.{target}"))
            for split in eval_sets
        }
        out = {}
        for name in models:
            entry, signatures = model_scores(paths, name, eval_sets, refs, pair)
            scores.update({f"{k}_signature": v for k, v in signatures.items()})
            out[name] = {**facts[name], **entry}
        return out

    if lang_pairs:
        scores["directions"] = {}
        for pair in lang_pairs:
            entry = {"models": direction(pair, pair.split("-")[1])}
            curves = read_curves(paths, curve_rows, pair)
            if curves:
                entry["curves"] = curves
            scores["directions"][pair] = entry
    else:
        scores["models"] = direction(None, tgt)
    scores["seqkd"] = seqkd_summaries(
        {select: paths.seqkd(select) for select in ("top", "bleu")}
    )
    if os.path.exists(paths.engines_json):
        scores["seqkd_engines"] = read_json(paths.engines_json)
    curves = None if lang_pairs else read_curves(paths, curve_rows)
    if curves:
        scores["curves"] = curves
    scores["stage_seconds"] = stage_seconds(paths.stamps)
    write_json(out_path, scores)
