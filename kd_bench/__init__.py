"""The benchmark harness of fairseq-kd: staged recipes from raw text to RESULTS.md.

Never imported by the plugin (``fairseq_kd``); run it as ``python -m kd_bench``.
"""

__all__ = []
