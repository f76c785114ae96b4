"""Criterions of fairseq-kd."""

from fairseq_kd.criterions import word_kd  # noqa: F401
