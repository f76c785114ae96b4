"""On-disk store of a teacher's top-k distributions: format, signature, reader, writer.

A store is a folder::

    header.json    signature, array shapes, sizes and sha256 checksums
    indices.bin    N x k vocabulary ids (uint16, or int32 for >= 65,536 symbols)
    lprobs.bin     N x k log-probabilities under the full softmax, T = 1 (float16)
    offsets.bin    (S + 1) int64: sentence i covers rows offsets[i]:offsets[i+1]
    ids.bin        shards only: the S sentence ids the shard holds (int64)

``N`` is the number of target tokens (EOS included) and ``S`` the number of
sentences, both in sentence-id order. While a dump runs, ``progress.json``
replaces ``header.json``; the header is written last, so a folder without one is
an unfinished dump.
"""

import hashlib
import json
import os

import numpy as np

FORMAT_NAME = "fairseq-kd-topk"
FORMAT_VERSION = 1
HEADER = "header.json"
PROGRESS = "progress.json"
LPROB_DTYPE = np.dtype("float16")
OFFSET_DTYPE = np.dtype("int64")
ID_DTYPE = np.dtype("int64")
MAX_TOKEN_SAMPLES = 1000  # sentences whose tokens are hashed into the signature
_HASH_CHUNK = 1 << 22  # bytes read at a time when hashing a file
_MASS_ROWS = 1 << 20  # rows at a time when computing the average top-k mass

# fields of the signature that tie a store to one binarized split
DATA_FIELDS = (
    "split",
    "num_sentences",
    "source_dictionary",
    "target_dictionary",
    "source_lengths_sha256",
    "target_lengths_sha256",
    "tokens_sample_sha256",
)


DATA_FOLDER_PREFIX = "data-"  # DIR/data-000...: one store per data folder


def data_folder_output(output, index, num_folders):
    """The store of data folder ``index`` under ``output``.

    With one data folder the store is ``output`` itself; with several
    (``DATA=bin1:bin2``, which fairseq reads one per epoch for the training
    split), folder ``i`` (from 0, in the order given) has
    ``output/data-III``.

    Args:
        output: the store folder (``--output`` / ``--teacher-topk`` or its
            split subfolder).
        index: the data folder's position in ``DATA``.
        num_folders: how many folders ``DATA`` names.
    """
    if num_folders <= 1:
        return output
    return os.path.join(output, f"{DATA_FOLDER_PREFIX}{index:03d}")


def data_folder_stores(path):
    """The ``data-III`` subfolders of ``path`` (sorted), [] if none.

    Args:
        path: a folder.
    """
    if not os.path.isdir(path):
        return []
    return sorted(
        d
        for d in os.listdir(path)
        if d.startswith(DATA_FOLDER_PREFIX) and os.path.isdir(os.path.join(path, d))
    )


class TopKStoreError(ValueError):
    """A store that cannot be read: missing, unfinished, truncated or corrupt."""


class TopKStoreMismatch(TopKStoreError):
    """A readable store that was dumped from other data than it is used with."""


def index_dtype(dict_size):
    """The dtype of stored vocabulary ids for a dictionary of ``dict_size``.

    Args:
        dict_size: number of symbols in the target dictionary.
    """
    return np.dtype("uint16") if dict_size < 65536 else np.dtype("int32")


def _sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def dictionary_signature(dictionary):
    """Size and sha256 of a fairseq dictionary's symbols, in id order.

    Symbol counts do not change token ids, so only the symbols are hashed.

    Args:
        dictionary: a ``fairseq.data.Dictionary``.
    """
    text = "\n".join(dictionary.symbols).encode("utf-8")
    return {"size": len(dictionary), "sha256": _sha256_bytes(text)}


def first_symbol_difference(a, b):
    """The first id where two dictionaries hold different symbols.

    Args:
        a: a ``fairseq.data.Dictionary`` (or a list of symbols).
        b: another one.

    Returns:
        ``(index, symbol_a, symbol_b)``, a missing symbol given as None, or
        None when both hold the same symbols in the same order.
    """
    a, b = list(getattr(a, "symbols", a)), list(getattr(b, "symbols", b))
    for i in range(max(len(a), len(b))):
        sa = a[i] if i < len(a) else None
        sb = b[i] if i < len(b) else None
        if sa != sb:
            return i, sa, sb
    return None


