"""Compatibility of fairseq checkpoints with torch's ``weights_only`` loading."""

import argparse

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
