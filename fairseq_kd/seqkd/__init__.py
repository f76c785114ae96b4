"""Building sequence-level KD corpora: filters, selection, part files, engines."""

from fairseq_kd.seqkd import filters, parts, selection  # noqa: F401