def describe_symbol_difference(a, b, name_a, name_b):
    """A sentence naming the first id where dictionaries ``a`` and ``b`` differ.

    Args:
        a: a ``fairseq.data.Dictionary``.
        b: another one.
        name_a: what ``a`` is (for the message).
        name_b: what ``b`` is.

    Returns:
        The sentence, or "" when both hold the same symbols.
    """
    diff = first_symbol_difference(a, b)
    if diff is None:
        return ""
    i, sa, sb = diff
    sig_a, sig_b = dictionary_signature(a), dictionary_signature(b)
    return (
        f"the first difference is at index {i}: {sa!r} in {name_a} "
        f"({sig_a['size']} symbols, sha256 {sig_a['sha256'][:12]}), {sb!r} in "
        f"{name_b} ({sig_b['size']} symbols, sha256 {sig_b['sha256'][:12]})"
    )


def lengths_sha256(lengths):
    """sha256 of sentence lengths, as little-endian int64.

    Args:
        lengths: one length per sentence, in id order.
    """
    return _sha256_bytes(np.asarray(lengths, dtype="<i8").tobytes())


def token_sample_ids(num_sentences):
    """Ids of the sentences whose tokens are hashed into the signature.

    All sentences when there are at most ``MAX_TOKEN_SAMPLES``, else that many
    evenly spaced ones (always including the first and the last).

    Args:
        num_sentences: size of the split.
    """
    if num_sentences <= MAX_TOKEN_SAMPLES:
        return np.arange(num_sentences, dtype=np.int64)
    return np.unique(
        np.linspace(0, num_sentences - 1, MAX_TOKEN_SAMPLES).round().astype(np.int64)
    )


def _unbucketed(dataset, sizes):
    """Token dataset and sizes before ``BucketPadLengthDataset`` padding."""
    from fairseq.data import BucketPadLengthDataset

    if isinstance(dataset, BucketPadLengthDataset):
        return dataset.dataset, np.asarray(dataset.dataset.sizes)
    return dataset, np.asarray(sizes)


def pair_sizes(dataset):
    """Unpadded source and target lengths of a ``LanguagePairDataset``.

    Args:
        dataset: the language-pair dataset of one split (with targets).
    """
    if getattr(dataset, "tgt", None) is None:
        raise TopKStoreError("a top-k store needs a split with target sentences")
    _, src_sizes = _unbucketed(dataset.src, dataset.src_sizes)
    _, tgt_sizes = _unbucketed(dataset.tgt, dataset.tgt_sizes)
    return src_sizes.astype(np.int64), tgt_sizes.astype(np.int64)


