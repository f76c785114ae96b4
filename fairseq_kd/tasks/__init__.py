"""Tasks of fairseq-kd."""

from fairseq_kd.tasks import translation_kd  # noqa: F401
