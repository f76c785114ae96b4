"""The directions of a multilingual (translation_multi_simple_epoch) distillation."""

import json
import os
from typing import Dict, List, NamedTuple, Optional

from fairseq_kd.seqkd.parts import CONFIG, DistillError


class Direction(NamedTuple):
    """One direction of a multilingual split, as the multilingual task reads it."""

    pair: str  # SRC-TGT
    src: str
    tgt: str
    data_path: str  # the folder fairseq reads this direction's split from
    encoder_spec: Optional[str]  # --encoder-langtok (src, tgt...) or None
    source_tag: Optional[int]  # the tag fairseq puts before the source, or None
    target_tag: Optional[int]  # the tag the decoder starts with, or None
    signature: Dict  # lang_pair, source_langtok, target_langtok (see describe)


def describe(signature: Optional[Dict]) -> str:
    """A direction in words (``de-en (source tag __de__, target tag __en__)``).

    Args:
        signature: a direction's signature, or None (a bilingual run).
    """
    if signature is None:
        return "a bilingual run (translation task, no language tags)"
    return (
        f"{signature['lang_pair']} (source tag {signature.get('source_langtok')}, "
        f"target tag {signature.get('target_langtok')})"
    )


def parse_pairs(value) -> Optional[List[str]]:
    """``--distill-lang-pairs`` as a list (None: every direction)."""
    if not value:
        return None
    return [p.strip() for p in str(value).split(",") if p.strip()]


def split_directions(task, split: str, pairs=None) -> List[Direction]:
    """The directions of ``split`` to distil, in ``--lang-pairs`` order.

    The data folder and the language tags come from fairseq's
    ``MultilingualDatasetManager``, as ``fairseq-train`` and
    ``fairseq-generate`` get them.

    Args:
        task: a ``translation_multi_simple_epoch`` task.
        split: the split's name.
        pairs: the directions (``SRC-TGT``) to distil; default: every
            direction of the task's ``--lang-pairs``.
    """
    from fairseq_kd.multilingual import direction_signature

    manager = task.data_manager
    unknown = [p for p in pairs or () if p not in task.lang_pairs]
    if unknown:
        raise DistillError(
            f"--distill-lang-pairs: {','.join(unknown)} not among --lang-pairs "
            f"{','.join(task.lang_pairs)}"
        )
    out = []
    for param in manager.get_split_data_param_list(split, epoch=1):
        src, tgt = param["src"], param["tgt"]
        pair = f"{src}-{tgt}"
        if param["data_category"] != "main" or (pairs and pair not in pairs):
            continue
        enc_spec, dec_spec = param["langtok_spec"]
        out.append(
            Direction(
                pair=pair,
                src=src,
                tgt=tgt,
                data_path=param["data_path"],
                encoder_spec=enc_spec,
                source_tag=manager.get_encoder_langtok(src, tgt, enc_spec),
                target_tag=manager.get_decoder_langtok(tgt, dec_spec),
                signature=direction_signature(task, src, tgt, param["langtok_spec"]),
            )
        )
    return out


def check_recorded_direction(path: str, what: str, direction: Optional[Dict], split):
    """Refuse a work folder or corpus recorded for another direction.

    Args:
        path: a JSON file holding ``"direction"`` (a work folder's
            ``config.json``, a corpus's ``SPLIT.summary.json``); absent: fine.
        what: what the file stands for (``work folder W``...), for the message.
        direction: this run's direction signature (None: a bilingual run).
        split: the split distilled (for the message).
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f).get("direction")
    if recorded == direction:
        return
    raise DistillError(
        f"{what} was written for {describe(recorded)}, but this run distils "
        f"{describe(direction)} of split '{split}'. Each direction has its own "
        "work folder and corpus (WORK/SRC-TGT, OUTPUT/SRC-TGT): give another "
        "--output/--work-dir, or delete it to start over."
    )


def check_work_dir(work_dir: str, direction: Optional[Dict], split: str):
    """Refuse to resume (or merge) a work folder of another direction.

    Args:
        work_dir: the direction's work folder.
        direction: this run's direction signature (None: a bilingual run).
        split: the split distilled.
    """
    check_recorded_direction(
        os.path.join(work_dir, CONFIG), f"work folder {work_dir}", direction, split
    )
