"""Weights-only loading of checkpoints, with a warned fallback for named files."""

import os
import warnings

import pytest
import torch
from conftest import USER_DIR

from fairseq_kd import pipeline, recipe
from fairseq_kd.checkpoints import UnsafeCheckpointError, load_checkpoint


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
        pipeline.count_parameters(path)
    assert pipeline.count_parameters(teacher) == sum(
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
    env = pipeline.fairseq_env()
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    ctx = {
        "src": "de",
        "tgt": "en",
        "bin": "BIN",
        "subword": "spm",
        "preset": {"gen_batch_size": 8, "device": ["--cpu"]},
    }
    settings = {"updates": 1, "lr": 1, "warmup": 1, "max_tokens": 1, "dropout": 0}
    # every fairseq command that loads a checkpoint gets the plugin, once
    gen = recipe.generate_command(ctx, "ckpt.pt", "test", 5)
    assert gen[gen.index("--user-dir") + 1] == recipe.USER_DIR
    for extra in ([], ["--user-dir", USER_DIR, "--task", "translation_kd"]):
        cmd = recipe.train_command(ctx, "BIN", "SAVE", [], settings, extra)
        assert cmd.count("--user-dir") == 1
    ct2 = recipe.ct2_convert_command("ckpt.pt", "BIN", "de", "en", "OUT")
    assert "--unsafe_deserialization" not in ct2
    assert ct2[ct2.index("--user_dir") + 1] == recipe.USER_DIR
