"""Weights-only loading, and ``fairseq-kd-export`` loaded without the plugin."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import REPO, USER_DIR
from corpus import STUDENT_ARCH, TINY_ARCH, run, train
from multi_corpus import task_flags

from fairseq_kd.checkpoints import UnsafeCheckpointError, load_checkpoint
from kd_bench import commands, evaluate, process
from kd_bench.preset import TINY, TrainSettings

# A source batch and target prefix for comparing logits (ids inside the tiny
# corpus' joined dictionary: 4 .. 95 are words).
SRC = [[10, 11, 12, 13, 2], [20, 21, 22, 2, 1]]
PREV = [[2, 50, 51, 52], [2, 60, 61, 1]]


def crafted_checkpoint(source, dest):
    """A copy of ``source`` whose ``cfg`` is pickled as an omegaconf DictConfig.

    fairseq before the plain-dict configs saved checkpoints this way; torch's
    weights-only loading refuses the omegaconf classes.
    """
    from omegaconf import OmegaConf

    state = torch.load(source, map_location="cpu", weights_only=False)
    state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    torch.save(state, dest)
    return str(dest)


# ------------------------------------------------------------ item 11: loading


def test_fairseq_train_checkpoint_loads_weights_only_without_warning(
    teacher, monkeypatch
):
    # the user's own switch does not turn the helper's first try into a full
    # unpickling: a fairseq-train checkpoint passes with no fallback allowed
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_checkpoint(teacher, trusted_fallback=False)
    assert state["cfg"].task._name == "translation"
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    # and it really holds nothing but Namespace, tensors and plain types
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(teacher)
    assert unsafe == []  # argparse.Namespace is allow-listed by the plugin


def test_other_pickled_objects_need_a_user_named_file(teacher, tmp_path, monkeypatch):
    path = crafted_checkpoint(teacher, tmp_path / "old-style.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="old-style.pt"):
        load_checkpoint(path, trusted_fallback=False)
    with pytest.warns(UserWarning, match=r"old-style\.pt.*full unpickling") as record:
        state = load_checkpoint(path, trusted_fallback=True)
    assert "omegaconf" in str(record[0].message)  # names what was refused
    assert state["cfg"].task._name == "translation"
    # the recipes count parameters of their own files: no fallback there
    with pytest.raises(UnsafeCheckpointError, match="old-style.pt"):
        evaluate.count_parameters(path)
    assert evaluate.count_parameters(teacher) == sum(
        v.numel()
        for k, v in load_checkpoint(teacher)["model"].items()
        if not k.endswith("_float_tensor")
    )


def test_teacher_needing_full_unpickling_loads_with_a_warning(
    data_bin, teacher, tmp_path
):
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from fairseq_kd.checkpoints import load_teacher_ensemble

    resolved = {"dataset_impl": "mmap", "train_subset": "train"}
    cfg = TranslationConfig(data=data_bin, required_seq_len_multiple=1, **resolved)
    task = TranslationTask.setup_task(cfg)
    path = crafted_checkpoint(teacher, tmp_path / "old-teacher.pt")
    with pytest.warns(UserWarning, match="old-teacher.pt"):
        (model,) = load_teacher_ensemble(path, task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (reference,) = load_teacher_ensemble(teacher, task)
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values()
    ):
        assert torch.equal(a, b), name


def test_recipe_environment_and_commands_do_not_force_unpickling(monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    env = process.child_env()
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    settings = TrainSettings(1, "1", 1, 1, 0)
    # every fairseq command that loads a checkpoint gets the plugin, once
    gen = commands.generate_command(
        "BIN", "ckpt.pt", "test", 5, "de", "en", TINY, "spm"
    )
    assert gen[gen.index("--user-dir") + 1] == commands.plugin_dir() == USER_DIR
    for extra in ([], ["--user-dir", USER_DIR, "--task", "translation_kd"]):
        cmd = commands.train_command("BIN", "SAVE", [], settings, "de", "en", (), extra)
        assert cmd.count("--user-dir") == 1
    ct2 = commands.ct2_convert_command("ckpt.pt", "BIN", "de", "en", "OUT")
    assert "--unsafe_deserialization" not in ct2
    assert ct2[ct2.index("--user_dir") + 1] == USER_DIR


# ------------------------------------------------------ item 12: the export


@pytest.fixture(scope="module")
def student(data_bin, teacher, tmp_path_factory):
    """A word-KD student trained through the real CLI (a few updates)."""
    save = str(tmp_path_factory.mktemp("kd-student"))
    train(
        data_bin,
        save,
        ["--user-dir", USER_DIR, "--task", "translation_kd"]
        + ["--teacher-path", teacher, "--criterion", "word_kd"]
        + ["--kd-alpha", "0.5", "--kd-temperature", "2", "--label-smoothing", "0.1"],
        arch=STUDENT_ARCH,
        updates=30,
    )
    return os.path.join(save, "checkpoint_last.pt")


def export_with_the_tool(checkpoint, out, ct2):
    """``fairseq-kd-export CHECKPOINT --copy-dicts --ct2 CT2`` into ``out``."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_kd.export", checkpoint]
        + ["--output", str(out / "student.pt"), "--copy-dicts", "--ct2", ct2],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "full unpickling" not in proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def exported(student, data_bin, tmp_path_factory):
    """``fairseq-kd-export student --copy-dicts --ct2 int8`` into a fresh folder."""
    return export_with_the_tool(student, tmp_path_factory.mktemp("exported"), "int8")


