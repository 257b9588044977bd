"""The suites of ``bluegreen bench``, one module each (its constants, its run, its section of the report)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loadtests.bench.base import Suite
from loadtests.bench.suites import cache, gateway, locust, serving, shadow, telemetry

#: Every suite, by the name ``bluegreen bench`` takes.
SUITES: dict[str, Suite] = {s.name: s for s in (serving.SUITE, gateway.SUITE, cache.SUITE, telemetry.SUITE,
                                                shadow.SUITE, locust.SUITE)}

#: The suites ``bluegreen bench`` runs when none is named, in this order (the report's sections too, then the
#: others': locust, which measures a scenario rather than a ratio and takes minutes, runs only when named).
SUITE_ORDER = tuple(name for name, s in SUITES.items() if s.by_default)

#: Suite name (as its JSON document names it) -> the function that renders its section of benchmarks.md.
SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    **{name: s.render for name, s in SUITES.items()}, "serving-cuda": serving.render}
