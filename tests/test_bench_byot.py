"""Tests of the harness with a teacher given (--teacher-checkpoint): none trained."""

import os
import shutil

import corpus
import pytest
from test_bench_plan import check_well_formed, fake_multi30k, plan_for

from kd_bench import cli, evaluate, files, report
from kd_bench.plan import Paths
from kd_bench.stage_runner import Command, PyStep
from kd_bench.stage_runner import tmp_path as partial
from kd_bench.teacher import GIVEN_JSON

SPLITS = ("train", "valid", "test")
LANGS = ("src", "tgt")


def train_spm(text_dir, prefix, vocab=60, langs=LANGS):
    """A joint sentencepiece model of the synthetic corpus (a second or two):
    the train text of every language of ``langs``."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(os.path.join(text_dir, f"train.{x}") for x in langs),
        model_prefix=prefix,
        vocab_size=vocab,
        model_type="unigram",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


def encode(model, lines):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    return [" ".join(sp.encode(x, out_type=str)) for x in lines]


@pytest.fixture(scope="module")
def own_teacher(corpus_text, tmp_path_factory):
    """A teacher trained by hand, as a user brings it: checkpoint, dicts, spm."""
    root = tmp_path_factory.mktemp("own_teacher")
    model = train_spm(corpus_text, str(root / "spm"))
    pieces = root / "pieces"
    pieces.mkdir()
    for split in SPLITS:
        for lang in LANGS:
            lines = files.read_lines(os.path.join(corpus_text, f"{split}.{lang}"))
            files.write_lines(str(pieces / f"{split}.{lang}"), encode(model, lines))
    bin_dir = corpus.binarize(str(pieces), str(root / "bin"))
    save = root / "checkpoints"
    corpus.train(
        bin_dir,
        str(save),
        ["--criterion", "label_smoothed_cross_entropy", "--disable-validation"],
        updates=10,
    )
    return {
        "checkpoint": str(save / "checkpoint_last.pt"),
        "dict_dir": bin_dir,
        "spm": model,
    }


def byot_argv(corpus_text, work, teacher, *more):
    return [
        "folder",
        "--data",
        corpus_text,
        "--preset",
        "tiny",
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


def perturb(checkpoint):
    """Another teacher at the same path: the weights moved a little."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key, value in state["model"].items():
        if value.is_floating_point() and value.numel() > 1:
            state["model"][key] = value + 0.01
    torch.save(state, checkpoint)


def stage_lines(text):
    """``{stage: what the runner said}`` of a run's console output."""
    out = {}
    for line in text.splitlines():
        if line.startswith("[") and "] " in line and ": " in line:
            name, said = line.split("] ", 1)[1].split(": ", 1)
            out[name] = said
    return out


