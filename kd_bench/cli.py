"""The harness's command line: ``python -m kd_bench CORPUS [options]``."""

import argparse
import logging
import os
import shlex
import sys
import time

from kd_bench import report
from kd_bench.commands import ct2_available, plugin_dir
from kd_bench.corpus import builtin_corpora, load_corpus
from kd_bench.files import read_json
from kd_bench.plan import Config, Paths, build_plan
from kd_bench.preset import ROWS, select_rows
from kd_bench.process import exit_on_termination
from kd_bench.stage_runner import StageRunner
from kd_bench.teacher import given_teacher


def parse_args(corpus, argv=None):
    """Command-line options of a recipe (after the corpus argument).

    Args:
        corpus: the :class:`~kd_bench.corpus.Corpus`.
        argv: the options (default ``sys.argv[2:]``).
    """
    p = argparse.ArgumentParser(
        prog=f"python -m kd_bench {corpus.key}",
        description=f"{corpus.title}: the Kim & Rush distillation table, staged "
        "and resumable (see docs/recipes.md for the stages)",
    )
    presets = dict.fromkeys([*corpus.presets_for(False), *corpus.presets_for(True)])
    p.add_argument(
        "--preset",
        default=corpus.default_preset,
        choices=list(presets),
        help="with --lang-pairs: the multilingual recipe's preset of that name "
        "where the corpus has one",
    )
    p.add_argument("--src", default=corpus.src, help="source language code")
    p.add_argument("--tgt", default=corpus.tgt, help="target language code")
    p.add_argument(
        "--lang-pairs",
        default=None,
        metavar="PAIRS",
        help="the multilingual recipe: comma-separated directions (such as "
        + (corpus.lang_pairs or "de-en,cs-en")
        + ") that one teacher and each student serve, trained with fairseq's "
        "translation_multi_simple_epoch (language tags --encoder-langtok src "
        "--decoder-langtok), scored per direction; replaces --src/--tgt",
    )
    p.add_argument(
        "--langs",
        default=None,
        metavar="LANGS",
        help="with --lang-pairs: the multilingual task's comma-separated language "
        "list, whose order gives the language tags' ids (default: the sorted "
        "languages of --lang-pairs); a given teacher's own --langs, when it "
        "knows more languages than the run's directions",
    )
    p.add_argument(
        "--data",
        default=None,
        help="folder of raw parallel text named <stem>.<lang>[.gz] with stems "
        + ", ".join(corpus.splits.values()),
    )
    if corpus.fetch is not None:
        p.add_argument(
            "--download",
            action="store_true",
            help=f"download the public data into WORK/raw ({corpus.fetch_describe})",
        )
    p.add_argument("--no-checksum", action="store_true", help="skip sha256 checks")
    p.add_argument(
        "--subword",
        default=None,
        choices=["spm", "bpe"],
        help="joint sentencepiece unigram (default) or subword-nmt BPE",
    )
    given = p.add_argument_group(
        "bring your own teacher",
        "distil an existing fairseq model instead of training a teacher: the "
        "text is encoded with its subword model and binarized with its "
        "dictionaries, which must fit its checkpoint",
    )
    given.add_argument(
        "--teacher-checkpoint",
        default=None,
        metavar="PT",
        help="the teacher's fairseq checkpoint (linked, not copied, into "
        "WORK/models/teacher)",
    )
    given.add_argument(
        "--teacher-dict-dir",
        default=None,
        metavar="DIR",
        help="the folder of its dictionaries: dict.LANG.txt for each language "
        "(dict.SRC.txt and dict.TGT.txt; with --lang-pairs every language of the "
        "directions), or one joined dict.txt",
    )
    subword = given.add_mutually_exclusive_group()
    subword.add_argument(
        "--teacher-spm",
        default=None,
        metavar="MODEL",
        help="its sentencepiece model (implies --subword spm)",
    )
    subword.add_argument(
        "--teacher-bpe-codes",
        default=None,
        metavar="CODES",
        help="its subword-nmt BPE codes (implies --subword bpe)",
    )
    p.add_argument(
        "--work-root",
        default=os.path.join("work", corpus.key),
        help="where the default work folders go (default: work/<corpus>)",
    )
    p.add_argument(
        "--work",
        default=None,
        help="work folder (default: WORK_ROOT/<src>-<tgt>.<preset>.<subword>, "
        "with .given after it for a teacher given with --teacher-checkpoint)",
    )
    p.add_argument(
        "--results",
        default=None,
        help="where RESULTS.md, results.json and the plot go (default: WORK/results)",
    )
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated student rows to run (default: the preset's rows, "
        "else every enabled row; see --list)",
    )
    p.add_argument("--no-ct2", action="store_true", help="skip CTranslate2 speeds")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--from",
        dest="start",
        default=None,
        help="rerun this stage (or group) and every later one",
    )
    group.add_argument(
        "--only",
        default=None,
        help="run only these stages (names, groups or patterns such as "
        "'student:*', comma-separated)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print every command, run nothing"
    )
    p.add_argument("--list", action="store_true", help="list stages and rows")
    p.add_argument(
        "--summary",
        action="store_true",
        help="print the teacher, the student without KD and the KD student best "
        "on valid when the table is written (the quickstart)",
    )
    return p.parse_args(argv)


