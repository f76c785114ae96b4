"""What is distilled: a binarized split (parallel or source-only) or raw source text."""

import os
import zlib
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from fairseq_kd.seqkd.engines import token_string
from fairseq_kd.seqkd.parts import DistillError


class Chunk(NamedTuple):
    """The sentences of one chunk, in corpus order."""

    src_ids: List[np.ndarray]  # what the teacher reads, each ending with </s>
    src: List[str]  # subword source lines (no language tag)
    ref: Optional[List[str]]  # subword references, None without a target side
    fingerprints: List[int]  # cheap identity of each source (see fingerprints)


def ids_fingerprint(ids) -> int:
    """CRC-32 of a sentence's token ids (as int32)."""
    return zlib.crc32(np.asarray(ids, dtype=np.int32).tobytes())


def file_identity(path: str) -> Dict:
    """Absolute path, size and modification time of an input file."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime": st.st_mtime}


class BinarizedCorpus:
    """A binarized split: ``fairseq-preprocess`` output, parallel or ``--only-source``.

    Args:
        folder: the binarized folder.
        split: the split name (``train``...).
        src: source language.
        tgt: target language; its side is read when the folder has it.
        src_dict: the teacher's source dictionary.
        tgt_dict: the teacher's target dictionary.
        source_only: read only ``<split>.<src>-None.<src>`` (``--only-source``).
        source_transform: a function from the source dataset to what the
            teacher reads (a multilingual direction's: fairseq's
            ``src_dataset_tranform_func``, which puts the language tag first);
            the text, references and fingerprints stay the binarized ones.
    """

    def __init__(
        self,
        folder,
        split,
        src,
        tgt,
        src_dict,
        tgt_dict,
        source_only=False,
        source_transform=None,
    ):
        from fairseq.data import data_utils

        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        if source_only:
            prefixes = [f"{split}.{src}-None."]
        else:
            prefixes = [f"{split}.{src}-{tgt}.", f"{split}.{tgt}-{src}."]
        for p in prefixes:
            if os.path.exists(os.path.join(folder, p + src + ".idx")):
                prefix = os.path.join(folder, p)
                break
        else:
            raise DistillError(
                f"--gen-subset {split}: no binarized source {prefixes[0]}{src}.idx "
                f"in {folder}"
            )
        self.src = data_utils.load_indexed_dataset(prefix + src, src_dict, None)
        self.tgt = None
        if not source_only and os.path.exists(prefix + tgt + ".idx"):
            self.tgt = data_utils.load_indexed_dataset(prefix + tgt, tgt_dict, None)
            if len(self.tgt) != len(self.src):
                raise DistillError(
                    f"{prefix}{tgt}: {len(self.tgt)} sentences, the source has "
                    f"{len(self.src)}"
                )
        self.has_reference = self.tgt is not None
        self.folder, self.source_only = os.path.abspath(folder), source_only
        self.model_src = source_transform(self.src) if source_transform else None

    def __len__(self):
        return len(self.src)

    def release(self):
        """Drop the pages of the mapped ``.bin``/``.idx`` files read so far from this
        process's resident memory (the data stays in the page cache), so that
        a pass over the corpus does not grow the RSS."""
        import mmap

        for ds in (self.src, self.tgt):
            index = getattr(ds, "_index", None)  # the .idx file's sizes, pointers
            for owner in (ds, index):
                mapped = getattr(owner, "_bin_buffer_mmap", None)
                buf = getattr(mapped, "_mmap", None)
                if buf is not None and hasattr(buf, "madvise"):
                    buf.madvise(mmap.MADV_DONTNEED)

    def describe(self) -> Optional[Dict]:
        """What the run config records of this input (None: ``DATA``'s own split)."""
        if not self.source_only:
            return None
        return {"kind": "source-bin", "folder": self.folder}

    def chunk(self, ids: range) -> Chunk:
        """The sentences ``ids``."""
        raw = [self.src[i].numpy() for i in ids]
        ref = None
        if self.tgt is not None:
            ref = [token_string(self.tgt_dict, self.tgt[i]) for i in ids]
        src_ids = raw
        if self.model_src is not None:
            src_ids = [self.model_src[i].numpy() for i in ids]
        out = Chunk(
            src_ids,
            [token_string(self.src_dict, x) for x in raw],
            ref,
            [ids_fingerprint(x) for x in raw],
        )
        self.release()
        return out

    def fingerprints(self, ids: range) -> List[int]:
        """CRC-32 of the source token ids of the sentences ``ids``."""
        out = [ids_fingerprint(self.src[i].numpy()) for i in ids]
        self.release()
        return out


class TextCorpus:
    """Raw source text, one sentence a line, encoded with a subword model.

    The files are read as one corpus, in the order given. A first pass counts
    the lines and records where each chunk starts, so any chunk can be read
    alone (for resumption and shards) without holding the text.

    Args:
        files: the text files.
        chunk_size: sentences per chunk.
        src_dict: the teacher's source dictionary.
        spm_model: a sentencepiece model applied to each line, or None.
        bpe_codes: subword-nmt BPE codes applied to each line, or None.
            With neither, lines are taken as already segmented.
    """

    has_reference = False

    def __init__(self, files, chunk_size, src_dict, spm_model=None, bpe_codes=None):
        if spm_model and bpe_codes:
            raise DistillError("give --spm-model or --bpe-codes, not both")
        self.files, self.src_dict = list(files), src_dict
        self.spm_model, self.bpe_codes = spm_model, bpe_codes
        self.chunk_size = chunk_size
        self.starts, n = [], 0  # (file index, byte offset) of each chunk's first line
        for f_idx, path in enumerate(self.files):
            if not os.path.isfile(path):
                raise DistillError(f"--source-text: no such file: {path}")
            with open(path, "rb") as f:
                pos = 0
                for line in f:
                    if n % chunk_size == 0:
                        self.starts.append((f_idx, pos))
                    pos += len(line)
                    n += 1
        self.n = n
        self._encoder = None

    def __len__(self):
        return self.n

    def describe(self) -> Dict:
        """What the run config records of this input."""
        return {
            "kind": "source-text",
            "files": [file_identity(p) for p in self.files],
            "spm_model": file_identity(self.spm_model) if self.spm_model else None,
            "bpe_codes": file_identity(self.bpe_codes) if self.bpe_codes else None,
        }

    def encoder(self):
        """A function from a raw line to its subword line."""
        if self._encoder is None:
            if self.spm_model:
                import sentencepiece

                sp = sentencepiece.SentencePieceProcessor(model_file=self.spm_model)
                self._encoder = lambda line: " ".join(sp.encode(line, out_type=str))
            elif self.bpe_codes:
                from subword_nmt.apply_bpe import BPE

                with open(self.bpe_codes, encoding="utf-8") as f:
                    bpe = BPE(f)
                self._encoder = lambda line: bpe.process_line(line).strip()
            else:
                self._encoder = lambda line: " ".join(line.split())
        return self._encoder

    def raw_lines(self, ids: range) -> List[bytes]:
        """The raw lines ``ids`` (one chunk, or a part of one), without newline."""
        k = ids.start // self.chunk_size
        skip = ids.start - k * self.chunk_size
        f_idx, pos = self.starts[k]
        out = []
        while len(out) < skip + len(ids):
            with open(self.files[f_idx], "rb") as f:
                f.seek(pos)
                for line in f:
                    out.append(line.rstrip(b"\r\n"))
                    if len(out) == skip + len(ids):
                        break
            f_idx, pos = f_idx + 1, 0
        return out[skip:]

    def chunk(self, ids: range) -> Chunk:
        """The sentences ``ids``, encoded."""
        raw = self.raw_lines(ids)
        encode, d = self.encoder(), self.src_dict
        src = [encode(x.decode("utf-8", errors="replace")) for x in raw]
        src_ids = [
            d.encode_line(x, add_if_not_exist=False, append_eos=True).numpy()
            for x in src
        ]
        return Chunk(src_ids, src, None, [zlib.crc32(x) for x in raw])

    def fingerprints(self, ids: range) -> List[int]:
        """CRC-32 of the raw lines ``ids``."""
        return [zlib.crc32(x) for x in self.raw_lines(ids)]


def open_corpus(args, task, chunk_size, direction=None):
    """The input named by the options: ``--source-text``, ``--source-bin`` or ``DATA``.

    Args:
        args: the ``fairseq-kd-distill`` options.
        task: the translation task (the teacher's dictionaries, from ``DATA``).
        chunk_size: sentences per chunk.
        direction: a multilingual direction (see ``directions.split_directions``):
            its binarized split, which the teacher reads with the direction's
            source tag first, as fairseq's multilingual task gives it.
    """
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    src, tgt = args.source_lang, args.target_lang
    if direction is not None:
        manager, spec = task.data_manager, direction.encoder_spec
        src, tgt = direction.src, direction.tgt
        return BinarizedCorpus(
            direction.data_path,
            args.gen_subset,
            src,
            tgt,
            src_dict,
            tgt_dict,
            source_transform=lambda ds: manager.src_dataset_tranform_func(
                src, tgt, ds, spec
            ),
        )
    if args.source_text:
        return TextCorpus(
            args.source_text, chunk_size, src_dict, args.spm_model, args.bpe_codes
        )
    if args.source_bin:
        mine = os.path.join(args.source_bin, f"dict.{src}.txt")
        theirs = os.path.join(args.data, f"dict.{src}.txt")
        if (
            os.path.exists(mine)
            and open(mine, "rb").read() != open(theirs, "rb").read()
        ):
            raise DistillError(
                f"--source-bin: {mine} differs from the teacher's {theirs}: binarize "
                f"the text with fairseq-preprocess --only-source --srcdict {theirs}"
            )
        return BinarizedCorpus(
            args.source_bin, args.gen_subset, src, tgt, src_dict, tgt_dict, True
        )
    return BinarizedCorpus(args.data, args.gen_subset, src, tgt, src_dict, tgt_dict)