def test_a_given_teacher_is_distilled_without_training_one(
    own_teacher, corpus_text, tmp_path, capsys
):
    teacher = {**own_teacher, "checkpoint": str(tmp_path / "given" / "teacher.pt")}
    os.makedirs(os.path.dirname(teacher["checkpoint"]))
    shutil.copy(own_teacher["checkpoint"], teacher["checkpoint"])
    work = tmp_path / "w"
    base = byot_argv(corpus_text, work, teacher, "--rows", "word-kd-live")
    plan = cli.main(base + ["--only", "teacher,data,student:word-kd-live"])
    # no teacher was trained: the stage only checks, links and copies
    stage = next(s for s in plan.stages if s.name == "teacher")
    assert plan.stages[0] is stage
    assert all(isinstance(step, PyStep) for step in stage.steps(partial))
    logs = sorted(os.listdir(work / "logs"))
    assert logs == ["binarize.0.log", "student__word-kd-live.0.log"]
    link = work / "models" / "teacher" / "checkpoint_last.pt"
    assert os.path.islink(link)
    assert os.path.realpath(link) == os.path.realpath(teacher["checkpoint"])
    assert not (work / "models" / "teacher" / "train_time.json").exists()
    given = files.read_json(str(work / "models" / "teacher" / GIVEN_JSON))
    assert given["sha256"] == files.sha256_file(teacher["checkpoint"])
    assert given["params"] == evaluate.count_parameters(teacher["checkpoint"])
    # the data: the teacher's sentencepiece model, then its dictionaries
    for split in SPLITS:
        for lang in LANGS:
            text = files.read_lines(str(work / "text" / f"{split}.{lang}"))
            pieces = files.read_lines(str(work / "subword" / f"{split}.{lang}"))
            assert pieces == encode(teacher["spm"], text)
    for lang in LANGS:
        mine = (work / "bin" / f"dict.{lang}.txt").read_bytes()
        theirs = open(os.path.join(teacher["dict_dir"], f"dict.{lang}.txt"), "rb")
        assert mine == theirs.read()
    # the student learnt from the live teacher, over the teacher's vocabulary
    import torch

    student = torch.load(
        work / "models" / "word-kd-live" / "checkpoint_last.pt", weights_only=False
    )
    embed = "encoder.embed_tokens.weight"
    vocab = torch.load(teacher["checkpoint"], weights_only=False)["model"][embed]
    assert student["model"][embed].shape[0] == vocab.shape[0]
    log = (work / "logs" / "student__word-kd-live.0.log").read_text()
    assert "kd_loss" in log

    # another teacher at the same path: the teacher stage and what reads the
    # checkpoint rerun; the data stages do not (same spm model, same dicts)
    perturb(teacher["checkpoint"])
    capsys.readouterr()
    cli.main(base + ["--dry-run"])
    said = stage_lines(capsys.readouterr().out)
    assert said["teacher"] == f"would run (input changed: {teacher['checkpoint']})"
    cli.main(base + ["--only", "teacher"])
    capsys.readouterr()
    cli.main(base + ["--dry-run"])
    said = stage_lines(capsys.readouterr().out)
    for name in ("teacher", "normalise", "subword", "binarize"):
        assert said[name] == "up to date, skipped", name
    # (the runner prints the work folder as $WORK)
    changed = "input changed: $WORK/models/teacher/checkpoint_last.pt"
    assert said["student:word-kd-live"] == f"would run ({changed})"


def test_a_teacher_whose_dictionaries_do_not_fit_is_refused(
    own_teacher, corpus_text, tmp_path
):
    bad = tmp_path / "dicts"
    bad.mkdir()
    for lang in LANGS:
        text = open(os.path.join(own_teacher["dict_dir"], f"dict.{lang}.txt")).read()
        (bad / f"dict.{lang}.txt").write_text(
            text + "".join(f"x{i} 1\n" for i in range(8))
        )
    teacher = {**own_teacher, "dict_dir": str(bad)}
    work = tmp_path / "w"
    with pytest.raises(ValueError) as e:
        cli.main(byot_argv(corpus_text, work, teacher, "--only", "teacher"))
    message = str(e.value)
    assert f"--teacher-dict-dir {bad} does not fit --teacher-checkpoint" in message
    assert "symbols" in message  # the plugin's check says what differs
    assert not (work / "models" / "teacher").exists()


def fake_teacher(folder, dicts=("de", "en"), same=True):
    """Files named like a teacher's (for plans only: nothing loads them)."""
    os.makedirs(folder, exist_ok=True)
    paths = {"checkpoint": os.path.join(folder, "T.pt")}
    for name in ("T.pt", "spm.model", "bpe.codes"):
        open(os.path.join(folder, name), "w").close()
    for i, lang in enumerate(dicts):
        with open(os.path.join(folder, f"dict.{lang}.txt"), "w") as f:
            f.write("a 1\nb 1\n" if same or i == 0 else "c 1\n")
    return paths


