"""``bluegreen validate``: the release plan's gate, its report, and the gateway refusing a version that failed it.

The command runs as users run it (a child process writing into a copy of the repository); the pieces that
need no server (percentiles, the bias and load verdicts) are tested in-process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.release import validation_report
from loadtests.fixed_rate import percentile
from models.build import DEFAULT_REPOSITORY
from models.validation import (
    MAX_BIAS_GAP,
    Check,
    EvalSet,
    LoadResult,
    Signature,
    accuracy_check,
    bias_check,
    load_checks,
    macro_scores,
    predicted_classes,
    report_lines,
)
from tests.procs import BLUEGREEN, ROOT, admin_headers, routing, start_gateway, start_model_server

VALIDATE_TIMEOUT_S = 120


def run_validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BLUEGREEN, "validate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=VALIDATE_TIMEOUT_S, check=False)


def lines_by_check(stdout: str) -> dict[str, str]:
    """check name -> its printed line (``PASS|FAIL|N/A <check>: <figure>``)."""
    found = {}
    for line in stdout.splitlines():
        result, _, rest = line.partition(" ")
        if result in ("PASS", "FAIL", "N/A") and ":" in rest:
            found[rest.split(":", 1)[0]] = line
    return found


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Path:
    """The bundled digits versions in a private repository: reports are written there, never into the tree."""
    root = tmp_path_factory.mktemp("repo")
    for version in ("1", "2", "3"):
        shutil.copytree(Path(model_repo) / "digits" / version, root / "digits" / version,
                        ignore=shutil.ignore_patterns("validation.*"))
    return root


@pytest.fixture(scope="module")
def validated(repo_copy: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """digits:2 against the digits:1 baseline, and digits:3 alone, each run once for the module. Their load
    phases last 2 s rather than the default 5 s (three of them: the baseline's is the third): no assertion
    depends on the length, and 2 s of closed-loop load at concurrency 32 are thousands of requests on a digits
    server, plenty for a p95 and a throughput figure."""
    short = ("--duration", "2")
    return {"2": run_validate("--model", "digits:2", "--baseline", "digits:1", "--repo", str(repo_copy), *short),
            "3": run_validate("--model", "digits:3", "--repo", str(repo_copy), *short)}


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.exclusive
def test_digits_2_passes_with_the_baseline_beside_it(validated: dict[str, subprocess.CompletedProcess[str]],
                                                     repo_copy: Path) -> None:
    run = validated["2"]
    assert run.returncode == 0, run.stdout + run.stderr
    lines = lines_by_check(run.stdout)
    assert set(lines) == {"accuracy", "latency_p95", "throughput", "peak_memory", "bias", "security"}
    for check in ("accuracy", "latency_p95", "throughput", "peak_memory", "security"):
        assert lines[check].startswith(f"PASS {check}: "), lines[check]
    assert lines["accuracy"].startswith("PASS accuracy: 0.9711")
    assert "at concurrency 32" in lines["throughput"] and "requests/s" in lines["throughput"]
    # The bundled holdout's ink groups (models/build.py) make the bias check measurable: a small gap passes.
    assert lines["bias"].startswith("PASS bias: gap 0.0"), lines["bias"]
    assert "over 3 groups" in lines["bias"] and "'heavy'" in lines["bias"]
    assert "macro precision 0.97" in lines["accuracy"] and "F1 0.97" in lines["accuracy"]
    assert "baseline digits:1: PASS 0.9444, difference +0.0267" in lines["accuracy"]

    doc = json.loads((repo_copy / "digits" / "2" / "validation.json").read_text())
    assert doc["passed"] is True and doc["model"] == "digits" and doc["version"] == "2"
    assert [c["check"] for c in doc["checks"]] == ["accuracy", "latency_p95", "throughput", "peak_memory", "bias",
                                                   "security"]
    assert doc["machine"]["cpu_count"] and doc["date"] and doc["command"].startswith("bluegreen validate --model")
    assert doc["target"]["concurrency"] == 32 and doc["target"]["pid"]
    accuracy = doc["checks"][0]
    assert accuracy["baseline"]["model"] == "digits:1"
    assert accuracy["baseline"]["difference"] == pytest.approx(accuracy["value"] - accuracy["baseline"]["value"])
    security = next(c for c in doc["checks"] if c["check"] == "security")["details"]
    cases = {c["case"]: c["status"] for c in security["cases"]}
    assert cases["unknown model"] == 404 and cases["oversized body (32 MiB)"] == 413
    assert all(400 <= s < 500 for s in cases.values()), cases
    assert security["health_after"] == {"ready": 200, "good_inference": 200, "process_alive": True}
    memory = next(c for c in doc["checks"] if c["check"] == "peak_memory")
    assert 10 * 2**20 < memory["value"] < 2 * 2**30  # a digits server: tens of MiB

    md = (repo_copy / "digits" / "2" / "validation.md").read_text()
    assert "PASSED" in md and "| accuracy | **PASS** |" in md and "Baseline: digits:1" in md
    assert "AMD" in md or doc["machine"]["cpu_model"] in md
    assert validation_report(repo_copy, "digits", "2") is True


@pytest.mark.exclusive
def test_digits_3_fails_naming_the_accuracy_check(validated: dict[str, subprocess.CompletedProcess[str]],
                                                  repo_copy: Path) -> None:
    run = validated["3"]
    assert run.returncode == 1, run.stdout + run.stderr
    lines = lines_by_check(run.stdout)
    assert lines["accuracy"].startswith("FAIL accuracy: 0.1733")
    doc = json.loads((repo_copy / "digits" / "3" / "validation.json").read_text())
    assert doc["passed"] is False
    assert [c["check"] for c in doc["checks"] if c["result"] == "FAIL"] == ["accuracy"]
    assert "| accuracy | **FAIL** |" in (repo_copy / "digits" / "3" / "validation.md").read_text()
    verdict = validation_report(repo_copy, "digits", "3")
    assert isinstance(verdict, str) and "failed: accuracy" in verdict


@pytest.mark.exclusive
def test_canary_start_refuses_digits_3_and_accepts_digits_2(
        validated: dict[str, subprocess.CompletedProcess[str]], repo_copy: Path, tmp_path: Path) -> None:
    server, url = start_model_server(tmp_path, ["digits:1", "digits:2", "digits:3"])
    gateway = None
    try:
        gateway, _, admin = start_gateway(tmp_path, routing([url], [url], versions=("1", "3")),
                                          {"BLUEGREEN_VALIDATION_REPO": str(repo_copy)})
        start = f"{admin}/admin/v1/models/digits/canary/start"
        writes = {**admin_headers(), "If-Match": "*"}  # unconditional writes: this test races no one
        r = httpx.post(start, headers=writes)
        assert r.status_code == 409, r.text
        assert "digits:3" in r.json()["error"] and "failed: accuracy" in r.json()["error"]

        r = httpx.put(f"{admin}/admin/v1/models/digits/colors/green", json={"version": "2", "backends": [url]},
                      headers=writes)
        assert r.status_code == 200, r.text
        r = httpx.post(start, headers=writes)
        assert r.status_code == 200, r.text
        assert r.json()["phase"] == "progressing" and r.json()["candidate"] == "green"
        actions = [e["action"] for e in httpx.get(f"{admin}/admin/v1/audit", headers=admin_headers()).json()["entries"]]
        assert "canary_start" in actions and "canary_start_forced" not in actions
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


@pytest.fixture(scope="module")
def grouped_repo(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Path:
    """digits:2 whose evaluation set has a ``group`` array that puts every row it gets wrong into group "b"
    (padded with as many right ones) and the rest into "a": a gap of about 0.5, which must fail."""
    import onnxruntime as ort

    root = tmp_path_factory.mktemp("grouped")
    folder = root / "digits" / "2"
    shutil.copytree(Path(model_repo) / "digits" / "2", folder, ignore=shutil.ignore_patterns("validation.*"))
    with np.load(folder / "holdout.npz") as data:
        inputs, labels = data["input"], data["label"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    predicted = session.run(["label"], {"input": inputs})[0]
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    groups = np.full(len(labels), "a")
    groups[wrong] = "b"
    groups[right[:len(wrong)]] = "b"
    np.savez(folder / "holdout.npz", input=inputs, label=labels, group=groups)
    return root


@pytest.fixture(scope="module")
def grouped_server(tmp_path_factory: pytest.TempPathFactory, grouped_repo: Path) -> Iterator[str]:
    proc, url = start_model_server(tmp_path_factory.mktemp("grouped-server"), ["digits:2"],
                                   extra=["--repo", str(grouped_repo)])
    yield url
    proc.stop()


def test_bias_fails_on_an_evaluation_set_with_unequal_groups_and_memory_is_na_with_url(
        grouped_repo: Path, grouped_server: str) -> None:
    run = run_validate("--model", "digits:2", "--repo", str(grouped_repo), "--url", grouped_server,
                       "--duration", "1", "--concurrency", "8")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = lines_by_check(run.stdout)
    assert lines["accuracy"].startswith("PASS accuracy: 0.9711")
    assert lines["bias"].startswith("FAIL bias: gap 0.5"), lines["bias"]
    assert "'a' (1.0000" in lines["bias"] and "'b' (0.5000, 26 rows)" in lines["bias"]
    assert lines["peak_memory"].startswith("N/A peak_memory: not measured") and "--url" in lines["peak_memory"]
    assert lines["security"].startswith("PASS security")
    doc = json.loads((grouped_repo / "digits" / "2" / "validation.json").read_text())
    assert doc["passed"] is False and doc["target"]["url"] == grouped_server and doc["target"]["pid"] is None
    bias = next(c for c in doc["checks"] if c["check"] == "bias")
    assert bias["details"]["groups"]["b"] == {"rows": 26, "accuracy": 0.5}
    assert "## Accuracy per group" in (grouped_repo / "digits" / "2" / "validation.md").read_text()


def test_require_bias_fails_an_evaluation_set_without_groups(grouped_repo: Path, grouped_server: str,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "digits" / "2"
    shutil.copytree(grouped_repo / "digits" / "2", folder, ignore=shutil.ignore_patterns("validation.*"))
    with np.load(folder / "holdout.npz") as data:
        inputs, labels = data["input"], data["label"]
    np.savez_compressed(folder / "holdout.npz", input=inputs, label=labels)  # no group array
    run = run_validate("--model", "digits:2", "--repo", str(tmp_path), "--url", grouped_server, "--duration", "0.5",
                       "--concurrency", "4", "--require-bias")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = lines_by_check(run.stdout)
    assert lines["bias"].startswith("FAIL bias: not applicable") and "--require-bias" in lines["bias"]
    assert lines["accuracy"].startswith("PASS accuracy")
    doc = json.loads((folder / "validation.json").read_text())
    assert [c["check"] for c in doc["checks"] if c["result"] == "FAIL"] == ["bias"]


def test_a_server_that_answers_500_fails_the_gate_with_a_report(repo_copy: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(repo_copy / "digits" / "1", repo / "digits" / "1", ignore=shutil.ignore_patterns("validation.*"))
    proc, url = start_model_server(tmp_path, ["digits:1"], extra=["--fault-error-rate", "1"])
    try:
        run = run_validate("--model", "digits:1", "--repo", str(repo), "--url", url, "--duration", "1")
    finally:
        proc.stop()
    assert run.returncode == 1, run.stdout + run.stderr
    lines = lines_by_check(run.stdout)
    assert lines["accuracy"].startswith("FAIL accuracy: could not score the evaluation set")
    assert "answered 500" in lines["accuracy"]
    assert lines["bias"].startswith("N/A bias: not measured")
    assert lines["throughput"].startswith("FAIL throughput: ") and "HTTP 500" in lines["throughput"]
    # Bad requests are refused before the injected fault, but a good one then fails: not healthy.
    assert lines["security"].startswith("FAIL security: 10/10 bad requests answered 4xx; NOT healthy after")
    assert json.loads((repo / "digits" / "1" / "validation.json").read_text())["passed"] is False


def test_usage_errors_exit_2_without_a_report(tmp_path: Path) -> None:
    run = run_validate("--model", "digits:9", "--repo", str(DEFAULT_REPOSITORY))
    assert run.returncode == 2 and "no metadata.json" in run.stderr
    run = run_validate("--model", "digits", "--repo", str(DEFAULT_REPOSITORY))
    assert run.returncode == 2 and "NAME:VERSION" in run.stderr
    run = run_validate("--model", "digits:1", "--url", "ftp://127.0.0.1:1", "--repo", str(DEFAULT_REPOSITORY))
    assert run.returncode == 2 and "http://" in run.stderr
    assert not (DEFAULT_REPOSITORY / "digits" / "9").exists()


# ------------------------------------------------------------------------------------------ verdicts, in-process


def _evalset(labels: list[int], groups: list[str] | None) -> EvalSet:
    return EvalSet(Path("holdout.npz"), np.zeros((len(labels), 4), dtype=np.float32), np.array(labels),
                   None if groups is None else np.array(groups))


def test_bias_is_na_without_groups_and_judges_the_largest_gap_with_them() -> None:
    labels = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    predicted = np.array([1, 1, 1, 1, 2, 2, 2, 0, 3, 3])
    assert bias_check(predicted, _evalset(labels, None)).result == "N/A"
    assert bias_check(predicted, _evalset(labels, ["x"] * 10)).result == "N/A"  # one group: no gap to measure
    assert bias_check(predicted, _evalset(labels, None), require=True).result == "FAIL"
    assert bias_check(predicted, _evalset(labels, ["x"] * 10), require=True).result == "FAIL"

    # x: 4/4, y: 3/4, z: 2/2 -> gap 0.25
    check = bias_check(predicted, _evalset(labels, ["x"] * 4 + ["y"] * 4 + ["z"] * 2))
    assert check.result == "FAIL" and check.value == pytest.approx(0.25)
    assert check.details["groups"]["y"] == {"rows": 4, "accuracy": 0.75}
    # spread the one mistake over a big enough group: gap 0.1 exactly passes
    labels = [1] * 20
    predicted = np.array([1] * 19 + [0])
    check = bias_check(predicted, _evalset(labels, ["p"] * 10 + ["q"] * 10))
    assert check.value == pytest.approx(MAX_BIAS_GAP) and check.result == "PASS"


def test_macro_precision_recall_f1_match_scikit_learn_and_ride_on_the_accuracy_check() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 300)
    predicted = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))
    predicted[predicted == 4] = 3  # class 4 is never predicted: precision 0 for it, not a division error
    expected = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    scores = macro_scores(predicted, labels)
    assert (scores["precision_macro"], scores["recall_macro"], scores["f1_macro"]) == pytest.approx(expected[:3])
    assert scores["per_class"]["4"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": int((labels == 4).sum())}
    check = accuracy_check(predicted, _evalset(labels.tolist(), None))
    assert check.details["f1_macro"] == pytest.approx(expected[2])
    assert f"F1 {expected[2]:.4f}" in check.figure


def test_accuracy_threshold_is_inclusive() -> None:
    labels = list(range(20))
    predicted = np.array([*labels[:17], 99, 99, 99])  # 0.85
    assert accuracy_check(predicted, _evalset(labels, None)).result == "PASS"
    predicted = np.array(labels[:16] + [99] * 4)  # 0.80
    check = accuracy_check(predicted, _evalset(labels, None))
    assert check.result == "FAIL" and "0.8000 (16/20" in check.figure


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 95) == 95.0 and percentile(values, 50) == 50.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 95) is None  # nothing answered: no latency, never a made-up one


def test_load_verdicts_and_errors_fail_both_load_checks() -> None:
    fast = LoadResult(32, 5.0, 10_000, {}, sorted([5.0] * 9_500 + [50.0] * 500), 2.0, 3.0)
    latency, throughput = load_checks(fast)
    assert (latency.result, throughput.result) == ("PASS", "PASS")
    assert latency.value == 5.0 and throughput.value == 2000.0 and "at concurrency 32" in throughput.figure
    slow = LoadResult(32, 5.0, 4_000, {}, sorted([20.0] * 3_700 + [150.0] * 300), 2.0, None)
    latency, throughput = load_checks(slow)
    assert latency.result == "FAIL" and latency.value == 150.0  # p95 over 100 ms
    assert throughput.result == "FAIL" and throughput.value == 800.0  # under 1,000 requests/s
    flaky = LoadResult(32, 5.0, 10_000, {"HTTP 503": 3}, [5.0] * 10_000, 2.0, None)
    latency, throughput = load_checks(flaky)
    assert latency.result == throughput.result == "FAIL" and "3 failed requests (HTTP 503: 3)" in latency.figure
    nothing = LoadResult(32, 5.0, 0, {"ClientConnectorError": 99}, [], 1.0, None)
    assert [c.result for c in load_checks(nothing)] == ["FAIL", "FAIL"]


def test_predicted_classes_from_labels_or_scores() -> None:
    meta = json.loads((DEFAULT_REPOSITORY / "digits" / "2" / "metadata.json").read_text())
    sig = Signature.from_metadata(meta)
    assert (sig.input_name, sig.output_name, sig.output_is_label) == ("input", "label", True)
    assert predicted_classes(sig, {"outputs": [{"name": "label", "data": [3, 4]}]}, 2).tolist() == [3, 4]
    scores = Signature("input", "FP32", (-1, 4), "logits", False)
    response = {"outputs": [{"name": "logits", "data": [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]}]}
    assert predicted_classes(scores, response, 2).tolist() == [1, 3]


def test_report_lines_show_na_and_baseline_differences() -> None:
    check = Check("latency_p95", "PASS", "12.0 ms", 12.0)
    check.baseline = {"model": "digits:1", "result": "PASS", "value": 15.5, "difference": -3.5}
    lines = report_lines([check, Check("bias", "N/A", "not applicable: no groups")])
    assert lines == ["PASS latency_p95: 12.0 ms | baseline digits:1: PASS 15.5 ms, difference -3.5 ms",
                     "N/A bias: not applicable: no groups"]
