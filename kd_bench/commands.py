"""The command lines the recipes run: fairseq-train, fairseq-generate, CTranslate2."""

import importlib.util
import os
import re


def plugin_dir():
    """The installed plugin's folder (``--user-dir``), found without importing it."""
    spec = importlib.util.find_spec("fairseq_kd")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fairseq_kd plugin is not installed (pip install -e .)")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def ct2_available():
    """Whether CTranslate2 (and so ``ct2-fairseq-converter``) is installed."""
    return importlib.util.find_spec("ctranslate2") is not None


def post_process_symbol(subword):
    """fairseq's ``--post-process`` name for a subword scheme (``spm``, ``bpe``)."""
    return {"spm": "sentencepiece", "bpe": "subword_nmt"}[subword]


def log_interval(updates):
    """fairseq-train's ``--log-interval``: ~20 log lines a run, 1 to 50 updates."""
    return max(1, min(50, int(updates) // 20))


def train_command(
    data, save_dir, arch, train, src, tgt, device=(), extra=(), joined=True
):
    """The ``fairseq-train`` command line of one model.

    Args:
        data: binarized data folder.
        save_dir: where checkpoints go.
        arch: transformer size flags (``--encoder-layers`` ...).
        train: a :class:`~kd_bench.preset.TrainSettings`.
        src: source language (None with the multilingual task, whose
            ``--lang-pairs`` in ``extra`` name the directions).
        tgt: target language (None with the multilingual task).
        device: ``--cpu``, ``--fp16``...
        extra: criterion/task flags.
        joined: whether the data has one dictionary for both sides (all
            embeddings shared; else only the decoder's input and output).
    """
    extra = list(extra)
    share = "--share-all-embeddings" if joined else "--share-decoder-input-output-embed"
    return (
        ["fairseq-train", data, "--save-dir", save_dir]
        # the plugin on every run, KD or not: it stops fairseq's batch
        # prefetching thread at exit (fairseq_kd/shutdown.py) and lets torch
        # resume from a checkpoint weights-only
        + ([] if "--user-dir" in extra else ["--user-dir", plugin_dir()])
        + (["--source-lang", src, "--target-lang", tgt] if src else [])
        + ["--arch", "transformer"]
        + list(arch)
        + [share, "--dropout", train.dropout]
        + ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0"]
        + ["--lr", train.lr, "--lr-scheduler", "inverse_sqrt"]
        + ["--warmup-updates", train.warmup, "--weight-decay", "0.0001"]
        + ["--label-smoothing", "0.1"]
        + ["--max-tokens", train.max_tokens, "--max-update", train.updates]
        + (["--update-freq", train.update_freq] if train.update_freq else [])
        # ve-fairseq drops the last partial batch with multiples of 8
        + ["--required-batch-size-multiple", "1"]
        # fixed update budgets: the last checkpoint is the model; no validation
        # pass (budgets are chosen on the translated valid set instead)
        + ["--disable-validation", "--no-epoch-checkpoints"]
        + ["--seed", "1", "--num-workers", "0"]
        # about 20 progress lines a training (at most every 50 updates)
        + ["--log-format", "simple", "--log-interval", log_interval(train.updates)]
        + list(device)
        + extra
    )


def generate_command(data, checkpoint, split, beam, src, tgt, preset, subword, task=()):
    """The ``fairseq-generate`` command that translates and times one split.

    Args:
        data: binarized data folder.
        checkpoint: the model.
        split: ``test``, ``valid``...
        beam: beam size (1: greedy).
        src: source language.
        tgt: target language.
        preset: the :class:`~kd_bench.preset.Preset` (batch size, output-length
            bound, device).
        subword: ``spm`` or ``bpe`` (how to detokenise).
        task: task flags (the multilingual task's ``--task``, ``--lang-pairs``
            and language-tag options; the direction is ``src``-``tgt``).
    """
    return (
        ["fairseq-generate", data, "--path", checkpoint, "--gen-subset", split]
        # the plugin lets torch load the checkpoint weights-only
        + ["--user-dir", plugin_dir()]
        + list(task)
        + ["--source-lang", src, "--target-lang", tgt]
        + ["--beam", beam, "--nbest", "1", "--batch-size", preset.gen_batch_size]
        # every sentence is kept (ve-fairseq drops a last partial batch otherwise)
        + ["--required-batch-size-multiple", "1"]
        + ["--post-process", post_process_symbol(subword)]
        # outputs bounded relative to the source, as for every engine
        + preset.length_flags()
        + (["--cpu"] if preset.gen_cpu else [])
    )


def ct2_convert_command(checkpoint, data_bin, src, tgt, output_dir):
    """The ``ct2-fairseq-converter`` command of one model (int8).

    ``--user_dir`` loads the plugin in the converter, which lets torch read the
    checkpoint weights-only: no ``--unsafe_deserialization``.
    """
    return (
        ["ct2-fairseq-converter", "--model_path", checkpoint]
        + ["--data_dir", data_bin, "--user_dir", plugin_dir()]
        + ["--source_lang", src, "--target_lang", tgt]
        + ["--output_dir", output_dir, "--quantization", "int8"]
    )


def max_decoding_length(source_lengths, a, b):
    """fairseq's output-length bound of one batch: ``int(a * longest + b)``.

    fairseq-generate bounds a batch by its longest source, counted with its
    end-of-sentence token; CTranslate2 is given the same bound per batch.

    Args:
        source_lengths: the batch's source lengths in subword tokens (no EOS).
        a: ``--max-len-a``.
        b: ``--max-len-b``.
    """
    return int(a * (max(source_lengths) + 1) + b)


_SPEED = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
    r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)


def parse_speed(output):
    """fairseq-generate's own timing line, as a dict (generation time only)."""
    m = _SPEED.search(output)
    if not m:
        raise RuntimeError("fairseq-generate printed no 'Translated ...' line")
    return {
        "sentences": int(m.group(1).replace(",", "")),
        "tokens": int(m.group(2).replace(",", "")),
        "seconds": float(m.group(3)),
        "sentences_per_second": float(m.group(4)),
        "tokens_per_second": float(m.group(5)),
    }


def parse_generate_output(output):
    """Hypotheses (detokenised ``D-`` lines, else ``H-``) in corpus order."""
    hyps = {}
    for line in output.splitlines():
        for tag in ("D-", "H-"):
            if line.startswith(tag):
                sid, _, text = line[len(tag) :].split("\t", 2)
                if tag == "D-" or int(sid) not in hyps:
                    hyps[int(sid)] = text
    if sorted(hyps) != list(range(len(hyps))):
        raise RuntimeError("fairseq-generate output is missing sentence ids")
    return [hyps[i] for i in range(len(hyps))]
