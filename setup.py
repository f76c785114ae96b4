"""Package set-up for fairseq-kd."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "fairseq_kd" / "__init__.py").read_text()
).group(1)

setup(
    name="fairseq-kd",
    version=VERSION,
    description="Knowledge distillation for fairseq translation models, as a plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.8",
    packages=find_packages(
        include=["fairseq_kd", "fairseq_kd.*", "kd_bench", "kd_bench.*"]
    ),
    install_requires=[
        # Official fairseq 0.12.2 does not import on Python >= 3.11 (mutable
        # dataclass defaults); ve-fairseq is a drop-in fork with prebuilt wheels
        # for CPython 3.11 and 3.12, fairseq-fixed a source fork for newer ones.
        # All three install the module ``fairseq``: exactly one is chosen here.
        'fairseq==0.12.2; python_version < "3.11"',
        've-fairseq==0.12.3; python_version >= "3.11" and python_version < "3.13"',
        'fairseq-fixed==0.12.3.1; python_version >= "3.13"',
        "torch>=1.13",
        "numpy",
        "sacrebleu>=2.0",
        "sentencepiece",
        "subword-nmt",
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",
            "black",
            "isort",
            "flake8",
            "matplotlib",
            "ctranslate2>=4.0",
        ],
        "ct2": ["ctranslate2>=4.0"],
        # the benchmark recipes (examples/multi30k ...): the BLEU-vs-speed plot
        # and CTranslate2 int8 speeds
        "bench": ["matplotlib", "ctranslate2>=4.0"],
    },
    entry_points={
        "console_scripts": [
            "fairseq-kd-distill = fairseq_kd.distill:cli_main",
            "fairseq-kd-dump-topk = fairseq_kd.dump_topk:cli_main",
            "fairseq-kd-export = fairseq_kd.export:cli_main",
            "fairseq-kd-merge-topk = fairseq_kd.dump_topk:merge_main",
            "fairseq-kd-bench = kd_bench.cli:entry",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
