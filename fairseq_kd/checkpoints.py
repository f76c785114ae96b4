"""Loading fairseq checkpoints on torch >= 2.6 and building teacher ensembles."""

import contextlib
import logging
import os
import pickle
import warnings

from fairseq import checkpoint_utils, models, utils
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_kd.teacher import teacher_distribution
from fairseq_kd.topk_store import (
    describe_symbol_difference,
    dictionary_signature,
    file_sha256,
)

logger = logging.getLogger(__name__)

_FORCE_PICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_SHA256_CACHE = {}  # (real path, size, mtime) -> sha256
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


def checkpoint_fingerprint(paths):
    """Who the teachers are: each checkpoint's path and sha256.

    Each file is hashed once per process (cached by path, size and
    modification time).

    Args:
        paths: checkpoint paths, ``:``-separated.

    Returns:
        A list of ``{"path", "sha256"}``, in the order given.
    """
    out = []
    for path in split_checkpoint_paths(paths):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in _SHA256_CACHE:
            _SHA256_CACHE[key] = file_sha256(path)
        out.append({"path": path, "sha256": _SHA256_CACHE[key]})
    return out


def _output_vocab_size(model_state):
    for key in ("decoder.output_projection.weight", "decoder.embed_out"):
        if key in model_state:
            return model_state[key].size(0)
    return model_state["decoder.embed_tokens.weight"].size(0)


def teacher_config(state):
    """A checkpoint's config as omegaconf (``cfg``, or its older ``args``).

    Args:
        state: the loaded checkpoint.
    """
    if state.get("args") is not None:
        return convert_namespace_to_omegaconf(state["args"])
    return state["cfg"]


def teacher_dictionary_files(path, state, src_lang, tgt_lang, dict_dir=None):
    """Where the teacher's dictionaries are, or None when they cannot be found.

    A fairseq checkpoint does not hold its dictionaries: they are read from
    ``dict_dir`` when given (``--teacher-dict-dir``), else from the first
    folder of the checkpoint's ``task.data``.

    Args:
        path: the teacher checkpoint (for messages).
        state: its loaded state.
        src_lang: source language to use when the checkpoint names none.
        tgt_lang: target language to use when the checkpoint names none.
        dict_dir: the folder holding ``dict.SRC.txt`` and ``dict.TGT.txt``.

    Returns:
        ``(source file, target file)``, or ``(None, why)`` when not found.
    """
    task_cfg = getattr(teacher_config(state), "task", None)
    src = getattr(task_cfg, "source_lang", None) or src_lang
    tgt = getattr(task_cfg, "target_lang", None) or tgt_lang
    if dict_dir:
        files = tuple(os.path.join(dict_dir, f"dict.{lang}.txt") for lang in (src, tgt))
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"--teacher-dict-dir {dict_dir}: no {', '.join(missing)} (the "
                f"teacher {path} translates {src}-{tgt})"
            )
        return files
    data = getattr(task_cfg, "data", None)
    if not data:
        return None, "its config names no data folder (task.data)"
    folder = split_checkpoint_paths(data)[0]
    files = tuple(os.path.join(folder, f"dict.{lang}.txt") for lang in (src, tgt))
    if not all(os.path.isfile(f) for f in files):
        return None, (
            f"its data folder {folder} (task.data) holds no dict.{src}.txt and "
            f"dict.{tgt}.txt"
        )
    return files