def tokens_sample_sha256(dataset, pad):
    """sha256 of the source and target tokens of the sampled sentences.

    Args:
        dataset: the language-pair dataset.
        pad: padding id (stripped, so bucketed datasets hash the same).
    """
    src, _ = _unbucketed(dataset.src, dataset.src_sizes)
    tgt, _ = _unbucketed(dataset.tgt, dataset.tgt_sizes)
    digest = hashlib.sha256()
    for i in token_sample_ids(len(dataset)):
        for part in (src[int(i)], tgt[int(i)]):
            tokens = np.asarray(part, dtype="<i8")
            digest.update(tokens[tokens != pad].tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def data_signature(dataset, src_dict, tgt_dict, split, direction=None):
    """The part of a store's signature that describes the binarized split.

    Args:
        dataset: the split's ``LanguagePairDataset`` (multilingual: one
            direction's, language tags included).
        src_dict: source dictionary.
        tgt_dict: target dictionary.
        split: the split's name (``train``, ``valid``...).
        direction: a multilingual task's direction, ``{"lang_pair": "de-en",
            "source_langtok": "__de__" or None, "target_langtok": ...}`` (see
            :func:`describe_direction`); None for a bilingual task.
    """
    src_sizes, tgt_sizes = pair_sizes(dataset)
    signature = {} if direction is None else {"direction": direction}
    return signature | {
        "split": split,
        "num_sentences": int(len(tgt_sizes)),
        "source_dictionary": dictionary_signature(src_dict),
        "target_dictionary": dictionary_signature(tgt_dict),
        "source_lengths_sha256": lengths_sha256(src_sizes),
        "target_lengths_sha256": lengths_sha256(tgt_sizes),
        "tokens_sample_sha256": tokens_sample_sha256(dataset, tgt_dict.pad()),
    }


def describe_direction(direction):
    """``de-en (source tag __de__, target tag __en__)``, or ``no direction``.

    Args:
        direction: a signature's ``direction`` (see :func:`data_signature`).
    """
    if not direction:
        return "no direction (a bilingual store)"
    tags = [
        f"{side} tag {direction.get(f'{side}_langtok')}"
        for side in ("source", "target")
        if direction.get(f"{side}_langtok")
    ]
    return f"{direction['lang_pair']} ({', '.join(tags) or 'no language tags'})"


def file_sha256(path):
    """sha256 of a file's bytes, read in chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + rename).

    Args:
        path: destination.
        obj: a JSON-serialisable object.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _array_spec(name, dtype, shape):
    dtype = np.dtype(dtype)
    return {
        "file": f"{name}.bin",
        "dtype": dtype.name,
        "shape": [int(s) for s in shape],
        "bytes": int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,
    }


def _memmap(path, spec, mode):
    """A memory map of one array (a plain empty array when it has no bytes)."""
    shape = tuple(spec["shape"])
    if spec["bytes"] == 0:
        if mode == "w+":
            open(path, "wb").close()
        return np.zeros(shape, dtype=spec["dtype"])
    return np.memmap(path, dtype=spec["dtype"], mode=mode, shape=shape)


def _describe(value):
    if isinstance(value, dict) and "size" in value:
        return f"{value['size']} symbols, sha256 {value['sha256'][:12]}"
    if isinstance(value, str) and len(value) == 64:
        return f"sha256 {value[:12]}"
    return repr(value)


class TopKStore:
    """Read-only access to a finished top-k store through lazy memory maps.

    Opening reads only the header and checks the files' sizes and the offsets;
    the arrays are mapped on first access, in each process (the object pickles
    without its maps, so DataLoader workers map the files themselves).

    Args:
        path: the store folder.
        verify_checksums: also check every array's sha256 (reads the store).
    """

    def __init__(self, path, verify_checksums=False):
        self.path = path
        self.header = self._read_header(path)
        self.k = int(self.header["k"])
        self.num_sentences = int(self.header["arrays"]["offsets"]["shape"][0]) - 1
        self.num_tokens = int(self.header["num_tokens"])
        self._maps = None
        self._check_sizes()
        self._check_offsets()
        if verify_checksums:
            self.verify_checksums()

    @staticmethod
    def _read_header(path):
        header_path = os.path.join(path, HEADER)
        if not os.path.isdir(path):
            raise TopKStoreError(f"top-k store {path} does not exist")
        if not os.path.isfile(header_path):
            if os.path.isfile(os.path.join(path, PROGRESS)):
                raise TopKStoreError(
                    f"top-k store {path} is an unfinished dump ({PROGRESS} but no "
                    f"{HEADER}): run the same fairseq-kd-dump-topk command again "
                    "to finish it"
                )
            shards = [d for d in os.listdir(path) if d.startswith("shard-")]
            hint = (
                f"; it holds shards: merge them with fairseq-kd-merge-topk {path}"
                if shards
                else ""
            )
            raise TopKStoreError(f"top-k store {path} has no {HEADER}{hint}")
        try:
            with open(header_path) as f:
                header = json.load(f)
        except ValueError as e:
            raise TopKStoreError(
                f"{header_path} is not valid JSON ({e}): the store is corrupt"
            )
        if header.get("format") != FORMAT_NAME:
            raise TopKStoreError(f"{header_path} is not a {FORMAT_NAME} header")
        if header.get("format_version") != FORMAT_VERSION:
            raise TopKStoreError(
                f"top-k store {path} has format version "
                f"{header.get('format_version')}, this fairseq-kd reads version "
                f"{FORMAT_VERSION}: dump the store again"
            )
        return header

    @property
    def is_shard(self):
        """Whether this is one shard of a sharded dump (not yet merged)."""
        return "shard" in self.header

    def _file(self, name):
        return os.path.join(self.path, self.header["arrays"][name]["file"])

    def _check_sizes(self):
        for name, spec in sorted(self.header["arrays"].items()):
            path = self._file(name)
            if not os.path.isfile(path):
                raise TopKStoreError(f"top-k store {self.path} lacks {spec['file']}")
            size = os.path.getsize(path)
            if size != spec["bytes"]:
                raise TopKStoreError(
                    f"{path} has {size} bytes but the header says {spec['bytes']}: "
                    "the store is truncated or corrupt"
                )
        for name in ("indices", "lprobs"):
            shape = self.header["arrays"][name]["shape"]
            if shape != [self.num_tokens, self.k]:
                raise TopKStoreError(
                    f"top-k store {self.path}: {name} has shape {shape}, expected "
                    f"[{self.num_tokens}, {self.k}]: the header is corrupt"
                )

    def _check_offsets(self):
        offsets = self.offsets
        if (
            len(offsets) == 0
            or offsets[0] != 0
            or offsets[-1] != self.num_tokens
            or bool(np.any(np.diff(offsets) < 0))
        ):
            raise TopKStoreError(
                f"{self._file('offsets')} does not hold increasing offsets from 0 "
                f"to {self.num_tokens}: the store is corrupt"
            )

    def _arrays(self):
        if self._maps is None:
            self._maps = {
                name: _memmap(self._file(name), spec, "r")
                for name, spec in self.header["arrays"].items()
            }
        return self._maps

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None  # each process maps the files itself
        return state

    @property
    def offsets(self):
        """Per-sentence start rows, ``S + 1`` int64 (memory-mapped)."""
        return self._arrays()["offsets"]

    @property
    def ids(self):
        """Sentence ids held by a shard (all sentences for a full store)."""
        if "ids" in self.header["arrays"]:
            return self._arrays()["ids"]
        return np.arange(self.num_sentences, dtype=np.int64)

    def lengths(self):
        """Number of stored target positions of every sentence."""
        return np.diff(np.asarray(self.offsets))

    def __len__(self):
        return self.num_sentences

    def entry(self, i):
        """The stored top-k of sentence ``i`` (a full store's sentence id).

        Args:
            i: sentence id.

        Returns:
            ``(lprobs, indices)``: ``L x k`` float16 log-probabilities and
            ``L x k`` int64 vocabulary ids, ``L`` the target length with EOS.
        """
        arrays = self._arrays()
        start, end = int(arrays["offsets"][i]), int(arrays["offsets"][i + 1])
        lprobs = np.array(arrays["lprobs"][start:end])
        indices = arrays["indices"][start:end].astype(np.int64)
        return lprobs, indices

    def verify_checksums(self):
        """Check every array file against the sha256 in the header."""
        for name, spec in sorted(self.header["arrays"].items()):
            actual = file_sha256(self._file(name))
            if actual != spec["sha256"]:
                raise TopKStoreError(
                    f"{self._file(name)} has sha256 {actual[:12]}... but the header "
                    f"says {spec['sha256'][:12]}...: the store is corrupt"
                )

    def verify_against(self, dataset, src_dict, tgt_dict, split, direction=None):
        """Refuse to serve ``split`` unless the store was dumped from it.

        Compares the direction (multilingual data: language pair and
        language tags) first, then the split name, the dictionaries, the
        number of sentences, their source and target lengths, and the tokens
        of sampled sentences.

        Args:
            dataset: the split's ``LanguagePairDataset``.
            src_dict: source dictionary.
            tgt_dict: target dictionary.
            split: the split's name.
            direction: the direction it serves (see :func:`data_signature`).

        Raises:
            TopKStoreMismatch: naming every difference found.
        """
        if self.is_shard:
            shard = self.header["shard"]
            raise TopKStoreMismatch(
                f"top-k store {self.path} is shard {shard['shard_id']} of "
                f"{shard['num_shards']}: merge the shards with fairseq-kd-merge-topk"
            )
        stored = self.header.get("direction")
        if stored != direction:
            raise TopKStoreMismatch(
                f"top-k store {self.path} was dumped for "
                f"{describe_direction(stored)}, but it is read for "
                f"{describe_direction(direction)} of split '{split}'. Give each "
                "direction its own store (fairseq-kd-dump-topk --task "
                "translation_multi_simple_epoch_kd writes OUTPUT/SRC-TGT), dumped "
                "with this run's --lang-pairs and language-token options."
            )
        expected = data_signature(dataset, src_dict, tgt_dict, split, direction)
        problems = []
        for key in DATA_FIELDS:
            stored, actual = self.header.get(key), expected[key]
            if stored == actual:
                continue
            line = f"{key}: store has {_describe(stored)}, data has {_describe(actual)}"
            if key == "source_dictionary":
                line += self._symbol_difference(key, src_dict)
            elif key == "target_dictionary":
                line += self._symbol_difference(key, tgt_dict)
            if key == "target_lengths_sha256" and self.num_sentences == len(dataset):
                line += self._first_length_difference(pair_sizes(dataset)[1])
            problems.append(line)
        if problems:
            raise TopKStoreMismatch(
                f"top-k store {self.path} was not dumped from split '{split}' of "
                "this data:\n  - "
                + "\n  - ".join(problems)
                + "\nDump the teacher again for this split (fairseq-kd-dump-topk)."
            )

    def _symbol_difference(self, key, dictionary):
        """Where the store's dictionary differs from ``dictionary``, if known.

        The header holds only the symbols' sha256; the symbols themselves are
        read from the dictionary file of the data folder the dump recorded,
        when it still exists and still hashes the same.
        """
        lang = self.header.get(
            "source_lang" if key.startswith("source") else "target_lang"
        )
        folder = self.header.get("data_folder")
        file = os.path.join(folder, f"dict.{lang}.txt") if folder and lang else None
        if file and os.path.isfile(file):
            from fairseq.data import Dictionary

            stored = Dictionary.load(file)
            if dictionary_signature(stored) == self.header.get(key):
                return "; " + describe_symbol_difference(
                    stored, dictionary, f"the store's {file}", "the data's"
                )
        return (
            " (the store records only the sha256 of its symbols, and the "
            "dictionary of the data it was dumped from is not at hand: the first "
            "differing symbol cannot be named)"
        )

    def _first_length_difference(self, tgt_sizes):
        differ = np.nonzero(self.lengths() != tgt_sizes)[0]
        if len(differ) == 0:
            return ""
        i = int(differ[0])
        return (
            f" ({len(differ)} sentences differ, the first is sentence {i}: "
            f"{int(self.lengths()[i])} target tokens in the store, "
            f"{int(tgt_sizes[i])} in the data)"
        )

    def describe(self):
        """A one-line summary of the store for logs."""
        h = self.header
        teachers = ", ".join(
            f"{os.path.basename(t['path'])} ({t['sha256'][:12]})" for t in h["teachers"]
        )
        return (
            f"top-k store {self.path}: split '{h['split']}', "
            f"{self.num_sentences:,} sentences, {self.num_tokens:,} target tokens, "
            f"k={self.k}, teacher {teachers}, "
            f"average top-k mass {h.get('avg_topk_mass', float('nan')):.4f}"
        )


class TopKWriter:
    """Create (or resume) a store and fill it sentence by sentence.

    The arrays are allocated at their final size up front, so every sentence
    has a fixed place whatever order the batches come in. ``commit`` flushes
    the maps and records progress in ``progress.json``; ``finalize`` writes
    ``header.json`` with checksums and removes the progress file.

    Args:
        path: the store folder (created).
        signature: header fields describing data, teacher and dump settings.
        lengths: target lengths (EOS included) of the stored sentences, in
            id order.
        k: entries per position.
        ids: the sentence ids stored (a shard), or None for all of them.
        run_key: anything JSON-serialisable that must match to resume.
    """

    def __init__(self, path, signature, lengths, k, ids=None, run_key=None):
        self.path = path
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=OFFSET_DTYPE)
        np.cumsum(lengths, out=offsets[1:])
        num_tokens = int(offsets[-1])
        tgt_size = signature["target_dictionary"]["size"]
        self.specs = {
            "indices": _array_spec("indices", index_dtype(tgt_size), (num_tokens, k)),
            "lprobs": _array_spec("lprobs", LPROB_DTYPE, (num_tokens, k)),
            "offsets": _array_spec("offsets", OFFSET_DTYPE, offsets.shape),
        }
        if ids is not None:
            self.specs["ids"] = _array_spec("ids", ID_DTYPE, (len(ids),))
        self.signature = dict(signature, k=int(k), num_tokens=num_tokens)
        self.run_key = {"signature": self.signature, "run": run_key}
        self.offsets = offsets
        self.ids = None if ids is None else np.asarray(ids, dtype=ID_DTYPE)
        self.batches_done = self._open()

    def _open(self):
        os.makedirs(self.path, exist_ok=True)
        header, progress = (os.path.join(self.path, f) for f in (HEADER, PROGRESS))
        if os.path.isfile(header):
            raise TopKStoreError(
                f"{self.path} already holds a finished top-k store: choose another "
                "--output or delete it"
            )
        resume = os.path.isfile(progress)
        if resume:
            with open(progress) as f:
                state = json.load(f)
            if state["run_key"] != self.run_key:
                differ = differing_keys(state["run_key"], self.run_key)
                raise TopKStoreError(
                    f"{self.path} holds an unfinished dump made with other settings "
                    f"({', '.join(differ)} differ): rerun with the same ones, or "
                    "delete the folder to start over"
                )
        elif any(
            os.path.exists(os.path.join(self.path, s["file"]))
            for s in self.specs.values()
        ):
            raise TopKStoreError(
                f"{self.path} holds array files but no {PROGRESS}: delete them first"
            )
        mode = "r+" if resume else "w+"
        self.maps = {
            name: _memmap(os.path.join(self.path, spec["file"]), spec, mode)
            for name, spec in self.specs.items()
        }
        if not resume:
            self.maps["offsets"][:] = self.offsets
            if self.ids is not None:
                self.maps["ids"][:] = self.ids
            self.commit(0)
            return 0
        for name in ("offsets", "ids"):
            if name in self.maps and not np.array_equal(
                self.maps[name], self.offsets if name == "offsets" else self.ids
            ):
                raise TopKStoreError(f"{self.path}: {name}.bin was changed; start over")
        return int(state["batches_done"])

    @property
    def num_tokens(self):
        """Rows of the arrays (target tokens stored)."""
        return int(self.offsets[-1])

    def local_positions(self, sentence_ids):
        """Positions of ``sentence_ids`` among the stored sentences.

        Args:
            sentence_ids: ids of sentences this store holds.
        """
        sentence_ids = np.asarray(sentence_ids, dtype=np.int64)
        if self.ids is None:
            return sentence_ids
        pos = np.searchsorted(self.ids, sentence_ids)
        if np.any(pos >= len(self.ids)) or np.any(
            self.ids[np.minimum(pos, len(self.ids) - 1)] != sentence_ids
        ):
            raise ValueError("sentence not held by this shard")
        return pos

    def write(self, sentence_ids, lprobs, indices):
        """Store the top-k of whole sentences.

        Args:
            sentence_ids: the sentences, in the order of the rows below.
            lprobs: their positions' log-probabilities, concatenated
                sentence after sentence (``sum(L) x k``, float).
            indices: the matching vocabulary ids (``sum(L) x k``).
        """
        positions = self.local_positions(sentence_ids)
        starts, ends = self.offsets[positions], self.offsets[positions + 1]
        total = int((ends - starts).sum())
        if total != len(lprobs) or total != len(indices):
            raise ValueError(
                f"got {len(lprobs)} rows for sentences whose targets have "
                f"{total} tokens"
            )
        lp = np.asarray(lprobs).astype(LPROB_DTYPE)
        ix = np.asarray(indices).astype(self.specs["indices"]["dtype"])
        row = 0
        for start, end in zip(starts.tolist(), ends.tolist()):
            n = end - start
            self.maps["lprobs"][start:end] = lp[row : row + n]
            self.maps["indices"][start:end] = ix[row : row + n]
            row += n

    def _flush(self):
        for m in self.maps.values():
            if isinstance(m, np.memmap):
                m.flush()

    def commit(self, batches_done, extra=None):
        """Make everything written so far durable and record the progress.

        Args:
            batches_done: how many batches of the dump plan are complete.
            extra: more JSON-serialisable state to keep.
        """
        self._flush()
        state = {"run_key": self.run_key, "batches_done": int(batches_done)}
        state.update(extra or {})
        write_json_atomic(os.path.join(self.path, PROGRESS), state)
        self.batches_done = int(batches_done)

    def finalize(self):
        """Write checksums and the header; the store is complete afterwards.

        Returns:
            The header (a dict).
        """
        self._flush()
        arrays = {}
        for name, spec in self.specs.items():
            arrays[name] = dict(
                spec, sha256=file_sha256(os.path.join(self.path, spec["file"]))
            )
        header = dict(self.signature, arrays=arrays)
        header["avg_topk_mass"] = average_topk_mass(self.maps["lprobs"])
        header.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
        self.maps = {}
        write_json_atomic(os.path.join(self.path, HEADER), header)
        os.remove(os.path.join(self.path, PROGRESS))
        return header


def average_topk_mass(lprobs):
    """Mean over positions of the probability mass of the stored top-k.

    Computed in float64 over fixed chunks of rows, so equal arrays give equal
    results however they were produced.

    Args:
        lprobs: ``N x k`` stored log-probabilities.
    """
    if len(lprobs) == 0:
        return 0.0
    total = 0.0
    for start in range(0, len(lprobs), _MASS_ROWS):
        chunk = np.asarray(lprobs[start : start + _MASS_ROWS], dtype=np.float64)
        total += float(np.exp(chunk).sum())
    return round(total / len(lprobs), 6)


def differing_keys(a, b, prefix=""):
    """Dotted names of the fields where two JSON-like dicts differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "value"]
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}.{key}" if prefix else key
        if a.get(key) != b.get(key):
            out.extend(differing_keys(a.get(key), b.get(key), name))
    return out