# Run first in every plugin-free process: fairseq_kd cannot be imported (the
# venv holds an editable install of it), torch loads weights-only whatever the
# call asks, and the worktree is not on sys.path.
NO_PLUGIN = """
import importlib.abc, os, sys
class _NoPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fairseq_kd" or name.startswith("fairseq_kd."):
            raise ImportError("the plugin must not be imported here")
sys.meta_path.insert(0, _NoPlugin())
assert not any(os.path.isdir(os.path.join(p or ".", "fairseq_kd")) for p in sys.path)
"""


def run_without_plugin(code, cwd, args=()):
    """Run ``code`` in a fresh Python without the plugin; return its stdout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    env.update(OMP_NUM_THREADS="1", TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")
    script = (
        NO_PLUGIN + textwrap.dedent(code) + "\nassert 'fairseq_kd' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script] + [str(a) for a in args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def test_export_loads_weights_only_without_plugin(exported, student):
    out = run_without_plugin(
        """
        import json, torch
        state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
        print(json.dumps({
            "args": state["args"] is None,
            "unsafe": torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1]),
            "task": state["cfg"]["task"],
            "criterion": state["cfg"]["criterion"],
            "model_keys": sorted(state["cfg"]["model"]),
            "user_dir": state["cfg"]["common"]["user_dir"],
            "keys": sorted(state),
        }))
        """,
        exported,
        [exported / "student.pt"],
    )
    info = json.loads(out.splitlines()[-1])
    assert info["args"] and info["unsafe"] == []
    assert info["task"]["_name"] == "translation"
    assert not any(k.startswith("teacher") for k in info["task"])
    assert info["criterion"] == {
        "_name": "label_smoothed_cross_entropy",
        "label_smoothing": 0.1,
        "report_accuracy": False,
        "ignore_prefix_size": 0,
        "sentence_avg": False,
    }
    assert not any(k.startswith(("teacher", "kd_")) for k in info["model_keys"])
    assert info["user_dir"] is None
    assert "last_optimizer_state" not in info["keys"]
    # the original needs the plugin's Namespace allow-listing and names its task
    original = torch.load(student, map_location="cpu", weights_only=False)
    assert original["cfg"]["task"]["_name"] == "translation_kd"
    assert "last_optimizer_state" in original


def test_export_gives_the_students_logits_and_translations_without_plugin(
    exported, student, data_bin
):
    from fairseq import checkpoint_utils
    from fairseq.models.transformer import TransformerModel

    # the original, loaded with the plugin (this process imported it)
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([student])
    assert type(task).__name__ == "TranslationKDTask"
    model.eval()
    src = torch.tensor(SRC)
    with torch.no_grad():
        logits, _ = model(src, (src != 1).sum(1), torch.tensor(PREV))
    lines = ["s1 s2 s3", "s5 s6 s7 s8", "s0 s9"]
    hub = TransformerModel.from_pretrained(
        os.path.dirname(student),
        checkpoint_file=os.path.basename(student),
        data_name_or_path=data_bin,
    )
    expected = [hub.translate(x, beam=2) for x in lines]

    out = run_without_plugin(
        """
        import json, torch
        from fairseq import checkpoint_utils
        from fairseq.models.transformer import TransformerModel
        ckpt, data = sys.argv[1:3]
        src, prev, lines = map(json.loads, sys.argv[3:])
        (model,), cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [ckpt], arg_overrides={"data": data})
        model.eval()
        src = torch.tensor(src)
        with torch.no_grad():
            logits, _ = model(src, (src != 1).sum(1), torch.tensor(prev))
        torch.save(logits, "logits.pt")
        found = {"task": type(task).__name__}
        folder, name = os.path.split(ckpt)
        for key, kw in (("with_data", {"data_name_or_path": data}), ("dicts_only", {})):
            hub = TransformerModel.from_pretrained(folder, checkpoint_file=name, **kw)
            found[key] = [hub.translate(x, beam=2) for x in lines]
        print(json.dumps(found))
        """,
        exported,
        [exported / "student.pt", data_bin, json.dumps(SRC), json.dumps(PREV)]
        + [json.dumps(lines)],
    )
    found = json.loads(out.splitlines()[-1])
    assert found["task"] == "TranslationTask"
    exported_logits = torch.load(exported / "logits.pt", weights_only=True)
    assert exported_logits.shape == logits.shape  # B x T x V
    assert torch.allclose(exported_logits, logits, rtol=1e-5, atol=1e-6)
    assert found["with_data"] == expected
    assert found["dicts_only"] == expected  # the copied dictionaries suffice


def hypotheses(output):
    return sorted(line for line in output.splitlines() if line.startswith("H-"))


def test_stock_generate_on_export_matches_the_student_with_plugin(
    exported, student, data_bin
):
    flags = ["--gen-subset", "test", "--beam", "2", "--batch-size", "16", "--cpu"]
    flags += ["--required-batch-size-multiple", "1"]
    # the original, with the plugin: weights-only loading works through it
    with_plugin = run(
        ["fairseq-generate", data_bin, "--path", student, "--user-dir", USER_DIR]
        + flags,
        env={"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
    ).stdout
    out = run_without_plugin(
        """
        from fairseq_cli.generate import cli_main
        sys.argv = ["fairseq-generate"] + sys.argv[1:]
        cli_main()
        """,
        exported,
        [data_bin, "--path", exported / "student.pt"] + flags,
    )
    assert len(hypotheses(with_plugin)) == 60
    assert hypotheses(out) == hypotheses(with_plugin)


def test_export_ct2_model_translates_without_plugin(exported, data_bin):
    out = run_without_plugin(
        """
        import json, ctranslate2
        translator = ctranslate2.Translator(sys.argv[1], device="cpu")
        batch = [["s1", "s2", "s3"], ["s4", "s5"]]
        res = translator.translate_batch(batch, beam_size=2)
        print(json.dumps([r.hypotheses[0] for r in res]))
        """,
        exported,
        [exported / "ct2-int8"],
    )
    hyps = json.loads(out.splitlines()[-1])
    with open(os.path.join(data_bin, "dict.tgt.txt")) as f:
        vocab = {line.split()[0] for line in f}
    assert len(hyps) == 2 and all(hyps)
    assert all(tok in vocab for hyp in hyps for tok in hyp)
    with open(exported / "ct2-int8" / "config.json") as f:
        assert json.load(f)["add_source_eos"] is True


def test_recipe_ct2_conversion_needs_no_unsafe_loading(student, data_bin, tmp_path):
    out = tmp_path / "ct2"
    process.run_command(
        commands.ct2_convert_command(student, data_bin, "src", "tgt", out)
    )
    assert (out / "model.bin").is_file()


def test_ct2_engine_converts_a_teacher_weights_only_first(teacher, data_bin, tmp_path):
    from fairseq_kd.seqkd import ct2_engine

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ct2_engine.convert_teacher(teacher, data_bin, "src", "tgt", tmp_path)
    assert os.path.isfile(os.path.join(out, "model.bin"))
    old = crafted_checkpoint(teacher, tmp_path / "old-teacher.pt")
    with pytest.raises(pickle.UnpicklingError, match="old-teacher.pt"):
        ct2_engine.convert_fairseq(old, data_bin, "src", "tgt", str(tmp_path / "a"))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.warns(UserWarning, match="old-teacher.pt"):
        out = ct2_engine.convert_teacher(old, data_bin, "src", "tgt", str(work))
    assert os.path.isfile(os.path.join(out, "model.bin"))


# ------------------------------------------- issue 12: a multilingual student

MULTI_TASK = "translation_multi_simple_epoch"
DIRECTIONS = ("de-en", "en-de", "cs-en")
MULTI_UPDATES = 100


@pytest.fixture(scope="module")
def multi_student(multi_bin, multi_teacher, tmp_path_factory):
    """A word-KD student of translation_multi_simple_epoch_kd (a few seconds)."""
    save = str(tmp_path_factory.mktemp("multi-student"))
    flags = ["--task", f"{MULTI_TASK}_kd", *task_flags()]
    flags += ["--teacher-path", multi_teacher, "--criterion", "word_kd"]
    flags += ["--kd-alpha", "0.1", "--label-smoothing", "0.1", "--lr", "0.01"]
    flags += ["--warmup-updates", "10", "--disable-validation"]
    flags += ["--save-interval", "1000"]  # one checkpoint, at the end
    train(multi_bin, save, flags, arch=TINY_ARCH, updates=MULTI_UPDATES)
    return os.path.join(save, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def multi_exported(multi_student, tmp_path_factory):
    """``fairseq-kd-export`` of the multilingual student, with float32 CTranslate2."""
    out = tmp_path_factory.mktemp("multi-exported")
    return export_with_the_tool(multi_student, out, "float32")


# fairseq-generate's main() on each direction in one process; prints
# {direction: {sentence id: "H" line}}
GENERATE_DIRECTIONS = """
import json
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli.generate import main
found = {}
for pair, argv in json.loads(sys.argv[1]).items():
    parser = options.get_generation_parser()
    main(convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv)))
    path = os.path.join(argv[argv.index("--results-path") + 1], "generate-valid.txt")
    with open(path) as f:
        lines = [line.rstrip("\\n").split("\\t") for line in f]
    found[pair] = {h[0][2:]: h[1:] for h in lines if h[0].startswith("H-")}