def check_teacher_dictionaries(
    path,
    state,
    src_dict,
    tgt_dict,
    src_lang=None,
    tgt_lang=None,
    dict_dir=None,
    teacher_dicts=None,
):
    """Refuse a teacher whose vocabularies differ from the task's.

    The sizes are compared with the checkpoint's embeddings; the symbols (a
    sha256 of the symbol list, then the first differing id) with the
    teacher's dictionary files (see :func:`teacher_dictionary_files`). When
    those cannot be found, a warning says that only the sizes were compared.

    Args:
        path: the teacher checkpoint (for the message).
        state: the teacher's loaded state (``state["model"]`` and its config).
        src_dict: the task's source dictionary.
        tgt_dict: the task's target dictionary.
        src_lang: the task's source language (when the checkpoint names none).
        tgt_lang: the task's target language.
        dict_dir: ``--teacher-dict-dir``: the folder of the teacher's
            ``dict.SRC.txt`` and ``dict.TGT.txt``.
        teacher_dicts: the teacher's dictionaries when the task found them
            itself (a multilingual task adds the language tokens):
            ``((source, target), (source name, target name))``, or ``(None,
            why)``; None: read them from the files
            :func:`teacher_dictionary_files` names.
    """
    model_state = state["model"]
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
    if teacher_dicts is None:
        files = teacher_dictionary_files(path, state, src_lang, tgt_lang, dict_dir)
        dicts = None if files[0] is None else [Dictionary.load(f) for f in files]
    else:
        dicts, files = teacher_dicts
        if dicts is None:
            files = (None, files)
    if dicts is None:
        logger.warning(
            f"could not compare the symbols of teacher {path}'s dictionaries with "
            f"this task's: {files[1]}, and --teacher-dict-dir is not set. Only "
            "their sizes were compared; give --teacher-dict-dir DIR (the folder "
            "of the teacher's dict.*.txt) to compare the symbols."
        )
        return
    for side, file, theirs, ours in zip(
        ("source", "target"), files, dicts, (src_dict, tgt_dict)
    ):
        if dictionary_signature(theirs) == dictionary_signature(ours):
            continue
        diff = describe_symbol_difference(
            theirs, ours, f"the teacher's {file}", "this task's"
        )
        raise ValueError(
            f"teacher {path} was trained with another {side} dictionary than this "
            f"task's, though both have {len(ours)} symbols: {diff}. Binarize the "
            "student's data with the teacher's dictionaries (fairseq-preprocess "
            "--srcdict/--tgtdict), or name the teacher's own dictionaries with "
            "--teacher-dict-dir."
        )


def check_teacher(path, state, task, dict_dir=None, check_state=None, find_dicts=None):
    """Refuse a teacher that does not fit ``task``, before building it.

    The task's own ``check_teacher_state(path, state)`` (or ``check_state``)
    first, then the dictionaries (:func:`check_teacher_dictionaries`, with the
    teacher's dictionaries found by ``find_dicts`` or the task's
    ``teacher_dictionaries``, if any). Every engine that reads a teacher for
    ``task`` runs these checks (see :func:`load_teacher_ensemble`).

    Args:
        path: the checkpoint (for messages).
        state: its loaded state.
        task: the task whose dictionaries the teacher must share.
        dict_dir: ``--teacher-dict-dir``.
        check_state: ``check(path, state)``; default: the task's
            ``check_teacher_state``, if any.
        find_dicts: ``find(path, state, dict_dir)``; default: the task's
            ``teacher_dictionaries``, if any.

    Raises:
        ValueError: the teacher does not fit (the message says what differs).
    """
    task_cfg = getattr(task, "cfg", None)
    langs = (
        getattr(task_cfg, "source_lang", None),
        getattr(task_cfg, "target_lang", None),
    )
    check = check_state or getattr(task, "check_teacher_state", None)
    if check is not None:
        check(path, state)
    find = find_dicts or getattr(task, "teacher_dictionaries", None)
    check_teacher_dictionaries(
        path,
        state,
        task.source_dictionary,
        task.target_dictionary,
        *langs,
        dict_dir=dict_dir,
        teacher_dicts=find(path, state, dict_dir) if find else None,
    )


def load_teacher_ensemble(
    paths, task, dict_dir=None, check_state=None, find_dicts=None
):
    """Load one or more teacher checkpoints for ``task``, frozen, on the CPU.

    Each model is built with the task's dictionaries (after the task's own
    ``check_teacher_state(path, state)``, if it has one, and checking their
    sizes and symbols against the teacher's, see
    :func:`check_teacher_dictionaries`; a task's ``teacher_dictionaries``
    finds the teacher's), put in eval mode and has gradients
    turned off. The models are returned in a plain list so that nothing
    registers them as submodules of the student or the criterion.

    Args:
        paths: checkpoint paths, ``:``-separated.
        task: the task whose dictionaries the teacher must share.
        dict_dir: folder of the teachers' ``dict.SRC.txt``/``dict.TGT.txt``
            (``--teacher-dict-dir``); by default their ``task.data`` folder.
        check_state: ``check(path, state)`` refusing an incompatible teacher;
            default: the task's ``check_teacher_state``, if any.
        find_dicts: ``find(path, state, dict_dir)`` giving the teacher's
            dictionaries (see :func:`check_teacher_dictionaries`); default:
            the task's ``teacher_dictionaries``, if any.

    Returns:
        A list of ``FairseqModel`` instances.
    """
    teachers = []
    for path in split_checkpoint_paths(paths):
        state = load_checkpoint(path)
        check_teacher(path, state, task, dict_dir, check_state, find_dicts)
        cfg = teacher_config(state)
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
