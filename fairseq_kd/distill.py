"""``fairseq-kd-distill``: build a sequence-level KD corpus with a teacher."""

import logging
import os
import sys
from typing import Dict, Optional

from fairseq_kd.seqkd import filters, nbest_choice
from fairseq_kd.seqkd.distiller import ABORT_ENV, distill  # noqa: F401
from fairseq_kd.seqkd.engines import ENGINES
from fairseq_kd.seqkd.merge import DROP, REFERENCE, TOO_LONG  # noqa: F401
from fairseq_kd.seqkd.parts import DistillError

logger = logging.getLogger("fairseq_kd.distill")


def add_distill_args(parser):
    """Add the distillation's own options to a fairseq generation parser.

    Args:
        parser: an ``argparse`` parser from ``fairseq.options.get_parser``.
    """
    g = parser.add_argument_group("distillation input and output")
    g.add_argument("--output", required=True, help="output folder")
    g.add_argument(
        "--work-dir",
        help="folder for part files, run settings and converted models "
        "(default: OUTPUT/work); runs that share it share their translations",
    )
    g.add_argument(
        "--source-text",
        nargs="+",
        metavar="FILE",
        help="distil raw source text (one sentence a line, files read in order) "
        "instead of DATA's --gen-subset; DATA gives the teacher's dictionaries",
    )
    g.add_argument("--spm-model", help="sentencepiece model applied to --source-text")
    g.add_argument("--bpe-codes", help="subword-nmt BPE codes applied to --source-text")
    g.add_argument(
        "--source-bin",
        metavar="FOLDER",
        help="distil a binarized source-only split (fairseq-preprocess "
        "--only-source --srcdict DATA/dict.SRC.txt) of this folder",
    )
    g.add_argument(
        "--distill-lang-pairs",
        metavar="PAIRS",
        help="with --task translation_multi_simple_epoch: the directions to "
        "distil, comma-separated (default: every --lang-pairs direction); each "
        "gets OUTPUT/SRC-TGT and OUTPUT/bin/SPLIT.SRC-TGT.*",
    )

    g = parser.add_argument_group("distillation engine")
    g.add_argument("--engine", choices=tuple(ENGINES), default="fairseq",
                   help="translator: fairseq (its generator, every generation "
                   "option, ensembles), ctranslate2 (one teacher converted once "
                   "into WORK/ct2-model, bilingual or multilingual, --beam "
                   "--nbest --lenpen --max-len-a/b only), fake (instant "
                   "reversed source, for benchmarks and tests)")  # fmt: skip
    g.add_argument(
        "--ct2-compute-type",
        default="default",
        help="CTranslate2 compute type (default, int8, float16, ...)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for the translator (0: library default)",
    )

    g = parser.add_argument_group("n-best choice and filtering")
    g.add_argument(
        "--select",
        choices=nbest_choice.METHODS,
        default="top",
        help="top: the teacher's best; bleu/chrf: the n-best hypothesis with the "
        "highest sentence score against the reference (Seq-Inter)",
    )
    g.add_argument(
        "--nbest-stats",
        action="store_true",
        help="also report the corpus BLEU of the chosen hypotheses and the mean "
        "sentence-BLEU of the chosen ones and of the teacher's best (always with "
        "--select bleu/chrf; costs about 0.7 ms a sentence with --select top)",
    )
    g.add_argument(
        "--on-degenerate",
        choices=(DROP, REFERENCE),
        default=REFERENCE,
        help="what replaces a filtered hypothesis: drop the pair, or keep the "
        "reference as target (source-only input: always drop)",
    )
    defaults = filters.FilterConfig()
    g.add_argument(
        "--min-len-ratio",
        type=float,
        default=defaults.min_len_ratio,
        help="smallest hypothesis/source length ratio (subword tokens)",
    )
    g.add_argument(
        "--max-len-ratio",
        type=float,
        default=defaults.max_len_ratio,
        help="largest hypothesis/source length ratio (subword tokens)",
    )
    g.add_argument(
        "--ratio-min-tokens",
        type=int,
        default=defaults.ratio_min_tokens,
        help="apply the ratio bounds only when a side has this many tokens",
    )
    g.add_argument(
        "--repeat-ngram",
        type=int,
        default=defaults.repeat_ngram,
        help="longest n-gram checked for loops (0: no loop filter)",
    )
    g.add_argument(
        "--repeat-count",
        type=int,
        default=defaults.repeat_count,
        help="an n-gram repeated this many times in a row is a loop",
    )
    g.add_argument(
        "--min-score",
        type=float,
        help="filter a chosen hypothesis whose teacher score (the engine's "
        "length-normalised log-probability) is below this",
    )
    g.add_argument(
        "--score-keep-fraction",
        type=float,
        help="filter by teacher score, keeping this fraction (0..1] of the "
        "translated sentences (threshold from a first pass over the scores)",
    )  # fmt: skip
    g.add_argument(
        "--backward-path",
        metavar="CKPT",
        help="a target->source model (DATA's dictionaries reversed; several: "
        "CKPT1:CKPT2, averaged) that scores each chosen pair by forced decoding: "
        "its length-normalised log-probability of the source given the hypothesis",
    )
    g.add_argument(
        "--min-backward-score",
        type=float,
        help="filter a chosen hypothesis whose backward score is below this",
    )
    g.add_argument(
        "--backward-keep-fraction",
        type=float,
        help="filter by backward score, keeping this fraction (0..1] of the "
        "translated sentences",
    )

    g = parser.add_argument_group("long runs")
    g.add_argument(
        "--chunk-size",
        type=int,
        default=2000,
        help="sentences per part file (unit of resumption and sharding)",
    )
    g.add_argument(
        "--merge",
        action="store_true",
        help="only merge existing part files (fails if any chunk is missing)",
    )
    g.add_argument(
        "--concat-original",
        action="store_true",
        help="also write OUTPUT/concat: the original pairs followed by the "
        "distilled ones, as text and binarized",
    )
    return parser


