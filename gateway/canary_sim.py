"""Seeded Monte Carlo rollouts of the pure canary machine, fed the way the controller feeds it.

One simulation serves the tests (``tests/gateway/test_canary_sim.py``) and the power table in
docs/architecture.md (``python -m gateway.canary_sim``, which prints it), so the documented figures are the
tested behaviour. Each interval the candidate serves ~Poisson(rps · interval · weight / 100) requests and the
stable color the rest; errors are binomial at the scenario's rate, latency is lognormal (its p95 given, ``sigma``
its shape) so each request is slower than the policy's ``max_p95_ms`` with the lognormal's tail probability, and
a share of requests gets a label (correct with the color's accuracy) after ``label_delay_s``. ``step`` sees, like
the controller builds them: counts since the stage started, the stable color's counts over the recent window
(``window_s``), the interval's new candidate requests and the labels that have arrived; with a ``conversion``
rate every request also reports a 0/1 business outcome. Every rate may depend on
the time and the candidate's weight (shared trouble, a fault only at 100%).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from gateway.canary import ACTIVE, ColorSample, Decision, Phase, Policy, SetWeight, Snapshot, Stage, Status, operator
from gateway.canary import start as start_rollout
from gateway.canary import step as step_rollout

__all__ = ["CONVERSIONS", "DEFAULT_20RPS", "DOCS_EXAMPLE", "PLAN_36X", "SHORT", "Outcome", "Scenario", "Traffic",
           "constant", "outcome_rows", "outcome_table", "run", "simulate", "slow_share", "table"]

Rate = Callable[[float, int], float]
"""A rate as a function of (time, candidate weight)."""


def constant(value: float) -> Rate:
    return lambda _t, _w: value


def slow_share(p95_ms: float, threshold_ms: float, sigma: float = 0.5) -> float:
    """The share of a lognormal latency (p95 ``p95_ms``, log-sd ``sigma``) above ``threshold_ms``."""
    return float(1.0 - ndtr(1.6448536269514722 + math.log(threshold_ms / p95_ms) / sigma))


@dataclass(frozen=True)
class Scenario:
    """What the two colors do. Rates are per request; ``p95`` in ms (lognormal with ``sigma``)."""

    errors: Rate | float = 0.0005
    stable_errors: Rate | float = 0.0005
    p95: Rate | float = 80.0
    stable_p95: Rate | float = 80.0
    sigma: float = 0.5
    accuracy: float | None = None
    """None: no labels at all."""
    stable_accuracy: float = 0.90
    stable_labels: int = 5000
    """Labels the stable color's version already had before the rollout (it has been serving for a while)."""
    labelled: float = 0.0
    label_delay_s: float = 0.0
    p95_known: bool = True
    """False: the latency reading is missing (no timed requests; p95 NaN)."""
    candidate_traffic_until: float = math.inf
    conversion: float | None = None
    """The candidate's conversion rate: every answered request reports a 0/1 outcome at once. None: no outcomes."""
    stable_conversion: float = 0.10
    stable_outcomes: int = 100_000
    """Outcomes the stable color's version already had before the rollout."""


@dataclass(frozen=True)
class Traffic:
    policy: Policy
    rps: float
    window_s: float = 60.0
    approve_at_once: bool = False
    """An operator resumes (approves) a stage the moment it waits for approval."""
    fixed_candidate_requests: int | None = None
    """Candidate requests per interval, whatever the weight (a trickle)."""
    max_time_s: float = math.inf


@dataclass
class Outcome:
    phase: Phase
    candidate_requests: int
    time: float
    decisions: list[Decision] = field(default_factory=list)
    weights: list[tuple[float, int]] = field(default_factory=list)
    """With ``keep``: every decision and every (time, weight) set, the start included."""
    status: Status = field(default_factory=Status)

    @property
    def rolled_back(self) -> bool:
        return self.phase == Phase.ROLLED_BACK

    @property
    def promoted(self) -> bool:
        return self.phase == Phase.PROMOTED


