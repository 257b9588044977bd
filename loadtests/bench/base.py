"""What every suite of ``bluegreen bench`` shares: its context, its two ways to stop (:class:`SuiteError`,
:class:`SuiteSkipped`), the result it returns (:class:`SuiteResult`, its ratios as :class:`Ratio`), how it names
the command that reproduces it, and the cell formats of the report's tables.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.repository import DEFAULT_REPOSITORY
from serving.runtime import Device

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUT = ROOT / "docs"
LOOPBACK = "127.0.0.1"  # the only address a benchmark ever targets
WARMUP_S = 2


@dataclass(frozen=True)
class SuiteContext:
    """What a suite is given: how long each measured run lasts, the model repository, where the report goes,
    a scratch folder of its own and the machine it runs on (described once, written with its results)."""

    duration_s: float
    repo: Path
    out_dir: Path
    work_dir: Path  # scratch: wrk scripts, server logs
    machine: dict[str, Any]
    device: Device = "auto"  # the serving suite's device (``--device``); the other suites ignore it


class SuiteError(Exception):
    """A suite could not measure (a server would not start, wrk failed): reported, exit status 2."""


class SuiteSkipped(Exception):
    """A suite that does not apply on this machine (CUDA asked for, not offered): said plainly, nothing written,
    exit status 0."""


def display(arg: str) -> str:
    """A command-line argument as a reader would type it: paths inside the project made relative."""
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def reproduce(suite: str, ctx: SuiteContext) -> str:
    command = f"bluegreen bench {suite} --duration {ctx.duration_s:g}"
    if ctx.device != "auto":
        command += f" --device {ctx.device}"
    if ctx.repo.resolve() != Path(DEFAULT_REPOSITORY).resolve():
        command += f" --repo {display(str(ctx.repo))}"
    return command


def check_loopback(url: str) -> None:
    if not url.startswith(f"http://{LOOPBACK}:"):
        raise ValueError(f"benchmarks target {LOOPBACK} only, not {url}")


@dataclass(frozen=True)
class Ratio:
    """A figure and its verdict: met when ``value >= target`` (``value <= target`` when ``at_most``); a figure
    without a target is reported only (``met`` None). ``unit`` follows the figures (``""`` for a share)."""

    name: str
    value: float
    target: float | None
    stretch: float | None = None
    at_most: bool = False
    unit: str = "x"

    def _meets(self, bound: float | None) -> bool | None:
        return None if bound is None else (self.value <= bound if self.at_most else self.value >= bound)

    @property
    def met(self) -> bool | None:
        return self._meets(self.target)

    @property
    def stretch_met(self) -> bool | None:
        return None if self.target is None else self._meets(self.stretch)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "target": self.target, "stretch": self.stretch,
                "at_most": self.at_most, "unit": self.unit, "met": self.met, "stretch_met": self.stretch_met}


@dataclass
class SuiteResult:
    """What a suite measured: the common head of its report and its own sections (``sections``, JSON-ready:
    runs, rounds, settings...), written as ``bench-<suite>.json`` by :func:`as_json`."""

    suite: str
    title: str
    command: str
    settings: dict[str, Any]
    ratios: list[Ratio]
    ok: bool
    notes: list[str]
    sections: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "title": self.title, "command": self.command, "settings": self.settings,
                **self.sections, "ratios": [r.as_json() for r in self.ratios], "ok": self.ok, "notes": self.notes}


@dataclass(frozen=True)
class Suite:
    """A suite as ``bluegreen bench`` knows it: its name, what measures it and what renders its section of
    benchmarks.md from its JSON document (read back from disk, so an older run still renders)."""

    name: str
    run: Callable[[SuiteContext], SuiteResult]
    render: Callable[[dict[str, Any]], list[str]]
    by_default: bool = True  # run by ``bluegreen bench`` with no suite named
    needs_wrk: bool = True


def ensure_models(repo: Path, models: Sequence[str]) -> None:
    """Build the bundled models among ``models`` (``name:version``) that are missing from ``repo``.

    Through ``bluegreen build-models``, as a child like every server the suites start: the load tests drive the
    product through its command line and import nothing from ``models`` or ``gateway`` (tests/test_layers.py)."""
    missing = sorted(m for m in models if not (repo / m.split(":")[0] / m.split(":")[1] / "model.onnx").exists())
    if not missing:
        return
    print(f"  {', '.join(missing)} missing from {repo}; building", flush=True)
    only = [arg for m in missing for arg in ("--only", m)]
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "build-models", "--repo", str(repo), *only],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=1800)
    for line in done.stdout.splitlines():
        print(f"  {line}", flush=True)
    if done.returncode != 0:
        raise SuiteError(f"bluegreen build-models exited with {done.returncode}: {done.stderr.strip()[-2000:]}")


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def fmt_int(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ms2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt_cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} cores"


def ratio_target(r: Mapping[str, Any]) -> str:
    unit = r.get("unit", "x")
    if r.get("target") is None:
        return "reported, no target"
    target = f"{'≤' if r.get('at_most') else '≥'} {r['target']:g}{unit}"
    if r.get("stretch") is not None:
        target += f" (stretch {r['stretch']:g}{unit})"
    return target


def ratio_verdict(r: Mapping[str, Any]) -> str:
    if r.get("met") is None:
        return "-"
    if not r["met"]:
        return "**above target**" if r.get("at_most") else "**below target**"
    return "met, stretch met" if r.get("stretch_met") else "met"


def ratio_row(r: Mapping[str, Any]) -> str:
    return f"| {r['name']} | {r['value']:.2f}{r.get('unit', 'x')} | {ratio_target(r)} | {ratio_verdict(r)} |"


def fmt_added(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"

FLAGGED = ("a run answered non-2xx, lost requests or did not take the path it is named after (⚠ above); its "
           "figures are not comparable.")


def closing_lines(doc: Mapping[str, Any], flagged: str = FLAGGED) -> list[str]:
    """The end of a suite's section: what a flagged run means (``flagged``), then the suite's notes."""
    lines = [""]
    if not doc.get("ok", True):
        lines += [f"**This run was flagged**: {flagged}", ""]
    if doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    return lines