def resolve_raw(corpus, args, work):
    """(raw folder, whether a fetch stage must produce it)."""
    local = corpus.raw_folder(args)
    if local is not None:
        if not os.path.isdir(local):
            raise SystemExit(f"--data {local}: no such folder")
        return os.path.abspath(local), False
    if corpus.fetch is None:
        raise SystemExit(f"no {corpus.title} data: pass --data FOLDER")
    return os.path.join(work, "raw"), True


def reproduce_command(name, args, launcher=None):
    """The one command that reproduces this configuration (non-defaults only).

    Args:
        name: the corpus argument as given.
        args: the parsed options.
        launcher: the command's start (default ``python -m kd_bench NAME``).
    """
    parts = shlex.split(launcher) if launcher else ["python", "-m", "kd_bench", name]
    parts += ["--preset", args.preset]
    given = getattr(args, "teacher_checkpoint", None) is not None
    if getattr(args, "lang_pairs", None):
        parts += ["--lang-pairs", args.lang_pairs]
    if getattr(args, "langs", None):
        parts += ["--langs", args.langs]
    for opt in ("src", "tgt", "subword", "rows"):
        value = getattr(args, opt)
        if opt == "subword" and given:
            continue  # the teacher's subword model says
        if value is not None and value != args.defaults.get(opt):
            parts += [f"--{opt}", value]
    if getattr(args, "download", False):
        parts += ["--download"]
    for opt in ("teacher_checkpoint", "teacher_dict_dir", "teacher_spm"):
        if getattr(args, opt, None) is not None:
            parts += ["--" + opt.replace("_", "-"), getattr(args, opt)]
    if getattr(args, "teacher_bpe_codes", None) is not None:
        parts += ["--teacher-bpe-codes", args.teacher_bpe_codes]
    if args.results:
        parts += ["--results", os.path.relpath(os.path.abspath(args.results))]
    return shlex.join(parts)


def make_config(name, argv=None):
    """The :class:`~kd_bench.plan.Config` of a command line.

    Args:
        name: a built-in corpus key or a descriptor file.
        argv: the options after it.
    """
    corpus = load_corpus(name)
    args = parse_args(corpus, argv)
    args.defaults = {
        "src": corpus.src,
        "tgt": corpus.tgt,
        "subword": "spm",
        "rows": None,
    }
    lang_pairs = parse_lang_pairs(args)
    if lang_pairs:
        args.src, args.tgt = lang_pairs[0].split("-")
        args.defaults.update(src=args.src, tgt=args.tgt)  # not repeated
    presets = corpus.presets_for(bool(lang_pairs))
    if args.preset not in presets:
        raise SystemExit(
            f"--preset {args.preset}: the "
            + ("multilingual" if lang_pairs else "bilingual")
            + f" recipe's presets are {', '.join(presets)}"
        )
    preset = presets[args.preset]
    if args.src == args.tgt:
        raise SystemExit(f"--src and --tgt are both {args.src}")
    langs = sorted({x for p in lang_pairs for x in p.split("-")}) if lang_pairs else []
    tag_langs = parse_langs(args, langs)
    teacher = given_teacher(args, langs or [args.src, args.tgt])
    args.subword = teacher.subword if teacher else args.subword or "spm"
    pair = "+".join(lang_pairs) if lang_pairs else f"{args.src}-{args.tgt}"
    folder = f"{pair}.{args.preset}.{args.subword}"
    folder += ".given" if teacher else ""
    work = os.path.abspath(args.work or os.path.join(args.work_root, folder))
    results = os.path.abspath(args.results or os.path.join(work, "results"))
    raw, fetching = resolve_raw(corpus, args, work)
    cfg = Config(
        corpus=corpus,
        preset_name=args.preset,
        preset=preset,
        src=args.src,
        tgt=args.tgt,
        subword=args.subword,
        paths=Paths(work=work, raw=raw, results=results),
        rows=select_rows(args.rows, preset.rows),
        fetching=fetching,
        checksum=not args.no_checksum,
        use_ct2=not args.no_ct2 and ct2_available(),
        command=reproduce_command(name, args, os.environ.get("KD_BENCH_LAUNCHER")),
        teacher=teacher,
        lang_pairs=lang_pairs,
        tag_langs=tag_langs,
    )
    return cfg, args


