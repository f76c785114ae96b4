"""Writing a distilled corpus as a stream: text and binarized, committed at the end."""

import os
import shutil
from typing import Optional

import numpy as np
import torch


def line_encoder(dictionary):
    """A function from a token line to its ids with ``</s>``, as ``encode_line``.

    The same ids as ``dictionary.encode_line(line, add_if_not_exist=False)``
    (unknown tokens as ``<unk>``, whitespace runs as one separator), several
    times faster.

    Args:
        dictionary: a fairseq ``Dictionary``.
    """
    get, unk, eos = dictionary.indices.get, dictionary.unk(), dictionary.eos()

    def encode(line: str):
        ids = [get(w, unk) for w in line.split()]
        ids.append(eos)
        return torch.from_numpy(np.array(ids, dtype=np.int32))

    return encode


class CorpusWriter:
    """Text and binarized corpus written pair by pair, in constant memory.

    ``<folder>/<split>.<src|tgt>`` (and ``<split>.ids`` when ids are given)
    and ``<folder>/bin`` are built under temporary names and moved into place
    by :meth:`commit`. The binarized files are what ``fairseq-preprocess``
    writes (mmap, ``</s>`` appended, unknown tokens as ``<unk>``); ``bin`` also
    gets the teacher's dictionaries and copies of ``data_dir``'s other splits,
    so that ``fairseq-train <folder>/bin`` runs as is.

    Args:
        folder: the output folder (created).
        split: the split name of the files.
        src: source language.
        tgt: target language.
        src_dict: dictionary that binarizes the source side.
        tgt_dict: dictionary that binarizes the target side.
        data_dir: the teacher's data folder (dictionaries, other splits).
        write_ids: also write ``<split>.ids``.
        bin_dir: a binarized folder shared with other directions (a
            multilingual corpus): :meth:`commit` moves this pair's files into
            it one by one, beside the other directions' (default:
            ``<folder>/bin``, replaced as a whole).
    """

    def __init__(
        self,
        folder,
        split,
        src,
        tgt,
        src_dict,
        tgt_dict,
        data_dir,
        write_ids=False,
        bin_dir=None,
    ):
        from fairseq.data import indexed_dataset

        os.makedirs(folder, exist_ok=True)
        self.folder, self.split, self.data_dir = folder, split, data_dir
        self.shared_bin = bin_dir is not None
        self.langs, self.pair = (src, tgt), f"{src}-{tgt}"
        self.dicts = (src_dict, tgt_dict)
        pid = os.getpid()
        self.texts = {
            lang: os.path.join(folder, f"{split}.{lang}") for lang in self.langs
        }
        if write_ids:
            self.texts["ids"] = os.path.join(folder, f"{split}.ids")
        self.files = {
            k: open(f"{path}.tmp{pid}", "w", encoding="utf-8")
            for k, path in self.texts.items()
        }
        self.bin_dir = bin_dir or os.path.join(folder, "bin")
        self.tmp_bin = f"{self.bin_dir}.tmp{pid}"
        if self.shared_bin:  # beside other directions' writers of this process
            self.tmp_bin = f"{self.bin_dir}.{self.pair}.tmp{pid}"
        shutil.rmtree(self.tmp_bin, ignore_errors=True)
        os.makedirs(self.tmp_bin)
        self.prefixes = [
            os.path.join(self.tmp_bin, f"{split}.{self.pair}.{lang}")
            for lang in self.langs
        ]
        self.builders = [
            indexed_dataset.make_builder(p + ".bin", impl="mmap", vocab_size=len(d))
            for p, d in zip(self.prefixes, self.dicts)
        ]
        self.encoders = [line_encoder(d) for d in self.dicts]
        self.pairs, self.finalized = 0, False

    def add(self, src_line: str, tgt_line: str, sent_id: Optional[int] = None):
        """Append one pair of subword lines (and its corpus id).

        Args:
            src_line: the source, tokens separated by spaces.
            tgt_line: the target, tokens separated by spaces.
            sent_id: its corpus id (written to ``<split>.ids`` when kept).
        """
        for lang, line, enc, builder in zip(
            self.langs, (src_line, tgt_line), self.encoders, self.builders
        ):
            self.files[lang].write(line + "\n")
            builder.add_item(enc(line))
        if "ids" in self.files:
            self.files["ids"].write(f"{sent_id}\n")
        self.pairs += 1

    def finalize(self):
        """Close the temporary files (the data stays under temporary names)."""
        if self.finalized:
            return
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for p, builder in zip(self.prefixes, self.builders):
            builder.finalize(p + ".idx")
        self.finalized = True

    def append(self, other: "CorpusWriter"):
        """Append every pair of a finalized writer (text and binarized) to this one.

        Args:
            other: a writer of the same languages and dictionaries.
        """
        for lang in self.langs:
            with open(other.files[lang].name, encoding="utf-8") as f:
                shutil.copyfileobj(f, self.files[lang])
        for builder, prefix in zip(self.builders, other.prefixes):
            builder.merge_file_(prefix)
        self.pairs += other.pairs

    def commit(self):
        """Move the text files and the binarized folder into place."""
        self.finalize()
        pair, split = self.pair, self.split
        for name in os.listdir(self.data_dir):
            is_split = name.startswith(f"{split}.") or name.startswith(f"{split}{pair}")
            if name.startswith("dict.") or (pair in name and not is_split):
                shutil.copy2(
                    os.path.join(self.data_dir, name), os.path.join(self.tmp_bin, name)
                )
        for k, path in self.texts.items():
            os.replace(self.files[k].name, path)
        if self.shared_bin:
            os.makedirs(self.bin_dir, exist_ok=True)
            names = sorted(os.listdir(self.tmp_bin), key=lambda n: n.endswith(".idx"))
            for name in names:  # each .idx after its .bin
                os.replace(
                    os.path.join(self.tmp_bin, name), os.path.join(self.bin_dir, name)
                )
            os.rmdir(self.tmp_bin)
            return
        old = f"{self.bin_dir}.old{os.getpid()}"
        if os.path.exists(self.bin_dir):
            os.replace(self.bin_dir, old)
        os.replace(self.tmp_bin, self.bin_dir)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self):
        """Remove the temporary files (after an error)."""
        for f in self.files.values():
            if not f.closed:
                f.close()
            if os.path.exists(f.name):
                os.remove(f.name)
        shutil.rmtree(self.tmp_bin, ignore_errors=True)
