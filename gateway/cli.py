"""The ``bluegreen`` command: one console script, one sub-command per verb (README.md, "Commands").

The parser's texts are what ``bluegreen --help`` prints, so they are plain text: the module docstring is not
reused as the description (its reStructuredText markup would show), and each sub-command's one-line ``help``
is also its ``--help`` description (:func:`_add`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from serving.repository import DEFAULT_REPOSITORY


def _cmd_build_models(args: argparse.Namespace) -> int:
    from models.build import build_all

    for line in build_all(args.repo, only=set(args.only) or None, force=args.force):
        print(line)
    return 0


def _cmd_serve_model(args: argparse.Namespace) -> int:
    from serving.app import serve
    from serving.settings import ServingSettings

    overrides = {k: v for k, v in {
        "repo": args.repo, "models": args.model, "host": args.host, "port": args.port, "device": args.device,
        "threads": args.threads, "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
        "max_queue_size": args.max_queue_size, "fault_latency_ms": args.fault_latency_ms,
        "fault_error_rate": args.fault_error_rate, "allow_non_finite": args.allow_non_finite,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key,
    }.items() if v is not None}
    try:
        settings = ServingSettings(**overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gateway.app import run
    from gateway.notify import sink_secrets
    from gateway.policy import describe
    from gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings(**({"config": args.config} if args.config else {}))
    except ValidationError as exc:
        print(f"error: settings (BLUEGREEN_* variables): {describe(exc)}", file=sys.stderr)
        return 2
    try:
        routing = settings.routing()  # fail fast, before binding anything
        settings.tokens()
        sink_secrets(routing.notifications, os.environ)
    except ValidationError as exc:  # one line per field, never the input (a routing file may hold secrets)
        print(f"error: routing file {settings.config}: {describe(exc)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(settings)


def _cmd_up(args: argparse.Namespace) -> int:
    from gateway.stack import Stack, StackOptions

    opts = StackOptions(blue=args.blue, green=args.green, repo=args.repo, blue_port=args.blue_port,
                        green_port=args.green_port, port=args.port, admin_port=args.admin_port,
                        state_dir=args.state_dir, device=args.device)
    try:
        return Stack(opts).run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cmd_bench(args: argparse.Namespace) -> int:
    from loadtests.bench import main as bench_main

    code: int = bench_main(args.suites, duration_s=args.duration, out_dir=args.out, repo=args.repo,  # none: all
                           device=args.device)
    return code


def _cmd_validate(args: argparse.Namespace) -> int:
    from models.validation import Options, command_line
    from models.validation import main as validate_main

    opts = Options(model=args.model, baseline=args.baseline, url=args.url, repo=args.repo,
                   concurrency=args.concurrency, duration_s=args.duration, device=args.device,
                   command=command_line(sys.argv[1:]), require_bias=args.require_bias)
    return validate_main(opts)


def _admin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-url", help="the gateway's admin listener (default: $BLUEGREEN_ADMIN_URL, else "
                   "http://127.0.0.1:8081)")
    p.add_argument("--token-file", type=Path,
                   help="read the admin token from FILE (default: the token in $BLUEGREEN_ADMIN_TOKEN)")


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator

    if args.watch:
        return operator.run(args.admin_url, args.token_file,
                            lambda c: operator.watch(c, args.interval, as_json=args.json))
    return operator.run(args.admin_url, args.token_file, lambda c: operator.status(c, as_json=args.json))


def _cmd_weights(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator

    return operator.run(args.admin_url, args.token_file,
                        lambda c: operator.set_weights(c, args.model, args.weights, args.reason))


def _cmd_shadow(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator

    return operator.run(args.admin_url, args.token_file,
                        lambda c: operator.shadow(c, args.model, args.percent, args.reason))


def _cmd_canary(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator

    return operator.run(args.admin_url, args.token_file, lambda c: operator.canary(
        c, args.model, args.action, force=args.force, candidate=args.candidate, policy=args.policy,
        reason=args.reason, gate=args.gate, as_json=args.json))


def _cmd_audit(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator

    return operator.run(args.admin_url, args.token_file,
                        lambda c: operator.audit(c, args.limit, args.model, as_json=args.json))


def _cmd_signal(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator
    from gateway import signals_client

    return operator.run(args.admin_url, args.token_file, lambda c: signals_client.signal(
        c, args.model, args.kind, color=args.color, count=args.count, reason=args.reason, as_json=args.json))


def _cmd_freeze(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator
    from gateway import signals_client

    return operator.run(args.admin_url, args.token_file,
                        lambda c: signals_client.freeze(c, args.action, reason=args.reason, as_json=args.json))


def _cmd_notifications(args: argparse.Namespace) -> int:
    from gateway import admin_client as operator
    from gateway import signals_client

    return operator.run(args.admin_url, args.token_file,
                        lambda c: signals_client.notifications(c, args.limit, as_json=args.json))


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from gateway.keys import new_key

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        key, entry = new_key(args.name, models, args.rate, args.burst)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"key (shown once; the gateway keeps only its hash): {key}")
    print("entry for the file named by BLUEGREEN_CLIENT_KEYS_FILE (in force within a second of saving):")
    print(entry, end="")
    return 0


DESCRIPTION = ("bluegreen: an inference gateway that splits predictions between a blue and a green model "
               "server, and the tools around it. One sub-command per verb; 'bluegreen COMMAND --help' for its "
               "options. The operator verbs (status, weights, shadow, canary, audit, signal, freeze) call the admin "
               "API at $BLUEGREEN_ADMIN_URL with the token in $BLUEGREEN_ADMIN_TOKEN; 'bluegreen up' prints both.")


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str) -> argparse.ArgumentParser:
    """A sub-command whose one-line summary (in ``bluegreen --help``) is also the description of its own help."""
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bluegreen", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "build-models", "build every bundled model (skips what is current)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--only", action="append", default=[], metavar="NAME[:VERSION]")
    p.add_argument("--force", action="store_true", help="rebuild even what is current")
    p.set_defaults(func=_cmd_build_models)

    p = _add(sub, "serve-model", "run one V2 model server")
    p.add_argument("--repo", type=Path)
    p.add_argument("--model", action="append", metavar="NAME[:VERSION]", help="repeat to serve several")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: usable cores)")
    p.add_argument("--max-batch-size", type=int, help="rows per batched run; 1 turns batching off (default 64)")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest wait for a batch to fill (default 2)")
    p.add_argument("--max-queue-size", type=int, help="queued requests beyond which 503 (default 1024)")
    p.add_argument("--allow-non-finite", action="store_true", default=None,
                   help="accept NaN/Inf in floating-point inputs (default: refused with 400)")
    p.add_argument("--fault-latency-ms", type=float, help="drills: latency added to every inference")
    p.add_argument("--fault-error-rate", type=float, help="drills: fraction of inferences answered 500")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    p.set_defaults(func=_cmd_serve_model)

    p = _add(sub, "gateway", "run the gateway (data and admin listeners)")
    p.add_argument("--config", type=Path, help="the YAML routing file (default: $BLUEGREEN_CONFIG)")
    p.set_defaults(func=_cmd_gateway)

    p = _add(sub, "up", "run the whole local stack: blue, green and the gateway")
    p.add_argument("--blue", default="digits:1", metavar="NAME:VERSION")
    p.add_argument("--green", default="digits:2", metavar="NAME:VERSION")
    p.add_argument("--repo", type=Path, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--port", type=int, default=8080, help="gateway data port")
    p.add_argument("--admin-port", type=int, default=8081)
    p.add_argument("--blue-port", type=int, default=8001)
    p.add_argument("--green-port", type=int, default=8002)
    p.add_argument("--state-dir", type=Path, default=Path(".bluegreen"), help="routing file, state, logs")
    p.set_defaults(func=_cmd_up)

    p = _add(sub, "bench", "run benchmarks and write docs/benchmarks.md")
    # No argparse choices: Python 3.11 checks an empty nargs="*" list against them and refuses it; the runner
    # refuses unknown names itself.
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help="serving, gateway, cache, telemetry, shadow or locust (default: the first five, in this "
                   "order; locust, a scenario of minutes, only when named)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run")
    p.add_argument("--out", type=Path, default=None, help="where to write JSON + markdown (default docs/)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="the serving suite's device (cuda: its own report section); other suites ignore it")
    p.set_defaults(func=_cmd_bench)
    p = _add(sub, "validate", "the release plan's validation gate for one model version")
    p.add_argument("--model", required=True, metavar="NAME:VERSION")
    p.add_argument("--baseline", metavar="NAME:VERSION", help="also measure this version and show the differences")
    p.add_argument("--url", help="a running V2 server to validate (default: start one on a free loopback port)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--concurrency", type=int, default=32, help="concurrent single-row requests in the load check")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of measured load (after a 1 s warm-up)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for the server started here")
    p.add_argument("--require-bias", action="store_true",
                   help="fail the bias check when the evaluation set has no 'group' array (default: N/A)")
    p.set_defaults(func=_cmd_validate)

    p = _add(sub, "status", "weights, canary, latency, errors and breakers of every model")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between redraws (default 2)")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead of the table")
    _admin_options(p)
    p.set_defaults(func=_cmd_status)

    p = _add(sub, "weights", "show a model's split, or set it: MODEL green=N (or blue=N, or both summing to 100)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("weights", nargs="*", metavar="COLOR=N", help="the new weights; omit to show the current split")
    p.add_argument("--reason", help="recorded in the audit log")
    _admin_options(p)
    p.set_defaults(func=_cmd_weights)

    p = _add(sub, "shadow", "show or set the share of requests copied to the other color")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("percent", nargs="?", type=int, metavar="PERCENT", help="0-100; omit to show the current share")
    p.add_argument("--reason", help="recorded in the audit log")
    _admin_options(p)
    p.set_defaults(func=_cmd_shadow)

    p = _add(sub, "canary", "show a model's canary rollout, or start, pause, resume, promote, abort or approve it")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("action", nargs="?", choices=["start", "pause", "resume", "promote", "abort", "approve"],
                   help="omit to show the rollout: phase, stage, weights, the last decision")
    p.add_argument("--force", action="store_true", help="start: without a passing validation report; promote: "
                   "without the 100%% stage's evidence minimum (both audited as forced)")
    p.add_argument("--candidate", choices=["blue", "green"], help="start: the color released (default: the one at 0%%)")
    p.add_argument("--policy", metavar="JSON|@FILE", help="start: policy overrides, inline or from a file")
    p.add_argument("--gate", metavar="NAME", help="approve: the named gate of the current stage this token approves")
    p.add_argument("--reason", help="recorded in the audit log")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead")
    _admin_options(p)
    p.set_defaults(func=_cmd_canary)

    p = _add(sub, "keys", "client keys for the prediction API: 'keys new NAME' prints a fresh key and its entry")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = _add(keys, "new", "print a fresh client key (shown once) and the keys-file entry holding its hash")
    k.add_argument("name", metavar="NAME", help="the client app's name (what metrics and logs show)")
    k.add_argument("--models", required=True, metavar="M[,M...]", help="models it may call, or '*' for all")
    k.add_argument("--rate", type=float, metavar="PER_S", help="sustained requests a second (default: no limit)")
    k.add_argument("--burst", type=int, metavar="N", help="requests at once beyond the rate (default: a second's)")
    k.set_defaults(func=_cmd_keys_new)

    p = _add(sub, "audit", "the audit log, newest first")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="entries to show (default 20)")
    p.add_argument("--model", metavar="M", help="only this model's entries")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead")
    _admin_options(p)
    p.set_defaults(func=_cmd_audit)

    p = _add(sub, "signal", "send an outside signal: complaints about a model's rollout, or an incident (rolls "
             "back every rollout and freezes releases)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("kind", choices=["complaint", "incident"])
    p.add_argument("--color", choices=["blue", "green"], help="complaint: the color complained about (default: "
                   "unattributed, shown but not judged)")
    p.add_argument("--count", type=int, metavar="N", help="complaint: how many (1-100000)")
    p.add_argument("--reason", help="incident: what happened (required; shown with the freeze)")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead")
    _admin_options(p)
    p.set_defaults(func=_cmd_signal)

    p = _add(sub, "freeze", "show the release freeze an incident set, or lift it on every model (admin)")
    p.add_argument("action", nargs="?", choices=["lift"], help="omit to show the freeze per model")
    p.add_argument("--reason", help="lift: recorded in the audit log")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead")
    _admin_options(p)
    p.set_defaults(func=_cmd_freeze)

    p = _add(sub, "notifications", "the webhook sinks and their latest deliveries, newest first")
    p.add_argument("--limit", type=int, default=20, help="deliveries to show (1-500, default 20)")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON instead")
    _admin_options(p)
    p.set_defaults(func=_cmd_notifications)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
