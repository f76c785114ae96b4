"""``python -m kd_bench CORPUS [options]``: run a benchmark recipe."""

from kd_bench.cli import entry

if __name__ == "__main__":
    entry()
