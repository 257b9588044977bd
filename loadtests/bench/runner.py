"""``bluegreen bench``'s entry point: run the suites asked for, one after the other, and write the report after
each one (so an interrupted run keeps what it measured).

Exit status: 0 when every suite asked for ran with clean runs (no non-2xx answers, no socket errors, every run
on the path it is named after); 1 when a run was flagged; 2 when a suite could not measure (``wrk`` missing, a
server that would not start). Targets missed are reported (``BELOW``), not turned into a failure: on a shared
machine one noisy run is not a regression.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from loadtests.bench.base import DEFAULT_OUT, SuiteContext, SuiteError, SuiteSkipped
from loadtests.bench.report import summary_lines, write_results
from loadtests.bench.servers import describe_machine
from loadtests.bench.suites import SUITE_ORDER, SUITES
from serving.runtime import Device


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the suites' finally blocks, which stop the servers


def main(suites: Sequence[str], duration_s: float, out_dir: Path | None, repo: Path, device: Device = "auto") -> int:
    """Run the named suites in order (none named: every suite, in :data:`SUITE_ORDER`); write their JSON and
    regenerate the plot and benchmarks.md after each one."""
    out = out_dir if out_dir is not None else DEFAULT_OUT
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"error: unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if duration_s <= 0:
        print("error: --duration must be positive", file=sys.stderr)
        return 2
    runnable = list(dict.fromkeys(suites)) or [s for s in SUITE_ORDER if s in SUITES]
    if any(SUITES[s].needs_wrk for s in runnable) and shutil.which("wrk") is None:
        print("error: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="bluegreen-bench-") as work:
            for name in runnable:
                print(f"bench {name}: starting (measured runs of {duration_s:g}s)", flush=True)
                machine = describe_machine()
                date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                ctx = SuiteContext(duration_s=duration_s, repo=repo.resolve(), out_dir=out, work_dir=Path(work),
                                   machine=machine, device=device)
                started = time.monotonic()
                try:
                    doc = SUITES[name].run(ctx).as_json()
                except SuiteSkipped as exc:
                    print(f"bench {name}: {exc}; nothing written")
                    continue
                except (SuiteError, RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
                    print(f"bench {name}: FAILED, nothing written: {exc}", file=sys.stderr)
                    code = max(code, 2)
                    continue
                doc["date"] = date  # when the suite started measuring
                doc["machine"] = machine
                doc["elapsed_s"] = round(time.monotonic() - started, 1)
                path = write_results(out, doc)
                print(f"bench {name}: done in {doc['elapsed_s']:.0f}s -> {path}, {out / 'benchmarks.md'}")
                for line in summary_lines(doc):
                    print(line)
                if not doc.get("ok", True):
                    print(f"bench {name}: FLAGGED: a run had non-2xx answers or socket errors", file=sys.stderr)
                    code = max(code, 1)
    except KeyboardInterrupt:
        print("bench: interrupted; the servers it started are stopped, nothing more written", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return code