def merge_shards(folder, output=None, delete_shards=False):
    """Merge the shards of a sharded dump into one store.

    Args:
        folder: the ``--output`` folder of the sharded dumps (holds
            ``shard-III-of-NNN`` subfolders).
        output: where to write the merged store (default: ``folder``).
        delete_shards: remove the shard folders once merged.

    Returns:
        The merged store's header.
    """
    output = output or folder
    names = sorted(d for d in os.listdir(folder) if d.startswith("shard-"))
    if not names:
        raise TopKStoreError(f"{folder} holds no shard-*-of-* folders to merge")
    shards = [TopKStore(os.path.join(folder, d)) for d in names]
    num_shards = shards[0].header["shard"]["num_shards"]
    found = sorted(s.header["shard"]["shard_id"] for s in shards)
    if found != list(range(num_shards)):
        missing = sorted(set(range(num_shards)) - set(found))
        raise TopKStoreError(
            f"{folder}: expected {num_shards} finished shards, missing shard ids "
            f"{missing} (finish them with fairseq-kd-dump-topk --shard-id ...)"
        )
    ref = _merged_signature(shards[0].header)
    for s in shards[1:]:
        other = _merged_signature(s.header)
        if other != ref:
            raise TopKStoreMismatch(
                f"shards {shards[0].path} and {s.path} come from different dumps "
                f"({', '.join(differing_keys(ref, other))} differ)"
            )
    n = int(ref["num_sentences"])
    lengths = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    for s in shards:
        ids = np.asarray(s.ids)
        if np.any(seen[ids]):
            raise TopKStoreError(f"shard {s.path} repeats sentences of another shard")
        seen[ids] = True
        lengths[ids] = s.lengths()
    if not seen.all():
        raise TopKStoreError(f"the shards in {folder} do not cover all {n} sentences")
    signature = {k: v for k, v in ref.items() if k not in ("k", "num_tokens")}
    writer = TopKWriter(output, signature, lengths, ref["k"], run_key="merge")
    for s in shards:
        ids = np.asarray(s.ids)
        for lo in range(0, len(ids), 65536):
            chunk = ids[lo : lo + 65536]
            start, end = int(s.offsets[lo]), int(s.offsets[lo + len(chunk)])
            arrays = s._arrays()
            writer.write(
                chunk, arrays["lprobs"][start:end], arrays["indices"][start:end]
            )
    header = writer.finalize()
    if delete_shards:
        import shutil

        for s in shards:
            shutil.rmtree(s.path)
    return header


def _merged_signature(header):
    """A shard's header without what differs between shards of one dump."""
    drop = (
        "arrays",
        "shard",
        "avg_topk_mass",
        "num_tokens",
        "format",
        "format_version",
    )
    sig = {k: v for k, v in header.items() if k not in drop}
    return sig