def simulate(rng: np.random.Generator, traffic: Traffic, scenario: Scenario, *, keep: bool = False,
             candidate: str = "green") -> Outcome:
    """One rollout until it is promoted, rolled back, paused for an operator, or ``max_time_s`` passes."""
    policy = traffic.policy
    interval = policy.interval_s
    errors_c, errors_s, p95_c, p95_s = (_rate(r) for r in (scenario.errors, scenario.stable_errors, scenario.p95,
                                                           scenario.stable_p95))
    threshold = policy.max_p95_ms
    status, actions = start_rollout(policy, "green" if candidate == "green" else "blue", 0.0)
    weight = policy.stages[0].weight
    out = Outcome(status.phase, 0, 0.0)
    if keep:
        out.weights.append((0.0, weight))
    per_interval = traffic.rps * interval
    stage_key = status.stage_started
    c = [0, 0, 0, 0]  # requests, errors, timed, slow since the stage started
    s = [0, 0, 0, 0]
    recent: deque[tuple[int, int, int, int]] = deque(maxlen=max(1, round(traffic.window_s / interval)))
    rsum = [0, 0, 0, 0]
    labels: deque[tuple[float, int, int, int, int]] = deque()  # (arrival, cand n, cand correct, stab n, stab ok)
    fb = [0, 0, 0, 0]
    if scenario.accuracy is not None:
        fb[2] = scenario.stable_labels
        fb[3] = _binomial(rng, scenario.stable_labels, scenario.stable_accuracy)
    out_c, out_s = [0, 0], [0, 0]  # (outcomes, conversions) of each color's version
    if scenario.conversion is not None:
        out_s = [scenario.stable_outcomes, _binomial(rng, scenario.stable_outcomes, scenario.stable_conversion)]
    horizon = traffic.max_time_s if math.isfinite(traffic.max_time_s) else 400 * _rollout_s(policy) + 3600
    t, k = 0.0, 0
    while status.phase in ACTIVE and t < horizon:
        k += 1
        t = k * interval
        if traffic.fixed_candidate_requests is not None:
            new_c = traffic.fixed_candidate_requests if weight else 0
            new_s = int(rng.poisson(per_interval))
        else:
            new_c = int(rng.poisson(per_interval * weight / 100)) if weight else 0
            new_s = int(rng.poisson(per_interval * (100 - weight) / 100)) if weight < 100 else 0
        if t > scenario.candidate_traffic_until:
            new_c = 0
        ce = _binomial(rng, new_c, errors_c(t, weight))
        se = _binomial(rng, new_s, errors_s(t, weight))
        cslow = _binomial(rng, new_c, slow_share(p95_c(t, weight), threshold, scenario.sigma))
        sslow = _binomial(rng, new_s, slow_share(p95_s(t, weight), threshold, scenario.sigma))
        timed_c = new_c if scenario.p95_known else 0
        c[0] += new_c
        c[1] += ce
        c[2] += timed_c
        c[3] += cslow if scenario.p95_known else 0
        s[0] += new_s
        s[1] += se
        s[2] += new_s
        s[3] += sslow
        if len(recent) == recent.maxlen:
            gone = recent[0]
            for i in range(4):
                rsum[i] -= gone[i]
        recent.append((new_s, se, new_s, sslow))
        rsum[0] += new_s
        rsum[1] += se
        rsum[2] += new_s
        rsum[3] += sslow
        if scenario.accuracy is not None and scenario.labelled > 0:
            ln_c, ln_s = _binomial(rng, new_c, scenario.labelled), _binomial(rng, new_s, scenario.labelled)
            labels.append((t + scenario.label_delay_s, ln_c, _binomial(rng, ln_c, scenario.accuracy), ln_s,
                           _binomial(rng, ln_s, scenario.stable_accuracy)))
        if scenario.conversion is not None:
            out_c[0] += new_c
            out_c[1] += _binomial(rng, new_c, scenario.conversion)
            out_s[0] += new_s
            out_s[1] += _binomial(rng, new_s, scenario.stable_conversion)
        while labels and labels[0][0] <= t:
            _, a, b, d, e = labels.popleft()
            fb[0] += a
            fb[1] += b
            fb[2] += d
            fb[3] += e
        out.candidate_requests += new_c
        window = rsum[0]
        snap = Snapshot(
            ColorSample(c[0], c[1], new_c, p95_c(t, weight) if scenario.p95_known and new_c else None,
                        False, fb[0], fb[1], c[2], c[3], outcomes=out_c[0], outcome_sum=float(out_c[1]),
                        outcome_sq=float(out_c[1])),
            ColorSample(s[0], s[1], window, p95_s(t, weight) if new_s else None, False, fb[2], fb[3],
                        s[2], s[3], outcomes=out_s[0], outcome_sum=float(out_s[1]), outcome_sq=float(out_s[1])),
            new_c, None, 0,
            ColorSample(window, rsum[1], 0, None, False, 0, 0, rsum[2], rsum[3]))
        status, actions = step_rollout(policy, status, snap, t)
        if traffic.approve_at_once and status.phase == Phase.PAUSED and status.paused_by == "approval":
            status, more = operator("resume", status, t, "operator")
            actions = [*actions, *more]
        if keep and status.last_decision is not None:
            out.decisions.append(status.last_decision)
        for action in actions:
            if isinstance(action, SetWeight):
                weight = action.weight
                if keep:
                    out.weights.append((t, action.weight))
        if status.stage_started != stage_key:  # a new stage: its sample starts afresh
            stage_key = status.stage_started
            c = [0, 0, 0, 0]
            s = [0, 0, 0, 0]
        if status.phase == Phase.PAUSED and status.paused_by == "inconclusive":
            break  # waiting for an operator: the simulated one does nothing
    out.phase, out.time = status.phase, t
    out.status = status
    return out