def get_parser():
    """The parser of ``fairseq-kd-distill``: fairseq's generation flags plus ours.

    ``--beam``, ``--nbest``, ``--lenpen``, ``--max-len-a/b`` and the other
    search options, ``--path`` and ``--post-process`` come from fairseq's
    generation group; ``--max-tokens``, ``--batch-size``, ``--gen-subset``,
    ``--num-shards`` and ``--shard-id`` from its dataset group; ``--cpu``,
    ``--fp16`` and ``--no-progress-bar`` from its common group; ``DATA``,
    ``-s`` and ``-t`` from the translation task (with ``--task
    translation_multi_simple_epoch``: ``--lang-pairs``, ``--langs``,
    ``--encoder-langtok``, ``--decoder-langtok``, ``--lang-tok-style``... from
    the multilingual task).
    """
    from fairseq import options

    parser = options.get_parser(
        "Translate a split or source text with a teacher and write a "
        "sequence-level KD corpus (text and binarized) in corpus order.",
        default_task="translation",
    )
    options.add_dataset_args(parser, gen=True)
    options.add_generation_args(parser)
    add_distill_args(parser)
    parser.set_defaults(gen_subset="train")
    return parser


def parse_args(argv=None):
    """Parse ``fairseq-kd-distill`` arguments.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    from fairseq import options

    return options.parse_args_and_arch(get_parser(), input_args=argv)


def main(args) -> Optional[Dict]:
    """Run (a shard of) a distillation; the summary when this process merged."""
    return distill(args)


def cli_main(argv=None):
    """Console entry point of ``fairseq-kd-distill``."""
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
    )
    import torch

    import fairseq_kd  # noqa: F401  (torch-safe checkpoint types, registries)

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        distill(args)
    except DistillError as e:
        logger.error(str(e))
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
