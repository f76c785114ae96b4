"""Running a frozen teacher: its precision, and its distributions computed in chunks."""

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CHUNK_ROWS = 256  # positions normalised at a time


@dataclass(frozen=True)
class TeacherPrecision:
    """How a teacher runs: its weights' dtype and the autocast dtype, if any.

    Args:
        weights: dtype of the teacher's floating-point parameters.
        autocast: dtype of ``torch.autocast`` around the forward pass, or
            None to run without autocast (also when the caller has it on).
    """

    weights: torch.dtype = torch.float32
    autocast: Optional[torch.dtype] = None

    @property
    def name(self):
        """``fp32``, ``fp16``, ``bf16``, or ``amp-fp16``/``amp-bf16`` (autocast)."""
        if self.autocast is not None:
            return f"amp-{DTYPE_NAMES[self.autocast]}"
        return DTYPE_NAMES[self.weights]

    def context(self, device_type):
        """The autocast state of the teacher's forward pass on ``device_type``.

        Args:
            device_type: ``"cuda"`` or ``"cpu"`` (the teacher's device).
        """
        if self.autocast is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast)


def current_autocast(device_type):
    """The autocast dtype enabled at this point on ``device_type``, or None.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def resolve_precision(option, student_dtype=torch.float32, autocast=None):
    """The teacher's precision for ``--teacher-precision option``.

    ``auto`` follows the student: float32 weights inside the student's
    autocast when it has one (fairseq's ``--amp``), else the student's
    parameter dtype (fp16 under ``--fp16``, bf16 under ``--bf16``, fp32
    otherwise). ``fp32``, ``fp16`` and ``bf16`` set the weights' dtype and
    run without autocast, whatever the student does.

    Args:
        option: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        student_dtype: the dtype of the student's parameters.
        autocast: the student's autocast dtype, or None.

    Returns:
        A :class:`TeacherPrecision`.
    """
    option = str(option)
    if option not in PRECISIONS:
        raise ValueError(
            f"--teacher-precision must be one of {', '.join(PRECISIONS)}, "
            f"got {option!r}"
        )
    if option != "auto":
        return TeacherPrecision(DTYPES[option])
    if autocast is not None:
        return TeacherPrecision(torch.float32, autocast)
    if student_dtype in (torch.float16, torch.bfloat16):
        return TeacherPrecision(student_dtype)
    return TeacherPrecision(torch.float32)


def place_teachers(teachers, device, dtype):
    """Move frozen teachers to ``device`` and cast them to ``dtype`` (in place).

    A teacher cast down once keeps the rounding: casting it back up later
    does not restore its weights (a warning says so).

    Args:
        teachers: the models.
        device: the target device.
        dtype: the floating-point dtype of their parameters.

    Returns:
        ``teachers``.
    """
    for teacher in teachers:
        param = next(teacher.parameters())
        if param.device == device and param.dtype == dtype:
            continue
        if param.dtype != dtype and param.dtype in (torch.float16, torch.bfloat16):
            logger.warning(
                f"teacher weights cast from {param.dtype} to {dtype}: they keep "
                f"the rounding of {param.dtype}"
            )
        teacher.to(device=device, dtype=dtype)
    return teachers


def _uses_adaptive_softmax(teacher):
    decoder = getattr(teacher, "decoder", None)
    return getattr(decoder, "adaptive_softmax", None) is not None


def _reusable(logits):
    """Whether the logits may be overwritten by their log-probabilities."""
    return (
        logits.dtype == torch.float32
        and logits.is_contiguous()
        and logits._base is None
        and not isinstance(logits, torch.nn.Parameter)
    )


class _RowNormaliser:
    """Float32 log-probabilities of one teacher's output, a chunk of rows at a time."""

    def __init__(self, teacher, net_output, positions):
        self.teacher = teacher
        self.extra = tuple(net_output[1:])
        logits = net_output[0]  # B x T x V
        self.shape = logits.shape
        self.reusable = positions is None and _reusable(logits)
        self.flat = logits.reshape(-1, logits.size(-1))  # BT x V
        self.positions = positions
        self.rows = self.flat.size(0) if positions is None else positions.numel()

    def __call__(self, start, end):
        if self.positions is None:
            chunk = self.flat[start:end]  # rows x V
        else:
            chunk = self.flat.index_select(0, self.positions[start:end])  # rows x V
        with torch.autocast(chunk.device.type, enabled=False):
            lprobs = self.teacher.get_normalized_probs(
                (chunk,) + self.extra, log_probs=True
            )
        return lprobs.float()  # rows x V

    def output(self):
        """A float32 buffer for all rows' log-probabilities (the logits if free)."""
        if self.reusable:
            return self.flat  # each chunk is read before it is overwritten
        return torch.empty(
            self.rows, self.flat.size(-1), dtype=torch.float32, device=self.flat.device
        )


def _full_log_probs(teachers, net_input):
    """The unchunked path (adaptive softmax): average of the members' probabilities."""
    total = None
    for teacher in teachers:
        net_output = teacher(**net_input)
        with torch.autocast(net_output[0].device.type, enabled=False):
            lprobs = teacher.get_normalized_probs(net_output, log_probs=True).float()
        total = lprobs if total is None else torch.logaddexp(total, lprobs)
    if len(teachers) > 1:
        total = total - math.log(len(teachers))
    return total  # B x T x V


@torch.no_grad()
def teacher_distribution(teachers, net_input, topk=0, positions=None, rows=CHUNK_ROWS):
    """A (possibly ensembled) teacher's float32 log-probabilities at T = 1.

    The teachers run one after the other in the current autocast state; each
    one's logits are normalised in float32, ``rows`` positions at a time. An
    ensemble averages the members' probabilities: the first member's
    log-probabilities become an accumulator (its float32 logits are reused
    when possible) into which the others are added in log space, chunk by
    chunk. With ``topk`` only the ``topk`` most probable entries of each
    position are kept, taken chunk by chunk from the normalised rows, so a
    single teacher never holds more than its logits and one chunk.

    Args:
        teachers: frozen models, already on the input's device.
        net_input: the sample's ``net_input``.
        topk: entries kept per position, most probable first (0: all of the
            vocabulary, unsorted, as the model's vocabulary order).
        positions: optional 1-D int64 tensor of flat positions (``b * T +
            t``) to compute; None computes all of them.
        rows: positions normalised at a time.

    Returns:
        ``(lprobs, indices)``: ``B x T x S`` float32 log-probabilities and
        ``B x T x S`` int64 vocabulary ids (``N x S`` with ``positions``),
        where ``S`` is ``topk``, or the vocabulary with ``indices`` None when
        ``topk`` is 0.
    """
    if any(_uses_adaptive_softmax(t) for t in teachers):
        lprobs = _full_log_probs(teachers, net_input)  # B x T x V
        bsz, tlen, vocab = lprobs.shape
        if positions is not None:
            lprobs = lprobs.reshape(-1, vocab).index_select(0, positions)  # N x V
        if topk <= 0:
            return lprobs, None
        values, indices = lprobs.topk(topk, dim=-1)
        return values, indices
    n = len(teachers)
    if n == 0:
        raise ValueError("teacher_distribution needs at least one teacher")
    acc = None  # running log-sum of the members' probabilities, N x V
    for member, teacher in enumerate(teachers):
        net_output = teacher(**net_input)
        norm = _RowNormaliser(teacher, net_output, positions)
        del net_output
        bsz, tlen, vocab = norm.shape
        if topk > vocab:
            raise ValueError(
                f"top-{topk} asked of a teacher with a vocabulary of {vocab}"
            )
        last = member == n - 1
        if last and topk > 0:
            values = torch.empty(
                norm.rows, topk, dtype=torch.float32, device=norm.flat.device
            )  # N x K
            indices = torch.empty(
                norm.rows, topk, dtype=torch.long, device=norm.flat.device
            )  # N x K
        elif acc is None:
            acc = norm.output()  # N x V
        for start in range(0, norm.rows, rows):
            end = min(start + rows, norm.rows)
            lprobs = norm(start, end)  # rows x V
            if acc is not None and member > 0:
                lprobs = torch.logaddexp(acc[start:end], lprobs)
            if last and n > 1:
                lprobs = lprobs - math.log(n)
            if last and topk > 0:
                torch.topk(
                    lprobs, topk, dim=-1, out=(values[start:end], indices[start:end])
                )
            else:
                acc[start:end] = lprobs
        del norm
    lead = (bsz, tlen) if positions is None else (-1,)
    if topk > 0:
        return values.view(*lead, topk), indices.view(*lead, topk)
    return acc.view(*lead, vocab), None
