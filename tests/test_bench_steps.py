"""Tests of the harness's building blocks: text, progress, commands, corpora."""

import gzip
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import MULTI30K, REPO

from kd_bench import cli, commands, data, evaluate, files
from kd_bench import plan as kdplan
from kd_bench.corpora import multi30k
from kd_bench.corpus import load_corpus
from kd_bench.preset import TrainSettings
from kd_bench.process import CommandError, Progress, run_command
from kd_bench.stage_runner import Command, Stage, StageRunner


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Ein  Mann\u00a0läuft. ", "Ein Mann läuft."),
        ("\tZwei Hunde\n", "Zwei Hunde"),
        ("ok", "ok"),
        ("a\u2009b\u3000c\u202fd", "a b c d"),  # thin, ideographic, narrow no-break
        ("", ""),
    ],
)
def test_normalise_line_collapses_every_unicode_space(raw, expected):
    assert data.normalise_line(raw) == expected


@pytest.mark.parametrize(
    "raw", ["ﬁne", "Straße", "x²", "ＡＢＣ", "…", "e\u0301"]  # NFKC would change these
)
def test_normalise_line_keeps_characters_as_published(raw):
    assert data.normalise_line(raw) == raw


def load_script(name):
    path = os.path.join(REPO, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_scripts_normalise_as_the_harness():
    # scripts/prepare_multi30k.py applied NFKC, the recipes did not: the same
    # corpus gave two different texts (and references)
    script = load_script("prepare_multi30k")
    for line in ("ﬁne\u00a0 day ", "x² …", "a\tb"):
        assert script.normalise(line) == data.normalise_line(line)


def test_generate_output_is_restored_to_corpus_order():
    out = "\n".join(
        [
            "S-2\tc",
            "H-2\t-0.1\t▁c",
            "D-2\t-0.1\tc",
            "H-0\t-0.2\t▁a",
            "D-0\t-0.2\ta",
            "H-1\t-0.3\t",
            "D-1\t-0.3\t",
        ]
    )
    assert commands.parse_generate_output(out) == ["a", "", "c"]
    with pytest.raises(RuntimeError, match="missing sentence ids"):
        commands.parse_generate_output("D-0\t-1\ta\nD-2\t-1\tc")


def test_corrupted_multi30k_file_is_refused(tmp_path):
    (tmp_path / "train.de").write_text("not the real data\n")
    stems = ["train.de", "train.en"]
    with pytest.raises(ValueError, match="sha256 .* differs"):
        data.verify_sha256(str(tmp_path), multi30k.SHA256, stems)
    # files without a published checksum (other languages) are not checked
    data.verify_sha256(str(tmp_path), multi30k.SHA256, ["train.fr"])


def test_published_checksums_are_of_the_unzipped_text(tmp_path):
    text = b"ein Hund\n"
    with gzip.open(tmp_path / "a.de.gz", "wb") as f:
        f.write(text)
    (tmp_path / "a.de").write_bytes(text)
    gz = str(tmp_path / "a.de.gz")
    assert files.sha256_file(gz, gunzip=True) == files.sha256_file(
        str(tmp_path / "a.de")
    )
    assert files.sha256_file(gz) != files.sha256_file(gz, gunzip=True)


def test_prepare_text_refuses_misaligned_sides(tmp_path):
    for split in ("train", "val", "test_2016_flickr"):
        (tmp_path / f"{split}.de").write_text("a\nb\n")
        (tmp_path / f"{split}.en").write_text("a\n")
    with pytest.raises(ValueError, match="2 de lines but 1 en lines"):
        data.prepare_text(
            str(tmp_path), str(tmp_path / "out"), "de", "en", multi30k.SPLITS
        )


def test_download_writes_atomically_and_skips_what_is_there(tmp_path):
    src = tmp_path / "remote.txt"
    src.write_text("corpus\n")
    dest = tmp_path / "raw" / "train.de"
    assert data.download(src.as_uri(), str(dest)) == str(dest)
    assert dest.read_text() == "corpus\n" and os.listdir(dest.parent) == ["train.de"]
    src.write_text("changed\n")
    data.download(src.as_uri(), str(dest))  # there already: not fetched again
    assert dest.read_text() == "corpus\n"
    with pytest.raises(OSError):
        data.download((tmp_path / "missing").as_uri(), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tmp")


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = str(tmp_path / "x.json")
    files.write_json(path, {"a": 1})
    with pytest.raises(ZeroDivisionError):
        with files.atomic_write(path) as f:
            f.write("half")
            1 / 0
    assert files.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize(
    "lengths,a,b,expected",
    [
        ([10, 3], 1.2, 10, int(1.2 * 11 + 10)),  # the longest source, with EOS
        ([1], 1.2, 10, 12),
        ([5, 5], 0, 200, 200),  # fairseq's old absolute bound
    ],
)
def test_ct2_length_bound_is_fairseqs(lengths, a, b, expected):
    assert commands.max_decoding_length(lengths, a, b) == expected


def test_ct2_batches_group_sources_of_similar_length():
    sources = [["x"] * n for n in (5, 1, 9, 2, 7)]
    batches = evaluate.length_batches(sources, 2)
    assert batches == [[1, 3], [0, 4], [2]]
    assert sorted(i for b in batches for i in b) == list(range(5))


# -- progress of long commands -------------------------------------------------


@pytest.mark.parametrize(
    "updates,interval", [(30, 1), (300, 15), (800, 40), (40000, 50)]
)
def test_training_logs_often_enough_for_progress(updates, interval):
    assert commands.log_interval(updates) == interval
    settings = TrainSettings(updates, "1e-3", 10, 1000, 0.1)
    argv = commands.train_command("BIN", "SAVE", [], settings, "de", "en")
    assert argv[argv.index("--log-interval") + 1] == interval


class Clock:
    """A fake time: each call returns the current value; tests move it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


TRAIN_LINE = (
    "2026-12-01 10:00:00 | INFO | train_inner | epoch 001:     {u} / 227 "
    "loss=7.{u}, nll_loss=6.9, ppl=120.5, wps=2200, ups=0.6, wpb=3800, bsz=120, "
    "num_updates={u}, lr=0.0005, gnorm=1.2, train_wall=80, gb_free=None, wall=90"
)


def test_training_progress_gives_updates_elapsed_and_time_left():
    clock = Clock()
    p = Progress("train", 400, "teacher", interval=0, clock=clock)
    assert p.feed("2026 | INFO | fairseq_cli.train | model transformer") is None
    clock.now += 100
    assert p.feed(TRAIN_LINE.format(u=100)) == (
        "    teacher: 100/400 updates (25%), 1m40s elapsed, ~5m00s left, loss 7.100"
    )
    clock.now += 100
    assert "200/400 updates (50%), 3m20s elapsed, ~3m20s left" in p.feed(
        TRAIN_LINE.format(u=200)
    )


def test_resumed_training_estimates_from_the_updates_of_this_run():
    clock = Clock()
    p = Progress("train", 400, "student:x", interval=0, clock=clock)
    clock.now += 5
    p.feed("| INFO | fairseq.trainer | Loaded checkpoint x (epoch 3 @ 300 updates)")
    clock.now += 50
    msg = p.feed(TRAIN_LINE.format(u=350))
    assert "350/400 updates (88%), 50.0s elapsed, ~50.0s left" in msg


def test_progress_lines_are_rate_limited_and_the_last_one_is_shown():
    clock = Clock()
    p = Progress("translate", 3, "test beam 5", interval=10, clock=clock)
    assert p.feed("H-0\t-0.1\ta") is not None  # the first one is shown
    clock.now += 1
    assert p.feed("H-1\t-0.1\tb") is None  # within 10 s of the last
    assert p.feed("D-1\t-0.1\tb") is None  # not a count
    clock.now += 1
    assert p.feed("H-2\t-0.1\tc") is None
    assert p.finish().startswith("    test beam 5: 3/3 sentences (100%), 2.0s")


def test_translation_time_left_leaves_out_the_model_loading():
    clock = Clock()
    p = Progress("translate", 1000, "test beam 1", interval=0, clock=clock)
    clock.now += 30  # loading the model
    assert "left" not in p.feed("H-0\t-0.1\ta")
    clock.now += 1
    for i in range(1, 101):
        msg = p.feed(f"H-{i}\t-0.1\ta")
    # 100 sentences in 1 s since the first: 899 left take ~9 s, not ~4.5 min
    assert msg.endswith("101/1000 sentences (10%), 31.0s elapsed, ~9.0s left")


def test_tqdm_bars_are_read_as_done_over_total():
    p = Progress("bar", label="topk:ref", interval=0, clock=Clock())
    msg = p.feed(" 45%|████▌     | 45/100 [00:10<00:12,  4.50it/s]")
    assert msg.startswith("    topk:ref: 45/100 done (45%)")
    # fairseq-kd-dump-topk's bar counts tokens with unit prefixes
    msg = p.feed("top-4 train:  49%|████▉     | 12.9k/26.1k [00:01<00:01, 11.8ktok/s]")
    assert msg.startswith("    topk:ref: 12.9k/26.1k done (49%)")


FAKE_TRAIN = textwrap.dedent("""
    import os, sys, time
    log, total = sys.argv[1], int(sys.argv[2])
    print("2026 | INFO | fairseq_cli.train | start")
    for u in range(50, total + 1, 50):
        print(f"epoch 001: {u} / 227 loss=5.5, num_updates={u}, lr=0.001")
    # the line must be in the stage log while this process still runs
    deadline = time.time() + 20
    while time.time() < deadline:
        if "num_updates=%d" % total in open(log).read():
            break
        time.sleep(0.05)
    else:
        sys.exit(3)
    print("done training", flush=False)
    sys.exit(int(sys.argv[3]))
    """)


def fake_train(tmp_path, total=200, status=0, log=None):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    log = log or tmp_path / "train.log"
    return [sys.executable, str(script), str(log), str(total), str(status)], log


def test_output_reaches_the_log_line_by_line_while_the_command_runs(tmp_path):
    argv, log = fake_train(tmp_path)
    out = io.StringIO()
    progress = Progress("train", 200, "teacher", interval=0)
    output = run_command(argv, log_file=str(log), progress=progress, out=out)
    assert "done training" in output and log.read_text() == output
    lines = out.getvalue().splitlines()
    assert [x.split(":")[1].split()[0] for x in lines] == [
        "50/200",
        "100/200",
        "150/200",
        "200/200",
    ]
    assert "left" in lines[0] and "left" not in lines[-1]


def test_a_failed_stage_prints_the_last_lines_of_its_log(tmp_path):
    log = tmp_path / "stamps" / "logs" / "teacher.0.log"
    argv, _ = fake_train(tmp_path, total=1500, status=2, log=log)
    out = io.StringIO()
    stage = Stage(
        "teacher",
        [str(tmp_path / "model")],
        lambda tmp: [Command(argv)],
        group="teacher",
    )
    runner = StageRunner([stage], str(tmp_path / "stamps"), out=out)
    with pytest.raises(CommandError) as e:
        runner.run()
    text = out.getvalue()
    assert "stage teacher failed: exit code 2; last 25 lines of " in text
    assert "teacher.0.log:" in text
    assert "    | done training" in text
    assert "num_updates=1500," in text and "num_updates=50," not in text
    assert e.value.returncode == 2 and len(e.value.tail) == 25


# -- the plugin never imports the harness --------------------------------------


def test_the_plugin_and_its_tools_never_import_the_harness():
    code = textwrap.dedent("""
        import sys
        import fairseq_kd, fairseq_kd.distill, fairseq_kd.dump_topk
        import fairseq_kd.export, fairseq_kd.tasks.translation_kd
        import fairseq_kd.criterions.word_kd
        bad = sorted(m for m in sys.modules if m.split(".")[0] == "kd_bench")
        print(bad)
        sys.exit(1 if bad else 0)
        """)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    sources = []
    for root, _, names in os.walk(os.path.join(REPO, "fairseq_kd")):
        sources += [os.path.join(root, n) for n in names if n.endswith(".py")]
    assert not [p for p in sources if "kd_bench" in open(p).read()]


def test_the_harness_assumes_no_source_checkout(tmp_path):
    # run from elsewhere: the default work folder is under the current folder
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("src", "tgt"):
            (raw / f"{split}.{lang}").write_text("a b\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-m", "kd_bench", "folder", "--data", str(raw), "--list"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "student:baseline" in proc.stdout
    cfg, _ = cli.make_config("folder", ["--data", str(raw)])
    assert cfg.paths.work == os.path.join(
        os.getcwd(), "work", "folder", "src-tgt.cpu.spm"
    )
    for root, _, names in os.walk(os.path.join(REPO, "kd_bench")):
        for n in names:
            if n.endswith(".py"):
                assert "__file__" not in open(os.path.join(root, n)).read(), n


# -- corpora: descriptors and a folder of the user's own files ----------------


def test_a_descriptor_file_is_a_recipe(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem in ("tr", "dv", "ts"):
        for lang in ("xx", "yy"):
            (raw / f"{stem}.{lang}").write_text("a b\nc\n")
    descriptor = tmp_path / "mine.py"
    descriptor.write_text(textwrap.dedent("""
            '''My corpus.'''
            from kd_bench.corpus import Corpus
            from kd_bench.preset import TINY

            CORPUS = Corpus(
                key="mine", title="Mine", src="xx", tgt="yy",
                splits={"train": "tr", "valid": "dv", "test": "ts"},
                eval_sets={"test": "ts", "valid": "dv"},
                presets={"tiny": TINY}, default_preset="tiny",
            )
            """))
    corpus = load_corpus(str(descriptor))
    assert corpus.title == "Mine"
    cfg, _ = cli.make_config(str(descriptor), ["--data", str(raw), "--work", "w"])
    plan = kdplan.build_plan(cfg)
    inputs = sorted(os.path.basename(p) for p in plan.stages[0].inputs)
    assert inputs == sorted(
        f"{s}.{x}" for s in ("tr", "dv", "ts") for x in ("xx", "yy")
    )
    with pytest.raises(SystemExit, match="unknown corpus 'nope'"):
        load_corpus("nope")


@pytest.mark.skipif(MULTI30K is None, reason="Multi30k is not on this machine")
def test_a_folder_of_your_own_files_is_a_recipe(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    for split, stem, n in (
        ("train", "train", 300),
        ("valid", "val", 20),
        ("test", "test_2016_flickr", 20),
    ):
        for lang in ("de", "en"):
            lines = files.read_lines(files.find_file(MULTI30K, f"{stem}.{lang}"), n)
            (own / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    work = tmp_path / "w"
    argv = ["folder", "--data", str(own), "--src", "de", "--tgt", "en"]
    argv += ["--preset", "tiny", "--work", str(work), "--only", "data"]
    plan = cli.main(argv)
    assert plan.meta["corpus"] == "your corpus" and plan.meta["pair"] == "de-en"
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (work / "bin" / f"{split}.de-en.{lang}.bin").exists()
    raw = files.read_lines(str(own / "test.en"))
    assert files.read_lines(str(work / "text" / "test.en")) == [
        data.normalise_line(x) for x in raw
    ]


HARNESS_RUNNING_A_CHILD = textwrap.dedent("""
    import sys
    from kd_bench import cli
    from kd_bench.process import run_command
    child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid()))"
    child += "; time.sleep(120)"
    # the console script's entry point, with a recipe that runs one long command
    cli.main = lambda argv: run_command([sys.executable, "-c", child, sys.argv[1]])
    cli.entry()
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_terminated_harness_leaves_no_command_running(tmp_path, sig):
    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": REPO}
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS_RUNNING_A_CHILD, str(pid_file)],
        env=env,
        # SIGINT as a terminal's foreground job has it: a shell starts a
        # background job (`pytest &`, nohup) with SIGINT ignored, the harness
        # inherits that, and rightly ignores the test's SIGINT too
        preexec_fn=_sigint_default,
    )
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _alive(child)
    harness.send_signal(sig)  # to the harness only, as `kill PID` does
    assert harness.wait(timeout=30) != 0
    deadline = time.time() + 15
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the command went on after the harness was terminated"
