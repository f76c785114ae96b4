"""The harness's multilingual recipe (``--lang-pairs``): plan, commands, report."""

import glob
import json
import os
import random
import re

import pytest
from conftest import MULTI30K
from test_bench_plan import check_well_formed, hand_made_scores

from kd_bench import cli, commands, evaluate
from kd_bench import plan as kdplan
from kd_bench import report
from kd_bench.files import read_json, read_lines, write_lines
from kd_bench.preset import CPU_MULTILINGUAL, TINY
from kd_bench.stage_runner import Command, PyStep
from kd_bench.stage_runner import tmp_path as partial

PAIRS = "de-en,cs-en"
TASK = ["--lang-pairs", PAIRS, "--langs", "cs,de,en"]
TASK += ["--encoder-langtok", "src", "--decoder-langtok"]


def fake_multi_parallel(folder, langs=("de", "cs", "en"), n_train=40, seed=0):
    """Raw files with Multi30k's names, line-aligned across ``langs``."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for stem, n in (("train", n_train), ("val", 6), ("test_2016_flickr", 6)):
        rows = [rng.sample(range(30), rng.randint(2, 6)) for _ in range(n)]
        for lang in langs:
            with open(os.path.join(folder, f"{stem}.{lang}"), "w") as f:
                for r in rows:
                    f.write(" ".join(f"{lang}{i}" for i in r) + "\n")
    return folder


def multi_plan(tmp_path, *extra):
    raw = fake_multi_parallel(str(tmp_path / "raw"))
    argv = ["--data", raw, "--work", str(tmp_path / "w"), "--lang-pairs", PAIRS]
    cfg, _ = cli.make_config("multi30k", argv + ["--no-checksum", *extra])
    return kdplan.build_plan(cfg)


def commands_of(stage, program=None):
    return [
        step
        for step in stage.steps(partial)
        if isinstance(step, Command) and program in (None, step.argv[0])
    ]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def contains(argv, flags):
    argv = list(map(str, argv))
    return any(argv[i : i + len(flags)] == flags for i in range(len(argv)))


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_the_multilingual_plan_is_well_formed(preset, tmp_path):
    plan = multi_plan(tmp_path, "--preset", preset)
    names = check_well_formed(plan)
    assert plan.config.preset is {"cpu": CPU_MULTILINGUAL, "tiny": TINY}[preset]
    assert names[:4] == ["normalise", "subword", "binarize", "teacher"]
    rows = [r.name for r in plan.rows]
    for kind in ("student", "translate", "ct2" if plan.config.use_ct2 else None):
        if kind:
            assert {f"{kind}:{r}" for r in rows} <= set(names)
    assert "seqkd:engines" not in names  # the engines' comparison is bilingual
    assert names[-2:] == ["score", "table"]
    assert plan.meta["lang_pairs"] == ["de-en", "cs-en"]
    assert plan.meta["langs"] == ["cs", "de", "en"]
    raw, root = str(tmp_path / "raw"), str(tmp_path / "root")
    argv = ["--data", raw, "--work-root", root, "--lang-pairs", PAIRS]
    cfg, _ = cli.make_config("multi30k", argv + ["--preset", preset])
    assert cfg.paths.work == os.path.join(root, f"de-en+cs-en.{preset}.spm")


def test_one_dictionary_then_one_binarization_per_direction(tmp_path):
    plan = multi_plan(tmp_path)
    binarize = next(s for s in plan.stages if s.name == "binarize")
    argvs = [c.argv for c in commands_of(binarize, "fairseq-preprocess")]
    assert "--dict-only" in argvs[0]
    shared = os.path.join(partial(plan.config.paths.bin), "dict.txt")
    assert [
        (flag(a, "--source-lang"), flag(a, "--target-lang")) for a in argvs[1:]
    ] == [
        ("de", "en"),
        ("cs", "en"),
    ]
    for argv in argvs[1:]:
        assert flag(argv, "--srcdict") == flag(argv, "--tgtdict") == shared
    subword = next(s for s in plan.stages if s.name == "subword")
    (learn,) = [s for s in subword.steps(partial) if "sentencepiece" in s.describe]
    assert "train.{cs,de,en}" in learn.describe  # one model for every language


def test_models_train_and_distil_with_the_multilingual_task(tmp_path):
    plan = multi_plan(tmp_path, "--preset", "cpu")
    by_name = {s.name: s for s in plan.stages}
    (teacher,) = commands_of(by_name["teacher"])
    assert flag(teacher.argv, "--task") == "translation_multi_simple_epoch"
    assert contains(teacher.argv, TASK) and "--source-lang" not in teacher.argv
    for row in plan.rows:
        (train,) = commands_of(by_name[f"student:{row.name}"])
        task = flag(train.argv, "--task")
        assert task == (
            "translation_multi_simple_epoch_kd" if row.kd else kdplan.MULTILINGUAL_TASK
        )
        assert contains(train.argv, TASK)
    for name in ("seqkd:top", "seqkd:bleu", "topk:seqkd-bleu"):
        (tool,) = commands_of(by_name[name])
        assert flag(tool.argv, "--task") == "translation_multi_simple_epoch"
        assert contains(tool.argv, TASK)
    # the teacher's beam search through fairseq-kd-distill's CTranslate2 engine
    (top,) = commands_of(by_name["seqkd:top"])
    if commands.ct2_available():
        assert contains(top.argv, ["--engine", "ctranslate2", "--threads", "2"])
    else:
        assert "--engine" not in top.argv
    # the distilled folder holds every split already: students train on it
    (inter,) = commands_of(by_name["student:seq-inter+word-kd"])
    assert inter.argv[1] == os.path.join(plan.config.paths.seqkd("bleu"), "bin")


def fairseq_output(hyps):
    lines = [f"D-{i}\t-0.5\t{h}" for i, h in enumerate(hyps)]
    lines.append(
        f"Translated {len(hyps)} sentences ({3 * len(hyps)} tokens) in 0.5s "
        "(12.00 sentences/s, 36.00 tokens/s)"
    )
    return "\n".join(lines)


def test_each_direction_is_translated_with_its_languages_into_its_folder(tmp_path):
    plan = multi_plan(tmp_path, "--preset", "tiny", "--rows", "baseline")
    p = plan.config.paths
    for split in ("test", "valid"):
        write_lines(os.path.join(p.text, f"{split}.en"), ["a", "b"])
    stage = next(s for s in plan.stages if s.name == "translate:baseline")
    steps = stage.steps(partial)
    for step in steps:
        if isinstance(step, PyStep):
            step.fn()  # the per-direction folders
    seen = {}
    for step in commands_of(stage, "fairseq-generate"):
        argv = list(map(str, step.argv))
        src, tgt = flag(argv, "--source-lang"), flag(argv, "--target-lang")
        assert contains(argv, ["--task", kdplan.MULTILINGUAL_TASK] + TASK)
        assert contains(argv, ["--batch-size", str(TINY.gen_batch_size)])
        assert contains(argv, ["--required-batch-size-multiple", "1"])
        assert contains(argv, list(map(str, TINY.length_flags())))
        key = (src, tgt, flag(argv, "--gen-subset"), flag(argv, "--beam"))
        seen[key] = True
        # the hypotheses land in the direction's folder, named by split and beam
        step.on_output(fairseq_output([f"{src} {key[2]} {key[3]}", "x"]), 1.0)
        out = os.path.join(partial(p.translations("baseline")), f"{src}-{tgt}")
        hyps = read_lines(os.path.join(out, f"{key[2]}.beam{key[3]}.txt"))
        assert hyps[0] == f"{src} {key[2]} {key[3]}"
    assert sorted(seen) == sorted(
        (s, "en", split, b)
        for s in ("de", "cs")
        for split in ("test", "valid")
        for b in ("1", "5")
    )


def test_each_direction_gets_its_ctranslate2_translation(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "ct2_available", lambda: True)
    monkeypatch.setattr(cli, "ct2_available", lambda: True)
    plan = multi_plan(tmp_path, "--preset", "tiny", "--rows", "baseline")
    stage = next(s for s in plan.stages if s.name == "ct2:teacher")
    steps = [s for s in stage.steps(partial) if isinstance(s, PyStep)]
    assert "ct2_multilingual.convert" in steps[1].describe
    out = partial(plan.config.paths.ct2("teacher"))
    runs = [s.fn for s in steps if getattr(s.fn, "func", None) is not None]
    assert [(f.keywords["direction"], f.args[1], f.args[2]) for f in runs] == [
        (
            ("de", "en"),
            os.path.join(plan.config.paths.subword, "test.de"),
            out + "/de-en",
        ),
        (
            ("cs", "en"),
            os.path.join(plan.config.paths.subword, "test.cs"),
            out + "/cs-en",
        ),
    ]
    assert all(f.args[0] == os.path.join(out, "model") for f in runs)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lang-pairs", "de-de"], "not a direction SRC-TGT"),
        (["--lang-pairs", "de-en,de-en"], "give each direction once"),
        (["--lang-pairs", "deen"], "not a direction"),
        (["--lang-pairs", PAIRS, "--src", "cs"], "no --src/--tgt with it"),
    ],
)
def test_lang_pairs_are_checked(argv, message, tmp_path):
    raw = fake_multi_parallel(str(tmp_path / "raw"))
    with pytest.raises(SystemExit, match=message):
        cli.make_config("multi30k", ["--data", raw] + argv)


def test_the_reproduce_command_names_the_directions(tmp_path):
    plan = multi_plan(tmp_path, "--preset", "tiny")
    assert "--lang-pairs de-en,cs-en" in plan.config.command
    assert "--src" not in plan.config.command
    # the bilingual recipe is unchanged: no multilingual flag anywhere
    raw = fake_multi_parallel(str(tmp_path / "raw2"), ("de", "en"))
    cfg, _ = cli.make_config("multi30k", ["--data", raw, "--work", str(tmp_path / "b")])
    stages = kdplan.build_plan(cfg).stages
    for stage in stages:
        for step in commands_of(stage):
            assert "--lang-pairs" not in step.argv, stage.name


def direction_scores():
    """Hand-made scores of two directions: cs-en 10 BLEU below de-en."""
    de = hand_made_scores()
    cs = json.loads(json.dumps(de["models"]))
    for entry in cs.values():
        for split in entry["scores"].values():
            for beam in split.values():
                beam["bleu"] -= 10.0
    scores = {k: v for k, v in de.items() if k not in ("models", "curves")}
    scores["directions"] = {
        "de-en": {"models": de["models"], "curves": de["curves"]},
        "cs-en": {"models": cs},
    }
    return scores


def multi_meta():
    from test_bench_plan import hand_made_meta

    meta = hand_made_meta()
    meta.update(pair="de-en, cs-en", lang_pairs=["de-en", "cs-en"])
    meta.update(langs=["cs", "de", "en"], task="translation_multi_simple_epoch")
    return meta


def test_the_report_has_one_table_per_direction(tmp_path):
    pytest.importorskip("matplotlib")
    paths = {k: str(tmp_path / v) for k, v in report.OUTPUT_FILES.items()}
    scores = direction_scores()
    scores["directions"] = dict(sorted(scores["directions"].items()))  # as read
    results = report.write_results(scores, multi_meta(), paths)
    assert "rows" not in results and list(results["directions"]) == ["de-en", "cs-en"]
    for pair, drop in (("de-en", 0.0), ("cs-en", 10.0)):
        found = results["directions"][pair]
        teacher = found["rows"][0]
        assert teacher["scores"]["test"]["beam5"]["bleu"] == 35.0 - drop
        # the stopping point (P) is checked where there is a curve: de-en
        goals = ["G1", "G2", "G3"] + (["P:"] if pair == "de-en" else [])
        assert [g["goal"][:2] for g in found["goals"]] == goals
        # word-kd greedy 32 (22) against the teacher's beam 5 35 (25)
        share = round((32.0 - drop) / (35.0 - drop), 3)
        assert found["teacher_share"]["word-kd"]["beam1"] == share
        assert found["rows"][2]["vs_teacher_beam5"]["bleu_share"] == share
    assert "curves" in results["directions"]["de-en"]
    assert "curves" not in results["directions"]["cs-en"]
    md = open(paths["markdown"]).read()
    assert md.startswith("# Multi30k de-en, cs-en: multilingual knowledge")
    de_en, cs_en = md.index("\n## de-en\n"), md.index("\n## cs-en\n")
    tables = md[de_en:cs_en], md[cs_en : md.index("## The student's share")]
    assert "| teacher | 9.8M | 10 min (450) | 33.50 / 35.00 |" in tables[0]
    assert "| teacher | 9.8M | 10 min (450) | 23.50 / 25.00 |" in tables[1]
    assert "| model | de-en | cs-en |" in md
    assert "| word-KD | 91% / 96% | 88% / 94% |" in md
    reloaded = json.loads(json.dumps(results, sort_keys=True))  # as results.json
    head = lambda r: report.render_markdown(r).split("## Set-up")[0]  # noqa: E731
    assert head(reloaded) == head(results)  # the tables and goals in given order
    assert "| teacher | BLEU 35.00 | BLEU 25.00 |" in md
    assert md.count("G1: every KD student") == 2
    assert "## Valid BLEU by training updates, de-en" in md
    assert "Valid BLEU by training updates, cs-en" not in md
    assert json.load(open(paths["json"])) == json.loads(json.dumps(results))
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = report.summary_text(results)
    assert text.index("de-en:") < text.index("cs-en:")
    assert re.search(r"^teacher\s+5\s+25\.00", text, re.M)  # cs-en's teacher


def test_the_bilingual_report_is_unchanged_by_the_direction_views():
    results = report.build_results(hand_made_scores(), multi_meta() | {"pair": "x"})
    assert report.directions_of(results) == [(None, results)]
    assert "directions" not in results and len(results["rows"]) == 4


@pytest.mark.slow
@pytest.mark.skipif(MULTI30K is None, reason="Multi30k is not on this machine")
def test_tiny_multilingual_run_on_a_slice_of_multi30k(tmp_path, monkeypatch):
    """de-en and cs-en: the teacher, a student without KD and the recipe's
    best KD row (seq-KD over both directions, the teacher's top-k over the
    Seq-Inter corpus, the multilingual KD task), end to end (tiny)."""
    sizes = {"train": 300, "valid": 10, "test": 12}
    monkeypatch.setattr(TINY, "limits", sizes)
    # the seq-KD corpora through the engine the cpu preset uses
    engine = "ctranslate2" if commands.ct2_available() else "fairseq"
    monkeypatch.setattr(TINY, "distill_engine", engine)
    work = tmp_path / "w"
    argv = ["multi30k", "--preset", "tiny", "--lang-pairs", PAIRS]
    argv += ["--work", str(work), "--rows", "baseline,seq-inter+word-kd"]
    argv += ["--data", MULTI30K]
    plan = cli.main(argv)
    results = read_json(os.path.join(plan.results, "results.json"))
    assert sorted(results["directions"]) == ["cs-en", "de-en"]
    assert results["lang_pairs"] == ["de-en", "cs-en"]
    for pair in ("de-en", "cs-en"):
        rows = results["directions"][pair]["rows"]
        names = [r["name"] for r in rows]
        assert names == ["teacher", "baseline", "seq-inter+word-kd"]
        for row in rows:
            for split in ("test", "valid"):
                for beam in ("beam1", "beam5"):
                    assert isinstance(row["scores"][split][beam]["bleu"], float)
                    assert row["speed"][split][beam] > 0
            if commands.ct2_available():
                assert row["ct2_int8"]["beam1"]["sentences_per_second"] > 0
                folder = os.path.join(plan.work, "ct2", row["name"], pair)
                hyps = read_lines(os.path.join(folder, "test.beam1.txt"))
                assert len(hyps) == 12 and not any("__en__" in h for h in hyps)
    # each direction's hypotheses are what fairseq-generate printed for its
    # own source, read with its own language tag (the logs' S- lines)
    for model in ("teacher", "baseline", "seq-inter+word-kd"):
        logs = glob.glob(os.path.join(plan.work, "logs", f"translate__{model}.*.log"))
        found = []
        for log in logs:
            text = open(log, encoding="utf-8").read()
            sources = re.findall(r"^S-\d+\t(\S+)", text, re.M)
            (tag,) = set(sources)  # one direction per command
            src = tag.strip("_")
            hyps = commands.parse_generate_output(text)
            split = {12: "test", 10: "valid"}[len(hyps)]
            folder = os.path.join(plan.work, "translations", model, f"{src}-en")
            assert hyps in [
                read_lines(os.path.join(folder, f"{split}.beam{b}.txt")) for b in (1, 5)
            ]
            assert not any("__en__" in h for h in hyps)
            found.append((src, split))
        assert sorted(found) == sorted(
            (src, split) for src in ("cs", "de") for split in ("test", "valid") * 2
        )
    # the KD row: Seq-Inter over both directions, the teacher's top-k of each
    # direction's Seq-Inter corpus, the multilingual KD task with its KD term
    seqkd = os.path.join(plan.work, "seqkd", "bleu")
    summary = read_json(os.path.join(seqkd, "train.summary.json"))
    for pair in ("de-en", "cs-en"):
        direction = summary["directions"][pair]
        assert direction["select"] == "bleu" and direction["sentences"] == 300
        assert direction["engines"] == [engine]
        store = os.path.join(plan.work, "topk", "seqkd-bleu", pair, "header.json")
        header = read_json(store)
        assert header["direction"]["lang_pair"] == pair
        assert header["num_sentences"] == 300
        assert header["data_folder"] == os.path.join(seqkd, "bin")
    (log,) = glob.glob(os.path.join(plan.work, "logs", "student__seq-inter+*.log"))
    text = open(log, encoding="utf-8").read()
    assert "translation_multi_simple_epoch_kd" in text
    assert re.search(r"\bkd_loss=\d", text)
    # a curve per curve row and direction, and the stopping point checked on
    # the best student's
    for pair in ("de-en", "cs-en"):
        direction = results["directions"][pair]
        curves = direction["curves"]
        assert sorted(curves) == ["baseline", "seq-inter+word-kd"]
        for curve in curves.values():
            assert [p["updates"] for p in curve["points"]] == [10, 20]
        final = {
            r["name"]: r["scores"]["valid"]["beam5"]["bleu"] for r in direction["rows"]
        }
        for row, curve in curves.items():  # the last point is the final model
            assert curve["points"][-1]["bleu"] == pytest.approx(final[row], abs=0.01)
        (stopped,) = [g for g in direction["goals"] if g["goal"].startswith("P:")]
        best = max(curves, key=lambda row: final[row])
        assert stopped["detail"].startswith(f"{best}: ")
    md = open(os.path.join(plan.results, "RESULTS.md")).read()
    assert 0 < md.index("\n## de-en\n") < md.index("\n## cs-en\n")  # as given
    assert "| updates | student on references (baseline) | Seq-Inter" in md


def test_the_seqkd_corpora_are_reported_per_direction(tmp_path):
    """A multilingual corpus's summary holds its figures per direction: the
    results keep them and the table has one line per selection and direction
    (the first multilingual cpu run printed None for them)."""
    figures = {
        "de-en": {"engines": ["ctranslate2"], "sentences": 10, "replaced": 1},
        "cs-en": {"engines": ["ctranslate2"], "sentences": 12, "replaced": 2},
    }
    for pair, bleu in (("de-en", 35.6), ("cs-en", 33.56)):
        figures[pair].update(
            sentences_per_second=100.0,
            filtered={"repeat": figures[pair]["replaced"]},
            not_top=0,
            mean_sentence_bleu_chosen=bleu - 1,
            mean_sentence_bleu_top=bleu - 1,
            corpus_bleu_chosen=bleu,
        )
    folder = tmp_path / "top"
    folder.mkdir()
    summary = {"sentences": 22, "replaced": 3, "directions": figures}
    (folder / "train.summary.json").write_text(json.dumps(summary))
    kept = evaluate.seqkd_summaries({"top": str(folder)})
    assert kept["top"]["directions"]["cs-en"]["corpus_bleu_chosen"] == 33.56
    lines = report.seqkd_section(kept)
    assert lines[5].startswith("| selection | direction | engine |")
    assert lines[6].count("---") == lines[5].count("|") - 1
    assert lines[7:] == [
        "| top | de-en | ctranslate2 | 10 | 100.0 | repeat 1 (1) | 0 | "
        "34.6 / 34.6 | 35.6 |",
        "| top | cs-en | ctranslate2 | 12 | 100.0 | repeat 2 (2) | 0 | "
        "32.56 / 32.56 | 33.56 |",
    ]
