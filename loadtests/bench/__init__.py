"""The benchmark runner behind ``bluegreen bench [serving|gateway|cache|telemetry|shadow|locust]`` (none named:
every suite but ``locust``, a scenario run of minutes that runs only when named).

How we measure performance: the machines are 2-core and shared, so what counts is **ratios
measured in one run** (absolute times only on a GPU). Every suite therefore starts its own servers on free
loopback ports, drives them with ``wrk`` one at a time (so they never compete for the cores), records the load
generator's CPU beside the throughput, and compares runs made minutes apart on the same machine. Latency at a
given load (rather than at saturation) comes from :mod:`loadtests.fixed_rate`, an open-loop generator.

The package, by what varies:

* :mod:`~loadtests.bench.wrk`     the wrk driver (Lua scripts, the run, its parsed result);
* :mod:`~loadtests.bench.servers` the servers a suite starts and what it reads from them;
* :mod:`~loadtests.bench.steps`   the measuring steps the gateway-family suites share;
* :mod:`~loadtests.bench.suites`  one module per suite: its constants, its run, its section of the report;
* :mod:`~loadtests.bench.report`  ``<out>/bench-<suite>.json`` and ``<out>/benchmarks.md`` (a summary table of
  every ratio with its target, date, machine and command, the plot ``benchmarks.png``, then one section per
  suite) regenerated from every ``bench-*.json`` in the folder, so rerunning one suite replaces only its own;
* :mod:`~loadtests.bench.runner`  :func:`main`, the entry point (its exit status is documented there).
"""

from loadtests.bench.runner import main

__all__ = ["main"]