@pytest.mark.parametrize(
    "dicts,same,flags",
    [
        (("de", "en"), True, ["--srcdict", "$D/dict.de.txt", "--joined-dictionary"]),
        ((None,), True, ["--srcdict", "$D/dict.de.txt", "--joined-dictionary"]),
        (
            ("de", "en"),
            False,
            ["--srcdict", "$D/dict.de.txt", "--tgtdict", "$D/dict.en.txt"],
        ),
    ],
)
def test_the_given_dictionaries_binarize_and_shape_the_students(
    dicts, same, flags, tmp_path
):
    given = tmp_path / "given"
    fake_teacher(str(given), ["de", "en"] if dicts[0] else [], same)
    if dicts[0] is None:  # one joined dict.txt
        (given / "dict.txt").write_text("a 1\n")
    raw = fake_multi30k(str(tmp_path / "raw"), "de", "en")
    argv = ["--data", raw, "--teacher-checkpoint", str(given / "T.pt")]
    argv += [
        "--teacher-dict-dir",
        str(given),
        "--teacher-spm",
        str(given / "spm.model"),
    ]
    argv += ["--work", str(tmp_path / "w"), "--rows", "baseline,word-kd,word-kd-live"]
    plan = plan_for("multi30k", argv)
    check_well_formed(plan)
    stages = {s.name: s for s in plan.stages}
    folder = os.path.join(plan.work, "models", "teacher")
    (argv,) = [step.argv for step in stages["binarize"].steps(partial)]
    got = argv[argv.index("--destdir") + 2 : -2]
    assert [str(a).replace(folder, "$D") for a in got] == flags
    commands = [
        step.argv
        for s in plan.stages
        for step in s.steps(partial)
        if isinstance(step, Command)
    ]
    trains = [argv for argv in commands if argv[0] == "fairseq-train"]
    assert len(trains) == 3  # the students; no teacher
    both = ["--share-all-embeddings", "--share-decoder-input-output-embed"]
    shared, other = both if same else both[::-1]
    assert all(shared in argv and other not in argv for argv in trains)
    # the plugin's tools compare the teacher with the teacher's own dictionaries
    tools = [a for a in commands if a[0] == "fairseq-kd-dump-topk"]
    tools += [a for a in commands if "--teacher-path" in a]
    assert len(tools) == 2
    assert all(a[a.index("--teacher-dict-dir") + 1] == folder for a in tools)


def test_the_teachers_bpe_codes_are_applied_not_learnt(tmp_path):
    given = tmp_path / "given"
    fake_teacher(str(given))
    raw = fake_multi30k(str(tmp_path / "raw"), "de", "en")
    argv = ["--data", raw, "--teacher-checkpoint", str(given / "T.pt")]
    argv += [
        "--teacher-dict-dir",
        str(given),
        "--teacher-bpe-codes",
        str(given / "bpe.codes"),
    ]
    cfg, _ = cli.make_config("multi30k", argv + ["--work-root", str(tmp_path)])
    assert cfg.subword == "bpe"
    assert cfg.paths.work == str(tmp_path / "de-en.cpu.bpe.given")
    assert "--teacher-bpe-codes" in cfg.command and "--subword" not in cfg.command
    plan = plan_for("multi30k", argv + ["--work", str(tmp_path / "w")])
    check_well_formed(plan)
    steps = [s for s in plan.stages if s.name == "subword"][0].steps(partial)
    codes = os.path.join(plan.work, "models", "teacher", "bpe.codes")
    bpe = [step.argv for step in steps if isinstance(step, Command)]
    assert len(bpe) == 6 and all(
        argv[1:4] == ["apply-bpe", "--codes", codes] for argv in bpe
    )
    text = " ".join(
        str(a)
        for s in plan.stages
        for st in s.steps(partial)
        for a in getattr(st, "argv", [])
    )
    assert "learn-joint-bpe" not in text and "--post-process subword_nmt" in text
    assert plan.meta["teacher_given"]["subword_model"] == str(given / "bpe.codes")
    assert plan.meta["settings"]["teacher_arch"] is None


