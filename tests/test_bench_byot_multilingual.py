"""A given multilingual teacher (--teacher-checkpoint with --lang-pairs)."""

import os
import re

import corpus
import pytest
import torch
from test_bench_byot import encode, train_spm
from test_bench_multilingual import contains, fake_multi_parallel, flag
from test_bench_plan import check_well_formed, plan_for

from fairseq_kd.checkpoints import load_checkpoint
from kd_bench import cli, files
from kd_bench import plan as kdplan
from kd_bench import teacher as kdteacher
from kd_bench.stage_runner import Command, PyStep
from kd_bench.stage_runner import tmp_path as partial
from kd_bench.teacher import GIVEN_JSON, check_multilingual_teacher

PAIRS = "de-en,cs-en"
LANGS = ("cs", "de", "en")
TEACHER_PAIRS = ("de-en", "cs-en")
TASK = ["--lang-pairs", PAIRS, "--langs", "cs,de,en"]
TASK += ["--encoder-langtok", "src", "--decoder-langtok"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Raw multi-parallel text with Multi30k's names (cs, de, en)."""
    return fake_multi_parallel(str(tmp_path_factory.mktemp("raw")), LANGS)


@pytest.fixture(scope="module")
def multi_teacher(raw, tmp_path_factory):
    """A multilingual teacher trained by hand with stock fairseq, as a user has
    one: its checkpoint, fairseq-preprocess's dict.LANG.txt and its spm model."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("multi_teacher")
    model = train_spm(raw, str(root / "spm"), langs=LANGS)
    pieces = root / "pieces"
    pieces.mkdir()
    for stem, split in (("train", "train"), ("val", "valid")):
        for lang in LANGS:
            lines = files.read_lines(os.path.join(raw, f"{stem}.{lang}"))
            files.write_lines(str(pieces / f"{split}.{lang}"), encode(model, lines))
    sp = spm.SentencePieceProcessor(model_file=model)
    shared = root / "dict.txt"  # one dictionary of every language's pieces
    specials = {sp.unk_id(), sp.bos_id(), sp.eos_id()}
    shared.write_text(
        "".join(
            f"{sp.id_to_piece(i)} 1\n"
            for i in range(sp.get_piece_size())
            if i not in specials
        )
    )
    bin_dir = str(root / "bin")
    for pair in TEACHER_PAIRS:
        src, tgt = pair.split("-")
        corpus.run(
            ["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt]
            + ["--trainpref", str(pieces / "train")]
            + ["--validpref", str(pieces / "valid"), "--destdir", bin_dir]
            + ["--srcdict", str(shared), "--tgtdict", str(shared), "--workers", "1"]
        )
    save = root / "checkpoints"
    flags = ["--task", "translation_multi_simple_epoch"]
    flags += ["--lang-pairs", ",".join(TEACHER_PAIRS), "--langs", ",".join(LANGS)]
    flags += ["--encoder-langtok", "src", "--decoder-langtok"]
    flags += ["--criterion", "label_smoothed_cross_entropy", "--disable-validation"]
    corpus.train(bin_dir, str(save), flags, updates=10)
    return {
        "checkpoint": str(save / "checkpoint_last.pt"),
        "dict_dir": bin_dir,
        "spm": model,
    }


def byot_argv(raw, work, teacher, *more):
    return [
        "multi30k",
        "--data",
        raw,
        "--no-checksum",
        "--preset",
        "tiny",
        "--lang-pairs",
        PAIRS,
        "--work",
        str(work),
        "--no-ct2",
        "--teacher-checkpoint",
        teacher["checkpoint"],
        "--teacher-dict-dir",
        teacher["dict_dir"],
        "--teacher-spm",
        teacher["spm"],
        *more,
    ]


@pytest.mark.slow
def test_a_given_multilingual_teacher_is_distilled_without_training_one(
    multi_teacher, raw, tmp_path, monkeypatch
):
    monkeypatch.setattr(kdplan, "EVAL_BEAMS", (1,))  # one beam: time
    teacher = multi_teacher
    work = tmp_path / "w"
    only = "teacher,data,student:word-kd-live,translate:word-kd-live"
    argv = byot_argv(raw, work, teacher, "--rows", "word-kd-live", "--only", only)
    plan = cli.main(argv)
    # no teacher was trained: it is linked, its files copied, its sha256 kept
    assert plan.stages[0].name == "teacher"
    logs = sorted(os.listdir(work / "logs"))
    assert "teacher.0.log" not in logs and "binarize.0.log" in logs
    folder = work / "models" / "teacher"
    link = folder / "checkpoint_last.pt"
    assert os.path.islink(link)
    assert os.path.realpath(link) == os.path.realpath(teacher["checkpoint"])
    given = files.read_json(str(folder / GIVEN_JSON))
    assert given["sha256"] == files.sha256_file(teacher["checkpoint"])
    theirs = {
        lang: open(os.path.join(teacher["dict_dir"], f"dict.{lang}.txt"), "rb").read()
        for lang in LANGS
    }
    assert given["dictionary_sizes"] == {
        lang: len(theirs[lang].splitlines()) + 4 for lang in LANGS
    }
    # every language encoded with the teacher's spm model; every direction
    # binarized with the teacher's dictionaries, which WORK/bin then holds
    for split in ("train", "valid", "test"):
        for lang in LANGS:
            text = files.read_lines(str(work / "text" / f"{split}.{lang}"))
            pieces = files.read_lines(str(work / "subword" / f"{split}.{lang}"))
            assert pieces == encode(teacher["spm"], text)
    for lang in LANGS:
        assert (folder / f"dict.{lang}.txt").read_bytes() == theirs[lang]
        assert (work / "bin" / f"dict.{lang}.txt").read_bytes() == theirs[lang]
    for pair in PAIRS.split(","):
        for lang in pair.split("-"):
            assert (work / "bin" / f"train.{pair}.{lang}.bin").is_file()
    # the student: the multilingual KD task, the live given teacher (its
    # dictionaries from WORK/models/teacher), the teacher's vocabulary
    log = (work / "logs" / "student__word-kd-live.0.log").read_text()
    assert "translation_multi_simple_epoch_kd" in log
    assert re.search(r"\bkd_loss=\d", log)
    embed = "encoder.embed_tokens.weight"
    student = torch.load(
        work / "models" / "word-kd-live" / "checkpoint_last.pt", weights_only=False
    )
    vocab = torch.load(teacher["checkpoint"], weights_only=False)["model"][embed]
    assert student["model"][embed].shape == (vocab.shape[0], 32)
    assert student["cfg"]["task"].teacher_dict_dir == str(folder)
    # translated in each direction, into its own folder
    for pair in PAIRS.split(","):
        out = work / "translations" / "word-kd-live" / pair
        for split in ("test", "valid"):
            hyps = files.read_lines(str(out / f"{split}.beam1.txt"))
            assert len(hyps) == 6 and not any("__en__" in h for h in hyps)


def edited(path, dest, **changes):
    """A copy of the teacher whose saved task options are changed."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key, value in changes.items():
        setattr(state["cfg"]["task"], key, value)
    torch.save(state, dest)
    return str(dest)


@pytest.mark.parametrize(
    "changes,more,says",
    [
        (
            {"lang_pairs": "de-en,cs-de"},
            (),
            [
                "give --lang-pairs of directions it was trained on (de-en,cs-de)",
                "--lang-pairs: this task's cs-en not among the teacher's de-en,cs-de",
            ],
        ),
        (
            {"lang_tok_style": "mbart"},
            (),
            [
                "always tags with --encoder-langtok src --decoder-langtok",
                "--lang-tok-style: the teacher's 'mbart', this task's 'multilingual'",
            ],
        ),
        (
            {},
            ("--lang-pairs", "de-en"),
            [
                "--langs cs,de,en (its languages, in its order)",
                "languages (their order gives the language tokens' ids): the "
                "teacher's cs,de,en, this task's de,en; give --langs cs,de,en",
            ],
        ),
    ],
)
def test_a_teacher_trained_with_other_settings_is_refused_before_anything_trains(
    multi_teacher, raw, tmp_path, changes, more, says
):
    teacher = dict(multi_teacher)
    if changes:
        teacher["checkpoint"] = edited(
            teacher["checkpoint"], tmp_path / "t.pt", **changes
        )
    work = tmp_path / "w"
    argv = byot_argv(raw, work, teacher, "--only", "teacher") + list(more)
    with pytest.raises(ValueError) as e:
        cli.main(argv)
    message = str(e.value)
    assert message.startswith(
        f"--teacher-checkpoint {teacher['checkpoint']} does not fit this run"
    )
    for said in says:
        assert said in message
    assert not (work / "models" / "teacher").exists()
    if more:  # the teacher's --langs: the same teacher fits the one direction
        cli.main(argv + ["--langs", "cs,de,en"])
        given = files.read_json(str(work / "models" / "teacher" / GIVEN_JSON))
        assert given["sha256"] == files.sha256_file(teacher["checkpoint"])


def test_the_dictionary_a_teacher_names_is_installed_under_its_name(
    multi_teacher, raw, tmp_path
):
    # M2M-100 style: --fixed-dictionary names one file, which the plugin looks
    # for by that name in --teacher-dict-dir (here WORK/models/teacher)
    teacher = dict(multi_teacher)
    fixed = "/far/away/model_dict.128k.txt"
    teacher["checkpoint"] = edited(
        teacher["checkpoint"], tmp_path / "t.pt", fixed_dictionary=fixed
    )
    work = tmp_path / "w"
    cli.main(byot_argv(raw, work, teacher, "--only", "teacher"))
    folder = work / "models" / "teacher"
    theirs = os.path.join(teacher["dict_dir"], "dict.de.txt")
    assert (folder / "model_dict.128k.txt").read_bytes() == open(theirs, "rb").read()
    assert (folder / GIVEN_JSON).is_file()


def test_a_named_target_dictionary_is_the_target_languages(multi_teacher, tmp_path):
    # --source-dict and --target-dict: each is installed from its own side's
    # language (the first direction's), not both from the source's
    path = edited(
        multi_teacher["checkpoint"],
        tmp_path / "t.pt",
        source_dict="/far/src_dict.txt",
        target_dict="/far/tgt_dict.txt",
    )
    state = load_checkpoint(path, trusted_fallback=False)  # as load_given does
    assert kdteacher.named_dictionaries(state) == {"src_dict.txt": 0, "tgt_dict.txt": 1}


def test_the_bilingual_recipe_sends_a_multilingual_teacher_to_lang_pairs(
    multi_teacher, raw, tmp_path
):
    argv = byot_argv(raw, tmp_path / "w", multi_teacher, "--only", "teacher")
    argv[argv.index("--lang-pairs") : argv.index("--lang-pairs") + 2] = []
    with pytest.raises(ValueError) as e:
        cli.main(argv)  # de-en, bilingual
    message = str(e.value)
    assert "is a multilingual model (task translation_multi_simple_epoch" in message
    assert "directions de-en,cs-en): run the multilingual recipe" in message
    assert not (tmp_path / "w" / "models" / "teacher").exists()


def test_dictionaries_that_do_not_fit_the_embeddings_are_refused(
    multi_teacher, raw, tmp_path
):
    bad = tmp_path / "dicts"
    bad.mkdir()
    text = open(os.path.join(multi_teacher["dict_dir"], "dict.en.txt")).read()
    (bad / "dict.txt").write_text(text + "".join(f"x{i} 1\n" for i in range(8)))
    teacher = {**multi_teacher, "dict_dir": str(bad)}
    work = tmp_path / "w"
    with pytest.raises(ValueError) as e:
        cli.main(byot_argv(raw, work, teacher, "--only", "teacher"))
    message = str(e.value)
    assert f"--teacher-dict-dir {bad} does not fit --teacher-checkpoint" in message
    # the sizes with the three language tags added
    n = len(text.splitlines()) + 4
    assert f"dictionaries of {n + 3} (source)" in message
    assert f"have {n + 8 + 3} (source)" in message
    assert not (work / "models" / "teacher").exists()


# -- plans (nothing trained, nothing loaded) ----------------------------------


def fake_teacher(folder, langs=LANGS, differ=None):
    """Files named like a multilingual teacher's (nothing loads them)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("T.pt", "spm.model", "bpe.codes"):
        open(os.path.join(folder, name), "w").close()
    for lang in langs:
        with open(os.path.join(folder, f"dict.{lang}.txt"), "w") as f:
            f.write("c 1\n" if lang == differ else "a 1\nb 1\n")
    return folder


def given_argv(raw, given, *more):
    return [
        "--data",
        raw,
        "--no-checksum",
        "--lang-pairs",
        PAIRS,
        "--teacher-checkpoint",
        os.path.join(given, "T.pt"),
        "--teacher-dict-dir",
        given,
        "--teacher-spm",
        os.path.join(given, "spm.model"),
        *more,
    ]


def commands_of(plan, program):
    return [
        step.argv
        for stage in plan.stages
        for step in stage.steps(partial)
        if isinstance(step, Command) and step.argv[0] == program
    ]


@pytest.mark.parametrize("one_file", [False, True])
def test_the_multilingual_plan_uses_the_given_teacher(one_file, tmp_path):
    raw = fake_multi_parallel(str(tmp_path / "raw"))
    given = fake_teacher(str(tmp_path / "given"), () if one_file else LANGS)
    if one_file:  # one dict.txt for every language
        with open(os.path.join(given, "dict.txt"), "w") as f:
            f.write("a 1\n")
    argv = given_argv(raw, given, "--rows", "baseline,word-kd,word-kd-live")
    cfg, _ = cli.make_config("multi30k", argv + ["--work-root", str(tmp_path)])
    assert cfg.paths.work == str(tmp_path / "de-en+cs-en.cpu.spm.given")
    mine = given + "/dict.txt" if one_file else None
    assert cfg.teacher.dicts == {
        lang: mine or os.path.join(given, f"dict.{lang}.txt") for lang in LANGS
    }
    for option in ("--lang-pairs de-en,cs-en", "--teacher-checkpoint", "--teacher-spm"):
        assert option in cfg.command
    assert f"--teacher-dict-dir {given}" in cfg.command
    plan = plan_for("multi30k", argv + ["--work", str(tmp_path / "w")])
    check_well_formed(plan)
    stages = {s.name: s for s in plan.stages}
    folder = os.path.join(plan.work, "models", "teacher")
    # the teacher first, trained by nobody: installed, then checked against
    # the run's own task flags by the plugin's checks
    assert plan.stages[0].name == "teacher"
    steps = stages["teacher"].steps(partial)
    assert all(isinstance(step, PyStep) for step in steps)
    check = steps[-1].fn
    assert check.func is check_multilingual_teacher
    assert check.args[1:4] == (
        partial(folder),
        plan.config.task_flags(),
        ["de-en", "cs-en"],
    )
    assert contains(check.args[2], ["--task", kdplan.MULTILINGUAL_TASK] + TASK)
    install = steps[1].fn
    install()
    for lang in LANGS:
        assert os.path.isfile(os.path.join(partial(folder), f"dict.{lang}.txt"))
    # every language encoded with the given model; nothing learnt
    mkdir, encode_step = stages["subword"].steps(partial)
    assert encode_step.fn.func is kdplan.encode_sentencepiece
    assert encode_step.fn.args[0] == os.path.join(folder, "spm.model")
    assert list(encode_step.fn.args[-1]) == list(LANGS)
    # each direction binarized with the teacher's dictionaries of its languages
    binarize = [s.argv for s in stages["binarize"].steps(partial)]
    assert [(flag(a, "--source-lang"), flag(a, "--target-lang")) for a in binarize] == [
        ("de", "en"),
        ("cs", "en"),
    ]
    for argv in binarize:
        src, tgt = flag(argv, "--source-lang"), flag(argv, "--target-lang")
        assert flag(argv, "--srcdict") == os.path.join(folder, f"dict.{src}.txt")
        assert flag(argv, "--tgtdict") == os.path.join(folder, f"dict.{tgt}.txt")
        assert "--dict-only" not in argv and "--joined-dictionary" not in argv
    # the students only, with the multilingual task; the tools and the live
    # teacher read the teacher's dictionaries from WORK/models/teacher
    trains = commands_of(plan, "fairseq-train")
    assert len(trains) == 3
    assert all(contains(a, TASK) and "--share-all-embeddings" in a for a in trains)
    tools = commands_of(plan, "fairseq-kd-dump-topk")
    tools += [a for a in trains if "--teacher-path" in a]
    assert len(tools) == 2
    assert all(flag(a, "--teacher-dict-dir") == folder for a in tools)
    assert plan.meta["teacher_given"]["checkpoint"] == os.path.join(given, "T.pt")


def test_the_teachers_langs_reach_every_model_and_tool(tmp_path):
    raw = fake_multi_parallel(str(tmp_path / "raw"))
    given = fake_teacher(str(tmp_path / "given"), ("de", "en"))
    argv = given_argv(raw, given, "--langs", "cs,de,en,fr")
    argv[argv.index(PAIRS)] = "de-en"
    cfg, _ = cli.make_config("multi30k", argv + ["--work", str(tmp_path / "w")])
    assert cfg.langs == ["de", "en"]  # the data's languages
    assert "--langs cs,de,en,fr" in cfg.command
    plan = kdplan.build_plan(cfg)
    check_well_formed(plan)
    assert plan.meta["langs"] == ["cs", "de", "en", "fr"]
    argvs = commands_of(plan, "fairseq-train") + commands_of(plan, "fairseq-generate")
    argvs += commands_of(plan, "fairseq-kd-dump-topk")
    argvs += commands_of(plan, "fairseq-kd-distill")
    assert argvs and all(flag(a, "--langs") == "cs,de,en,fr" for a in argvs)
    assert all(flag(a, "--lang-pairs") == "de-en" for a in argvs)


@pytest.mark.parametrize(
    "langs,more,message",
    [
        (("de", "en"), (), r"no dict\.cs\.txt \(nor one joined dict\.txt for every "),
        (LANGS, ("--langs", "de,en"), "--langs de,en lacks cs of --lang-pairs"),
        (LANGS, ("--langs", "cs,de,en,de"), "give each language once"),
    ],
)
def test_missing_dictionaries_and_bad_langs_are_refused(langs, more, message, tmp_path):
    raw = fake_multi_parallel(str(tmp_path / "raw"))
    given = fake_teacher(str(tmp_path / "given"), langs)
    with pytest.raises(SystemExit, match=message):
        cli.make_config("multi30k", given_argv(raw, given, *more))


def test_langs_needs_lang_pairs(tmp_path):
    raw = fake_multi_parallel(str(tmp_path / "raw"), ("de", "en"))
    with pytest.raises(SystemExit, match="give --lang-pairs too"):
        cli.make_config("multi30k", ["--data", raw, "--langs", "de,en"])


def test_languages_of_one_side_must_share_one_dictionary(tmp_path):
    raw = fake_multi_parallel(str(tmp_path / "raw"))
    given = fake_teacher(str(tmp_path / "given"), differ="cs")
    work = tmp_path / "w"
    argv = given_argv(raw, given, "--work", str(work), "--only", "teacher")
    with pytest.raises(ValueError) as e:
        cli.main(["multi30k"] + argv)  # refused before the checkpoint is read
    message = str(e.value)
    assert "the source languages de and cs have other dictionaries" in message
    assert "one source dictionary for every direction" in message
    assert not (work / "models" / "teacher").exists()