print(json.dumps(found))
"""


def generate_directions(checkpoint, data, results, task, extra=()):
    """fairseq's greedy output of each direction: the argv of GENERATE_DIRECTIONS."""
    argvs = {}
    for pair in DIRECTIONS:
        src, tgt = pair.split("-")
        argvs[pair] = [
            str(data), "--path", str(checkpoint), "--task", task, *task_flags(),
            "--source-lang", src, "--target-lang", tgt, "--gen-subset", "valid",
            "--beam", "1", "--batch-size", "16", "--cpu",
            "--required-batch-size-multiple", "1",
            "--results-path", str(results / pair), *extra,
        ]  # fmt: skip
    return [json.dumps(argvs)]


@pytest.fixture(scope="module")
def multi_greedy(multi_student, multi_exported, multi_bin, tmp_path_factory):
    """Greedy hypotheses of every direction: the student with our task, and
    the export with stock fairseq in a process without the plugin."""
    out = tmp_path_factory.mktemp("multi-greedy")
    argv = generate_directions(
        multi_student, multi_bin, out / "ours", f"{MULTI_TASK}_kd",
        ["--user-dir", USER_DIR],
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", "import os, sys\n" + GENERATE_DIRECTIONS, *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    ours = json.loads(proc.stdout.splitlines()[-1])
    stock = run_without_plugin(
        GENERATE_DIRECTIONS,
        multi_exported,
        generate_directions(
            multi_exported / "student.pt", multi_bin, out / "stock", MULTI_TASK
        ),
    )
    return ours, json.loads(stock.splitlines()[-1])


def test_multilingual_export_is_a_stock_multilingual_checkpoint(
    multi_exported, multi_student
):
    state = torch.load(multi_exported / "student.pt", weights_only=True)
    assert state["args"] is None
    cfg = state["cfg"]
    for flags in (cfg["task"], cfg["model"]):  # argparse options: every flag
        assert flags["task"] == MULTI_TASK
        assert flags["criterion"] == "label_smoothed_cross_entropy"
        assert flags["user_dir"] is None
        assert not any(k.startswith(("teacher", "kd_")) for k in flags)
        # no direction recorded: fairseq would load a one-direction task
        assert flags["source_lang"] is None and flags["target_lang"] is None
        assert flags["encoder_langtok"] == "src" and flags["decoder_langtok"]
    assert cfg["task"]["_name"] == MULTI_TASK
    assert cfg["criterion"]["_name"] == "label_smoothed_cross_entropy"
    original = torch.load(multi_student, map_location="cpu", weights_only=False)
    assert original["cfg"]["task"].teacher_path  # the student had a teacher
    assert original["cfg"]["task"]._name == f"{MULTI_TASK}_kd"
    names = sorted(p.name for p in multi_exported.glob("dict.*.txt"))
    assert names == ["dict.cs.txt", "dict.de.txt", "dict.en.txt"]


def test_stock_generate_on_multilingual_export_matches_our_task(multi_greedy):
    ours, stock = multi_greedy
    assert sorted(ours) == sorted(stock) == sorted(DIRECTIONS)
    for pair in DIRECTIONS:
        assert len(ours[pair]) == 12  # the corpus' valid sentences
        assert stock[pair] == ours[pair]  # hypotheses and their scores


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({}, ("__de__", "__en__")),
        ({"encoder_langtok": "tgt"}, ("__en__", "__en__")),
        ({"encoder_langtok": None}, (None, "__en__")),
        ({"decoder_langtok": False}, ("__de__", None)),
        ({"lang_tok_style": "mbart"}, ("[de]", "[en]")),
    ],
)
def test_direction_tags_follow_the_task_options(settings, expected):
    from fairseq_kd import ct2_multilingual

    task_cfg = {
        "_name": MULTI_TASK, "lang_pairs": "de-en,cs-en,en-de", "langs": None,
        "encoder_langtok": "src", "decoder_langtok": True,
        "lang_tok_style": "multilingual",
    }  # fmt: skip
    task_cfg.update(settings)
    found = ct2_multilingual.langtok_settings(task_cfg)
    assert found["langs"] == ["cs", "de", "en"]  # fairseq's: sorted from the pairs
    assert ct2_multilingual.direction_tags(found, "de", "en") == expected
    with pytest.raises(ct2_multilingual.LangtokError, match="fr not among"):
        ct2_multilingual.direction_tags(found, "fr", "en")
    task_cfg["lang_tok_replacing_bos_eos"] = True
    with pytest.raises(ct2_multilingual.LangtokError, match="replacing-bos-eos"):
        ct2_multilingual.langtok_settings(task_cfg)


