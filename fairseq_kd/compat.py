"""Compatibility shims: torch's ``weights_only`` loading, fairseq version gaps."""

import argparse
import inspect

import torch


def allow_fairseq_checkpoint_types():
    """Allow ``torch.load(weights_only=True)`` to read fairseq checkpoints.

    fairseq stores legacy model options as an ``argparse.Namespace``, the only
    non-tensor type in a checkpoint written by ``fairseq-train``; torch >= 2.6
    refuses it by default. Adding it to torch's safe globals lets fairseq's own
    loading (``fairseq-train`` resuming, ``fairseq-generate --user-dir ...``)
    work in any process that imports this package, while torch keeps refusing
    every other pickled object.
    """
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals([argparse.Namespace])


def restores_task_checkpoint_dict():
    """Whether fairseq saves and restores ``task.get_checkpoint_dict()``.

    fairseq after 0.12.2 (and its 3.11 forks ``ve-fairseq`` and
    ``fairseq-fixed``) merges ``task.get_checkpoint_dict()`` into each
    checkpoint's ``extra_state`` and hands it back to
    ``task.set_checkpoint_dict`` on resume; 0.12.2 does neither.
    """
    from fairseq import checkpoint_utils

    try:
        source = inspect.getsource(checkpoint_utils.load_checkpoint)
    except (OSError, TypeError):
        return False
    return "set_checkpoint_dict" in source
