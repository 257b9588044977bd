"""The README's first steps, run verbatim with bash against a fresh ``bluegreen up``, end with the rollout promoted.

The only changes made to the README's commands: the data address ``localhost:8080`` becomes this stack's free
port, and the ``export`` lines are the ones this ``up`` printed (its admin URL and token), as a reader pastes
them. Everything else (the loop, the policy, the CLI calls) runs as written, under ``set -euo pipefail``, so a
step that fails or a demo that rolls back (as the first README's did: its repeated request was a cache hit,
which never counts as candidate traffic) fails this test. Like a reader's, the run's ``bluegreen validate`` writes
its report beside the model in the checkout's repository (ignored by git; other tests use their own repositories).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import BLUEGREEN, ROOT, Proc, free_port, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")

README_DATA = "localhost:8080"
BUDGET_S = 60.0


def first_steps_blocks(readme: str) -> list[str]:
    """The ```bash blocks of the README's "First steps" section, in order."""
    section = readme.split("\n## First steps", 1)[1].split("\n## ", 1)[0]
    fences = re.findall(r"^```(\w*)\n(.*?)^```", section, flags=re.M | re.S)
    return [body for lang, body in fences if lang == "bash"]


def export_lines(log: str) -> str:
    """The two ``export`` lines ``up`` printed for the CLI, as a reader pastes them."""
    lines = [line for line in log.splitlines() if line.startswith("export BLUEGREEN_ADMIN_")]
    names = [line.split("=", 1)[0].removeprefix("export ") for line in lines]
    assert names == ["BLUEGREEN_ADMIN_URL", "BLUEGREEN_ADMIN_TOKEN"], log
    return "\n".join(lines)


def test_the_readme_blocks_are_what_this_test_runs() -> None:
    """The blocks use only what the export lines and the data address give them (no other port, no token), and
    the release is in them: otherwise the run below would prove less than the README claims."""
    blocks = first_steps_blocks((ROOT / "README.md").read_text())
    script = "\n".join(blocks)
    assert len(blocks) >= 2 and README_DATA in script
    assert "canary digits start" in script and "no-cache" in script and "for round in $(seq" in script
    assert "validate --model digits:2" in script
    assert "8081" not in script and "127.0.0.1" not in script and "TOKEN=" not in script


def test_the_first_steps_run_verbatim_and_promote(tmp_path: Path) -> None:
    started = time.monotonic()
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    data, admin = f"127.0.0.1:{ports['data']}", f"http://127.0.0.1:{ports['admin']}"
    # An empty BLUEGREEN_ADMIN_TOKEN: `up` makes (and keeps in its state dir) its own, as for a newcomer.
    up = Proc([*BLUEGREEN, "up", "--state-dir", str(tmp_path / "state"), "--port", str(ports["data"]),
               "--admin-port", str(ports["admin"]), "--blue-port", str(ports["blue"]),
               "--green-port", str(ports["green"])], tmp_path / "up.log", {"BLUEGREEN_ADMIN_TOKEN": ""})
    try:
        wait_until(lambda: "] ready" in up.log() or up.popen.poll() is not None, 40, interval=0.1, what="up ready")
        assert up.popen.poll() is None, up.log()
        exports = export_lines(up.log())
        assert f"BLUEGREEN_ADMIN_URL={admin}" in exports, exports
        shown = (ROOT / "README.md").read_text()  # what the README says up prints, on its default ports
        assert exports.splitlines()[0].replace(str(ports["admin"]), "8081") in shown, exports

        blocks = first_steps_blocks((ROOT / "README.md").read_text())
        script = "\n".join(["set -euo pipefail", exports, *blocks]).replace(README_DATA, data)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
        left = BUDGET_S - (time.monotonic() - started) - 5
        run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=max(left, 1))
        output = f"--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}\n--- up\n{up.log()[-3000:]}"
        assert run.returncode == 0, output

        token = exports.rsplit("BLUEGREEN_ADMIN_TOKEN=", 1)[1].strip()
        r = httpx.get(f"{admin}/admin/v1/models/digits/canary", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["phase"] == "promoted", (doc, output)
        assert doc["weights"] == {"blue": 0, "green": 100}, doc
        assert '"label"' in run.stdout and "PASSED: digits:2" in run.stdout, output
        assert "digits: canary promoted" in run.stdout, output
        assert " canary_start " in run.stdout and "canary_start_forced" not in run.stdout, output  # the gate passed
    finally:
        up.stop(30)
    assert time.monotonic() - started < BUDGET_S
