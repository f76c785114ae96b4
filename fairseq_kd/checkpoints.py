"""Loading fairseq checkpoints on torch >= 2.6 and building teacher ensembles."""

import contextlib
import logging
import os
import pickle
import warnings

from fairseq import checkpoint_utils, models, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_kd.teacher import teacher_distribution

logger = logging.getLogger(__name__)

_FORCE_PICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects that weights-only loading refuses."""


@contextlib.contextmanager
def _torch_load_mode(weights_only):
    """Make every ``torch.load`` inside the block use ``weights_only``.

    fairseq calls ``torch.load`` without ``weights_only``; torch's two
    environment switches decide for such calls (and the weights-only one for
    explicit calls too), whatever the user's environment says. Both are
    restored after the block.
    """
    keys = (_FORCE_PICKLE, _FORCE_WEIGHTS_ONLY)
    previous = {k: os.environ.get(k) for k in keys}
    os.environ.pop(_FORCE_PICKLE if weights_only else _FORCE_WEIGHTS_ONLY, None)
    os.environ[_FORCE_WEIGHTS_ONLY if weights_only else _FORCE_PICKLE] = "1"
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def trusted_checkpoint_loading():
    """Let ``torch.load`` unpickle checkpoints fully inside this block.

    Only for files the user named and trusts: full unpickling runs whatever
    code the file asks for. :func:`load_checkpoint` uses it as a fallback.
    """
    with _torch_load_mode(weights_only=False):
        yield


def load_checkpoint(path, trusted_fallback=True):
    """Load a fairseq checkpoint to the CPU, weights-only when it can.

    A checkpoint written by ``fairseq-train`` holds tensors, plain Python
    types and one ``argparse.Namespace`` (the model options), which this
    package adds to torch's safe globals: it loads with ``weights_only=True``.
    A file that holds any other pickled object (older fairseq checkpoints,
    omegaconf objects, anything crafted) is refused, unless
    ``trusted_fallback`` is set, for a file the user named: it is then
    unpickled fully, with a warning naming it.

    Args:
        path: the checkpoint file.
        trusted_fallback: whether the user named this file, so that full
            unpickling may follow a weights-only refusal.

    Returns:
        The upgraded state dict, as ``checkpoint_utils.load_checkpoint_to_cpu``.

    Raises:
        UnsafeCheckpointError: the file needs full unpickling and
            ``trusted_fallback`` is not set.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with _torch_load_mode(weights_only=True):
            return checkpoint_utils.load_checkpoint_to_cpu(path)
    except pickle.UnpicklingError as e:
        reason = refusal_reason(e)
        if not trusted_fallback:
            raise UnsafeCheckpointError(
                f"{path} holds pickled objects that weights-only loading refuses "
                f"({reason}); it is not loaded with full unpickling because it is "
                "not a file named on the command line. Export it with "
                "fairseq-kd-export, or load it where you name it."
            ) from e
        warn_full_unpickling(path, reason)
    with trusted_checkpoint_loading():
        return checkpoint_utils.load_checkpoint_to_cpu(path)


def refusal_reason(error):
    """The line of torch's weights-only refusal that names what it refused.

    Args:
        error: the ``pickle.UnpicklingError`` raised by ``torch.load``.
    """
    text = str(error)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1]
            return reason.split(" Please use", 1)[0].strip().rstrip(".")
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def warn_full_unpickling(path, reason):
    """Warn that ``path`` is unpickled fully (it can run code when loaded).

    Args:
        path: the checkpoint file.
        reason: why weights-only loading refused it.
    """
    message = (
        f"{path}: weights-only loading refused it ({reason}); loading it with "
        "full unpickling because you named it. Unpickling can run code: only "
        "do this for files you trust (fairseq-kd-export writes a copy that "
        "loads weights-only)."
    )
    logger.warning(message)
    warnings.warn(message, stacklevel=3)


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
