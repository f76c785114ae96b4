"""Loading fairseq checkpoints on torch >= 2.6 and building teacher ensembles."""

import contextlib
import logging
import os

from fairseq import checkpoint_utils, models, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_kd.teacher import teacher_distribution

logger = logging.getLogger(__name__)

_FORCE_PICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def trusted_checkpoint_loading():
    """Let ``torch.load`` unpickle fairseq checkpoints inside this block.

    torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
    ``argparse``/omegaconf objects that fairseq pickles into its checkpoints.
    The files loaded here are ones the user named on the command line, so the
    block sets torch's own switch for the duration and restores it after.
    """
    previous = os.environ.get(_FORCE_PICKLE)
    os.environ[_FORCE_PICKLE] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_PICKLE]
        else:
            os.environ[_FORCE_PICKLE] = previous


def load_checkpoint(path):
    """Load a fairseq checkpoint to the CPU, on any torch version.

    Args:
        path: the checkpoint file.

    Returns:
        The upgraded state dict, as ``checkpoint_utils.load_checkpoint_to_cpu``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    with trusted_checkpoint_loading():
        return checkpoint_utils.load_checkpoint_to_cpu(path)


def split_checkpoint_paths(paths):
    """Split a ``:``-separated list of checkpoint paths.

    Args:
        paths: one path, or several separated by ``:``.
    """
    return [p for p in utils.split_paths(paths) if p]


def _output_vocab_size(model_state):
    for key in ("decoder.output_projection.weight", "decoder.embed_out"):
        if key in model_state:
            return model_state[key].size(0)
    return model_state["decoder.embed_tokens.weight"].size(0)


def check_teacher_dictionaries(path, model_state, src_dict, tgt_dict):
    """Refuse a teacher whose vocabularies differ from the task's.

    Args:
        path: the teacher checkpoint (for the message).
        model_state: the teacher's ``state["model"]``.
        src_dict: the task's source dictionary.
        tgt_dict: the task's target dictionary.
    """
    teacher_src = model_state["encoder.embed_tokens.weight"].size(0)
    teacher_tgt = _output_vocab_size(model_state)
    if teacher_src != len(src_dict) or teacher_tgt != len(tgt_dict):
        raise ValueError(
            f"teacher {path} was trained with dictionaries of {teacher_src} "
            f"(source) and {teacher_tgt} (target) symbols, but this task's "
            f"dictionaries have {len(src_dict)} (source) and {len(tgt_dict)} "
            "(target) symbols. Binarize the student's data with the teacher's "
            "dictionaries (fairseq-preprocess --srcdict/--tgtdict)."
        )


def load_teacher_ensemble(paths, task):
    """Load one or more teacher checkpoints for ``task``, frozen, on the CPU.

    Each model is built with the task's dictionaries (after checking their
    sizes against the checkpoint), put in eval mode and has gradients turned
    off. The models are returned in a plain list so that nothing registers
    them as submodules of the student or the criterion.

    Args:
        paths: checkpoint paths, ``:``-separated.
        task: the task whose dictionaries the teacher must share.

    Returns:
        A list of ``FairseqModel`` instances.
    """
    teachers = []
    for path in split_checkpoint_paths(paths):
        state = load_checkpoint(path)
        check_teacher_dictionaries(
            path, state["model"], task.source_dictionary, task.target_dictionary
        )
        if state.get("args") is not None:
            cfg = convert_namespace_to_omegaconf(state["args"])
        else:
            cfg = state["cfg"]
        model = models.build_model(cfg.model, task, from_checkpoint=True)
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        model.eval()
        model.requires_grad_(False)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"loaded teacher {path} ({n_params:,} parameters)")
        teachers.append(model)
    if not teachers:
        raise ValueError("--teacher-path names no checkpoint")
    return teachers


def teacher_log_probs(teachers, net_input):
    """Log-probabilities of a (possibly ensembled) teacher, in float32.

    An ensemble averages the members' probabilities (not log-probabilities).
    A thin alias of :func:`fairseq_kd.teacher.teacher_distribution` over the
    whole vocabulary.

    Args:
        teachers: list of frozen models, already on the right device.
        net_input: the sample's ``net_input``.

    Returns:
        ``B x T x V`` float32 log-probabilities at temperature 1.
    """
    return teacher_distribution(teachers, net_input)[0]