def test_ct2_multilingual_greedy_equals_fairseq(
    multi_greedy, multi_student, multi_exported, multi_text, tmp_path
):
    from fairseq_kd import ct2_multilingual

    ours, _ = multi_greedy
    # the library path (what the harness calls) on the original checkpoint
    model_dir = ct2_multilingual.convert(
        multi_student, str(tmp_path / "ct2"), quantization="float32"
    )
    with open(os.path.join(model_dir, "model.bin"), "rb") as a, open(
        multi_exported / "ct2-float32" / "model.bin", "rb"
    ) as b:
        assert a.read() == b.read()  # the same model as fairseq-kd-export --ct2
    translator = ct2_multilingual.Translator(model_dir, compute_type="float32")
    tags = {"__cs__", "__de__", "__en__"}
    for pair in DIRECTIONS:
        src, tgt = pair.split("-")
        with open(os.path.join(multi_text, f"valid.{pair}.{src}")) as f:
            lines = f.read().splitlines()
        found = translator.translate(lines, src, tgt, beam_size=1, batch_size=5)
        expected = [ours[pair][str(i)][1] for i in range(len(lines))]
        assert found == expected
        assert not any(tags & set(hyp.split()) for hyp in found)
    # the target tag is what steers the direction: de->en and de->cs differ
    with open(os.path.join(multi_text, "valid.de-en.de")) as f:
        lines = f.read().splitlines()
    assert translator.translate(lines, "de", "en") != translator.translate(
        lines, "de", "cs"
    )


