"""Corpus descriptors: what a recipe knows about its data (one small file each)."""

import argparse
import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from kd_bench.preset import Preset


@dataclass
class Corpus:
    """A corpus and language pair the harness can run the table on.

    A descriptor file (``kd_bench/corpora/<key>.py``, or any Python file passed
    to ``python -m kd_bench``) defines ``CORPUS = Corpus(...)``.

    Args:
        key: short name (``python -m kd_bench KEY``; the default work folder).
        title: the corpus's name in the results.
        src: default source language.
        tgt: default target language.
        splits: fairseq split name -> file stem in the raw folder
            (``{"train": "train", "valid": "val", "test": "test_2016_flickr"}``).
        eval_sets: fairseq split -> name shown in the table, in table order.
        presets: preset name -> :class:`~kd_bench.preset.Preset`.
        default_preset: the preset used without ``--preset``.
        local_data: ``local_data(args)`` -> a raw folder already on disk, or
            None when the data must be fetched (default: ``--data``).
        fetch: ``fetch(dest, src, tgt)`` downloads and prepares the raw files
            into ``dest`` (None: the recipe cannot download).
        fetch_describe: one line saying what ``fetch`` downloads.
        fetched_suffix: what ``fetch`` appends to ``<stem>.<lang>`` ("" or
            ".gz").
        checksums: ``{"<stem>.<lang>": sha256 of the text}`` checked before use
            (files without one are not checked).
        reference: Markdown paragraph of published numbers to compare with.
        lang_pairs: the directions of the multilingual recipe without a value
            (``--lang-pairs``), e.g. ``"de-en,cs-en"`` (empty: none).
        multilingual_presets: the presets of the multilingual recipe
            (``--lang-pairs``); those not named here are ``presets``'.
    """

    key: str
    title: str
    src: str
    tgt: str
    splits: Dict[str, str]
    eval_sets: Dict[str, str]
    presets: Dict[str, Preset]
    default_preset: str
    local_data: Optional[Callable[[argparse.Namespace], Optional[str]]] = None
    fetch: Optional[Callable[[str, str, str], None]] = None
    fetch_describe: str = ""
    fetched_suffix: str = ""
    checksums: Dict[str, str] = field(default_factory=dict)
    reference: str = ""
    lang_pairs: str = ""
    multilingual_presets: Dict[str, Preset] = field(default_factory=dict)

    def presets_for(self, multilingual):
        """The presets of the bilingual or the multilingual recipe."""
        if not multilingual:
            return dict(self.presets)
        return {**self.presets, **self.multilingual_presets}

    def raw_folder(self, args):
        """The raw folder already on disk (``--data`` by default), or None."""
        if self.local_data is not None:
            return self.local_data(args)
        return args.data


def builtin_corpora():
    """The keys of the descriptors shipped in ``kd_bench/corpora``."""
    from kd_bench import corpora

    return sorted(m.name for m in pkgutil.iter_modules(corpora.__path__))


def load_corpus(name):
    """A descriptor: a built-in key (``multi30k``) or a Python file's ``CORPUS``.

    Args:
        name: the key of a descriptor in ``kd_bench/corpora``, or the path of
            a ``.py`` file that defines ``CORPUS = Corpus(...)``.
    """
    if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
            raise SystemExit(f"{name}: no such descriptor file")
        key = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(f"kd_bench_corpus_{key}", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        known = builtin_corpora()
        if name not in known:
            raise SystemExit(
                f"unknown corpus {name!r}: choose from {', '.join(known)} or pass "
                "a descriptor file (see docs/recipes.md)"
            )
        module = importlib.import_module(f"kd_bench.corpora.{name}")
    corpus = getattr(module, "CORPUS", None)
    if not isinstance(corpus, Corpus):
        raise SystemExit(f"{name}: defines no CORPUS = kd_bench.corpus.Corpus(...)")
    return corpus