def _rate(r: Rate | float) -> Rate:
    return constant(float(r)) if isinstance(r, int | float) else r


def _binomial(rng: np.random.Generator, n: int, p: float) -> int:
    if n <= 0 or p <= 0:
        return 0
    return int(rng.binomial(n, min(1.0, p)))


def _rollout_s(policy: Policy) -> float:
    return sum(s.hold_s for s in policy.stages) + policy.interval_s


def run(seed: int, traffic: Traffic, scenario: Scenario, rollouts: int) -> list[Outcome]:
    rng = np.random.default_rng(seed)
    return [simulate(rng, traffic, scenario, candidate="green" if i % 2 else "blue") for i in range(rollouts)]


# ----------------------------------------------------------------------------------------------- policies

DEFAULT_20RPS = Traffic(Policy(), 20.0)
"""The release plan (5% 2 h, 25% 6 h, 50% 12 h, analysed every minute) at 20 requests/s."""
PLAN_36X = Traffic(Policy(stages=(Stage(5, 200), Stage(25, 600), Stage(50, 1200)), interval_s=60 / 36), 100.0)
"""The release plan's stages and interval scaled down 36x, at 100 requests/s."""
SHORT = Traffic(Policy(stages=(Stage(50, 3),), interval_s=1, min_requests=20, detect_error_rate=None,
                       detect_slow_share=None), 20.0)
"""The README's short demo policy (20 requests a stage, no power-derived minimum), at 20 requests/s."""
DOCS_EXAMPLE = Traffic(Policy(stages=(Stage(5, 2), Stage(25, 2), Stage(50, 2, approve=True)), interval_s=1,
                              min_requests=200), 200.0, approve_at_once=True)
"""docs/configuration.md's example policy at 200 requests/s, an operator approving at once."""

CONVERSIONS = Traffic(Policy(stages=(Stage(10, 1200), Stage(50, 600)), interval_s=120, min_requests=200,
                             detect_error_rate=None, detect_slow_share=None), 1000.0)
"""The business metric's scenario: 1,000 requests/s, every answered request reporting a 0/1 conversion at once,
the stable color converting 10% (100,000 outcomes before the rollout); stages of 10% for 20 min and 50% for
10 min analysed every 2 min, the release plan's confidence, power and outcome margins (errors and latency are
healthy and their power-derived minimums off, so the business metric alone decides)."""
BASE_CONVERSION = 0.10


def outcome_rows(rollouts: int = 1000, seed: int = 2026) -> list[dict[str, float]]:
    """Per candidate (converting 10%, 5% and 2% worse than stable, or the same): the share of ``rollouts``
    rolled back and promoted, the median candidate requests to a rollback, and the analyses per rollout (the
    looks: at most one false rollback per look with probability 1 - confidence, for a candidate at the margin)."""
    rows = []
    for i, worse in enumerate((0.10, 0.05, 0.02, 0.0)):
        scenario = Scenario(errors=0.0, stable_errors=0.0, p95=40.0, stable_p95=40.0,
                            conversion=BASE_CONVERSION * (1 - worse), stable_conversion=BASE_CONVERSION)
        outcomes = run(seed + 100 + i, CONVERSIONS, scenario, rollouts)
        back = [o.candidate_requests for o in outcomes if o.rolled_back]
        rows.append({"worse": worse, "rollouts": rollouts, "rolled_back": len(back) / rollouts,
                     "promoted": sum(o.promoted for o in outcomes) / rollouts,
                     "median_requests_to_rollback": statistics.median(back) if back else math.nan,
                     "looks": statistics.mean(o.time / CONVERSIONS.policy.interval_s for o in outcomes)})
    return rows


