"""``python -m loadtests.bench [SUITE...] [--duration S] [--device auto|cpu|cuda]``: ``bluegreen bench`` without
the rest of the command line."""

import argparse
import sys
from pathlib import Path

from loadtests.bench.runner import main
from serving.repository import DEFAULT_REPOSITORY

cli = argparse.ArgumentParser(prog="python -m loadtests.bench")
cli.add_argument("suites", nargs="*")
cli.add_argument("--duration", type=float, default=10.0)
cli.add_argument("--out", type=Path, default=None)
cli.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
cli.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
opts = cli.parse_args()
sys.exit(main(opts.suites, duration_s=opts.duration, out_dir=opts.out, repo=opts.repo, device=opts.device))