def parse_lang_pairs(args):
    """``--lang-pairs``: the directions (None without it), checked."""
    if args.lang_pairs is None:
        return None
    pairs = [x.strip() for x in args.lang_pairs.split(",") if x.strip()]
    for pair in pairs:
        langs = pair.split("-")
        if len(langs) != 2 or not all(langs) or langs[0] == langs[1]:
            raise SystemExit(
                f"--lang-pairs: {pair!r} is not a direction SRC-TGT of two "
                "languages (such as de-en)"
            )
    if not pairs or len(set(pairs)) != len(pairs):
        raise SystemExit(
            f"--lang-pairs {args.lang_pairs}: give each direction once (such as "
            "de-en,cs-en)"
        )
    if args.src != args.defaults["src"] or args.tgt != args.defaults["tgt"]:
        raise SystemExit("--lang-pairs names the directions: no --src/--tgt with it")
    return pairs


def parse_langs(args, langs):
    """``--langs``: the multilingual task's language list (None without it), checked.

    Args:
        args: the parsed options.
        langs: the languages of ``--lang-pairs`` (empty without it).
    """
    if getattr(args, "langs", None) is None:
        return None
    if not langs:
        raise SystemExit("--langs is the multilingual task's: give --lang-pairs too")
    given = [x.strip() for x in args.langs.split(",") if x.strip()]
    if len(set(given)) != len(given):
        raise SystemExit(f"--langs {args.langs}: give each language once")
    missing = [lang for lang in langs if lang not in given]
    if missing:
        raise SystemExit(
            f"--langs {args.langs} lacks {', '.join(missing)} of --lang-pairs "
            f"{args.lang_pairs}: it lists every language of the directions"
        )
    return given


def main(argv=None):
    """Run (or print) a recipe; returns the :class:`~kd_bench.plan.Plan`.

    Args:
        argv: ``CORPUS [options]`` (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        usage = (
            "usage: python -m kd_bench CORPUS [options]; CORPUS is one of "
            f"{', '.join(builtin_corpora())} or a descriptor file (.py); "
            "python -m kd_bench CORPUS --help for the options"
        )
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        raise SystemExit(usage)
    cfg, args = make_config(argv[0], argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's import lowers it
    plan = build_plan(cfg)
    runner = StageRunner(
        plan.stages,
        stamp_dir=cfg.paths.stamps,
        log_dir=cfg.paths.logs,
        dry_run=args.dry_run,
        aliases={"$WORK": cfg.paths.work, "$USER_DIR": plugin_dir()},
    )
    if args.list:
        for stage in plan.stages:
            print(f"{stage.name:<28} {stage.group}")
        print("\nrows:")
        for row in ROWS:
            mark = "*" if row in plan.rows else " "
            print(f" {mark} {row.name:<22} {row.label}")
        return plan
    print(
        f"{cfg.corpus.title} {cfg.pair_label}, preset {cfg.preset_name}, "
        f"{cfg.subword}"
        + (f", teacher given: {cfg.teacher.checkpoint}" if cfg.teacher else "")
        + (" (dry run: nothing is executed)" if args.dry_run else ""),
        flush=True,
    )
    print(f"WORK={shlex.quote(cfg.paths.work)}\nUSER_DIR={shlex.quote(plugin_dir())}")
    if args.dry_run:
        print("# outputs are written as X.partial and renamed to X on success")
    start = time.time()
    runner.run(start=args.start, only=args.only)
    if args.dry_run:
        return plan
    print(f"all stages done in {time.time() - start:.0f}s; results: {plan.results}")
    results_json = os.path.join(plan.results, report.OUTPUT_FILES["json"])
    if args.summary and os.path.exists(results_json):
        print("\n" + report.summary_text(read_json(results_json)))
    return plan


def entry(argv=None):
    """The console script: :func:`main` with errors as one line and exit 1."""
    exit_on_termination()
    try:
        main(argv)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