def outcome_table(rollouts: int = 1000, seed: int = 2026) -> str:
    """The business metric's table of docs/architecture.md (see :data:`CONVERSIONS`)."""
    alpha = 1 - CONVERSIONS.policy.confidence
    need = CONVERSIONS.policy.min_outcome_sample(BASE_CONVERSION, BASE_CONVERSION * (1 - BASE_CONVERSION))
    lines = [f"Conversions: stable {BASE_CONVERSION:.0%}, {CONVERSIONS.rps:,.0f} requests/s, margin "
             f"{CONVERSIONS.policy.max_outcome_drop:.0%}, {need:,} candidate outcomes before a stage can pass", "",
             "| candidate | rollouts | rolled back | promoted | median candidate requests to the rollback | "
             "analyses per rollout | 1 - confidence, summed over them |", "|---|---|---|---|---|---|---|"]
    for r in outcome_rows(rollouts, seed):
        median = "–" if math.isnan(r["median_requests_to_rollback"]) else f"{r['median_requests_to_rollback']:,.0f}"
        lines.append(f"| converting {r['worse']:.0%} worse | {r['rollouts']:.0f} | {r['rolled_back']:.1%} | "
                     f"{r['promoted']:.1%} | {median} | {r['looks']:.1f} | {alpha * r['looks']:.2%} |")
    return "\n".join(lines)


def _q(values: Sequence[int]) -> str:
    return f"{statistics.median(values):,.0f}" if values else "–"


def table(rollouts: int = 1000, seed: int = 2026) -> str:
    """The power table of docs/architecture.md: per policy and candidate, the share of rollouts rolled back,
    promoted and paused for an operator (inconclusive past the limit), and the median candidate requests to the
    rollback or promotion. ``rollouts`` per row for the short policy; a fifth of it for the plan scaled 36x and
    a tenth for the release plan (1,200 analyses per rollout)."""
    rows: list[tuple[str, Traffic, int, str, Scenario]] = []
    for name, traffic, n in (("release plan, 20 rps", DEFAULT_20RPS, max(1, rollouts // 10)),
                             ("plan / 36, 100 rps", PLAN_36X, max(1, rollouts // 5)),
                             ("short (README), 20 rps", SHORT, rollouts)):
        for rate in (0.0005, 0.001, 0.002, 0.005, 0.01):
            rows.append((name, traffic, n, f"errors {rate:.2%}", Scenario(errors=rate)))
        for p95 in (100.0, 110.0, 120.0, 130.0, 150.0):
            rows.append((name, traffic, n, f"p95 {p95:.0f} ms (σ 0.5)", Scenario(p95=p95)))
        for gap in (0.0, 0.04, 0.10):
            rows.append((name, traffic, n, f"accuracy {gap * 100:.0f} points under 0.90, 10% labelled",
                         Scenario(accuracy=0.90 - gap, labelled=0.10)))
    lines = ["| policy | candidate | rollouts | rolled back | promoted | paused for an operator | median candidate "
             "requests to the decision |", "|---|---|---|---|---|---|---|"]
    for i, (name, traffic, n, label, scenario) in enumerate(rows):
        outcomes = run(seed + i, traffic, scenario, n)
        back = sum(o.rolled_back for o in outcomes)
        done = [o.candidate_requests for o in outcomes if o.rolled_back or o.promoted]
        promoted = sum(o.promoted for o in outcomes)
        paused = sum(o.status.paused_by == "inconclusive" for o in outcomes)
        lines.append(f"| {name} | {label} | {n} | {back / n:.1%} | {promoted / n:.1%} | {paused / n:.1%} | "
                     f"{_q(done)} |")
    return "\n".join(lines)


def complaint_table(rollouts: int = 400, seed: int = 1, base: float = 0.001) -> str:
    """The complaint trigger's table of docs/architecture.md: the candidate at 10% of the traffic, the stable
    color at ``base`` complaints per request, the candidate at a multiple of it; the trigger judged every 100
    candidate requests (and 900 stable ones) up to 20,000 candidate requests, at the release plan's policy."""
    from gateway.complaints import ComplaintSample, complaint_trigger

    policy, rng = Policy(), np.random.default_rng(seed)
    lines = [f"Complaints: stable {base * 1000:g} per 1,000 requests, the candidate at 10% of the traffic, a look "
             "every 100 candidate requests", "", "| candidate's rate | rollouts | rolled back within 20,000 "
             "candidate requests | median candidate requests to the rollback |", "|---|---|---|---|"]
    for mult in (1, 2, 3, 5, 10):
        needed = []
        for _ in range(rollouts):
            c = s = 0
            for look in range(1, 201):
                c += int(rng.binomial(100, base * mult))
                s += int(rng.binomial(900, base))
                if complaint_trigger(policy, ComplaintSample(c, s, 100 * look, 900 * look)).verdict == "rollback":
                    needed.append(100 * look)
                    break
        median = f"{int(np.median(needed)):,}" if needed else "–"
        lines.append(f"| {mult}x stable's | {rollouts} | {len(needed) / rollouts:.1%} | {median} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the canary power tables of docs/architecture.md.")
    parser.add_argument("--rollouts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    print(table(args.rollouts, args.seed))
    print()
    print(outcome_table(args.rollouts, args.seed))
    print()
    print(complaint_table())


if __name__ == "__main__":
    main()