def test_a_kd_trained_multilingual_teacher_distils_with_ctranslate2(
    multi_greedy, multi_student, multi_bin, tmp_path
):
    """fairseq-kd-distill --engine ctranslate2 on a teacher trained with
    translation_multi_simple_epoch_kd (its config names a teacher and KD
    options): converted as the export converts it, and its greedy n-best is
    fairseq-generate's, direction by direction."""
    pytest.importorskip("ctranslate2")
    from fairseq_kd import distill

    ours, _ = multi_greedy
    out = tmp_path / "distilled"
    argv = [str(multi_bin), "--path", multi_student, "--output", str(out)]
    argv += ["--task", f"{MULTI_TASK}_kd", *task_flags(), "--gen-subset", "valid"]
    argv += ["--engine", "ctranslate2", "--beam", "1", "--cpu", "--no-progress-bar"]
    summary = distill.main(distill.parse_args(argv))
    assert sorted(summary["directions"]) == sorted(DIRECTIONS)
    for pair in DIRECTIONS:
        found = {}
        parts = out / "work" / pair / "parts"
        for name in os.listdir(parts):
            with open(parts / name) as f:
                for rec in [json.loads(line) for line in f][1:]:
                    found[str(rec["id"])] = rec["nbest"][0]
        assert found == {i: h[1] for i, h in ours[pair].items()}
