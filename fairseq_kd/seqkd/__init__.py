"""Building sequence-level KD corpora: filters, selection, part files, engines."""

from fairseq_kd.seqkd import (  # noqa: F401
    backward,
    batching,
    directions,
    engines,
    filters,
    inputs,
    merge,
    nbest_choice,
    parts,
    writer,
)
