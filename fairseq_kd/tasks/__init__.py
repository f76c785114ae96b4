"""Tasks of fairseq-kd."""

from fairseq_kd.tasks import (  # noqa: F401
    kd_teacher,
    translation_kd,
    translation_multi_simple_epoch_kd,
)