@pytest.mark.parametrize(
    "options,message",
    [
        (["--teacher-dict-dir", "G"], "--teacher-dict-dir needs --teacher-checkpoint"),
        (
            ["--teacher-checkpoint", "G/T.pt", "--teacher-spm", "G/spm.model"],
            "needs --teacher-dict-dir",
        ),
        (
            ["--teacher-checkpoint", "G/T.pt", "--teacher-dict-dir", "G"],
            "needs the teacher's subword model",
        ),
        (
            [
                "--teacher-checkpoint",
                "G/T.pt",
                "--teacher-dict-dir",
                "G/none",
                "--teacher-spm",
                "G/spm.model",
            ],
            "--teacher-dict-dir G/none: no such folder",
        ),
        (
            [
                "--teacher-checkpoint",
                "G/T.pt",
                "--teacher-dict-dir",
                "G/empty",
                "--teacher-spm",
                "G/spm.model",
            ],
            "no dict.de.txt and dict.en.txt",
        ),
        (
            [
                "--teacher-checkpoint",
                "G/no.pt",
                "--teacher-dict-dir",
                "G",
                "--teacher-spm",
                "G/spm.model",
            ],
            "--teacher-checkpoint G/no.pt: no such file",
        ),
        (
            [
                "--teacher-checkpoint",
                "G/T.pt",
                "--teacher-dict-dir",
                "G",
                "--teacher-spm",
                "G/spm.model",
                "--subword",
                "bpe",
            ],
            "--subword bpe contradicts --teacher-spm",
        ),
    ],
)
def test_teacher_options_are_checked_before_anything_runs(options, message, tmp_path):
    given = tmp_path / "given"
    fake_teacher(str(given))
    (given / "empty").mkdir()
    raw = fake_multi30k(str(tmp_path / "raw"), "de", "en")
    options = [o.replace("G", str(given)) if o.startswith("G") else o for o in options]
    message = message.replace("G/", str(given) + "/")
    with pytest.raises(SystemExit, match=message):
        cli.make_config("multi30k", ["--data", raw] + options)


def test_the_report_says_the_teacher_was_given(tmp_path):
    paths = Paths(work=str(tmp_path), raw="", results="")
    refs = ["a b", "c d"]
    for split in ("test", "valid"):
        files.write_lines(os.path.join(paths.text, f"{split}.en"), refs)
        for beam in (1, 5):
            out = os.path.join(paths.translations("teacher"), f"{split}.beam{beam}")
            files.write_lines(out + ".txt", refs)
            files.write_json(out + ".json", {"sentences_per_second": 10.0})
    model = tmp_path / "models" / "teacher"
    given = {"checkpoint": "/models/T.pt", "sha256": "ab" * 32, "params": 1234}
    files.write_json(str(model / GIVEN_JSON), {**given, "dict_dir": "/models"})
    scores = str(tmp_path / "scores.json")
    evaluate.compute_scores(
        paths,
        {"teacher": str(model / "checkpoint_last.pt")},
        {"test": "test", "valid": "valid"},
        "en",
        {},
        scores,
    )
    entry = files.read_json(scores)["models"]["teacher"]
    assert entry["params"] == 1234 and "train_seconds" not in entry
    assert entry["given"] == {"checkpoint": "/models/T.pt", "sha256": "ab" * 32}
    meta = {
        "rows": [{"name": "teacher", "label": "teacher (given)"}],
        "settings": {"teacher_arch": None, "teacher_train": None},
        "subword": "spm",
        "teacher_given": {
            "checkpoint": "/models/T.pt",
            "dict_dir": "/models",
            "subword": "spm",
            "subword_model": "/models/spm.model",
        },
    }
    results = report.build_results(files.read_json(scores), meta)
    assert results["rows"][0]["given"]["sha256"] == "ab" * 32
    md = report.render_markdown(results)
    assert (
        "- teacher: given, not trained by this run: `/models/T.pt` (sha256 " + "ab" * 32
        in md
    )
    assert "- subwords: spm, the teacher's own `/models/spm.model`" in md
    assert "| teacher (given) | 0.0M | – |" in md
