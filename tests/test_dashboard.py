"""`evomerge dashboard RUN` for real: optuna-dashboard on loopback, serving the run's study and plots.

Routes are optuna-dashboard 0.21's: /api/meta, /api/studies, /api/studies/<study_id> (study detail,
with the study-level artifacts) and /artifacts/<study_id>/<artifact_id> (an artifact's bytes).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import digits_config, free_port
from evomerge.engine.search import SearchOptions, run_search

BIN = Path(sys.executable).parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
START_TIMEOUT_S = 30


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:  # one little-endian 32-bit word
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def _json(url: str):
    status, _, body = _get(url)
    assert status == 200, url
    return json.loads(body)


@pytest.fixture
def finished_run(ray_session, tmp_path):
    summary = run_search(digits_config("dash", budget={"evaluations": 60}),
                         SearchOptions(out_dir=tmp_path / "run", progress=False))
    return tmp_path / "run", summary


@pytest.fixture
def dashboard(finished_run, tmp_path):
    run_dir, _ = finished_run
    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "evomerge"), "dashboard", str(run_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`evomerge dashboard` exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                if _get(f"{base}/api/meta")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not answering after {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield base, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_dashboard_serves_the_study_and_its_plots(finished_run, dashboard):
    run_dir, summary = finished_run
    base, port = dashboard

    # loopback only: the one listening socket on the port is 127.0.0.1's
    assert _listening_addresses(port) == {"127.0.0.1"}

    assert _json(f"{base}/api/meta")["artifact_is_available"] is True

    studies = _json(f"{base}/api/studies")["study_summaries"]
    matching = [s for s in studies if s["study_name"] == summary["study_name"]]
    assert len(matching) == 1, [s["study_name"] for s in studies]
    study_id = matching[0]["study_id"]

    detail = _json(f"{base}/api/studies/{study_id}")
    assert detail["name"] == summary["study_name"]
    assert len(detail["trials"]) == summary["evaluations"] == 60
    artifacts = {a["filename"]: a for a in detail["artifacts"]}
    assert {"progress.png", "coverage.png"} <= set(artifacts), sorted(artifacts)

    for name in ("progress.png", "coverage.png"):
        status, headers, body = _get(f"{base}/artifacts/{study_id}/{artifacts[name]['artifact_id']}")
        assert status == 200
        assert headers["Content-Type"] == "image/png"
        assert body.startswith(PNG_SIGNATURE)
        assert body == (run_dir / "plots" / name).read_bytes()  # the plot the search drew


def test_status_reports_the_finished_run(finished_run):
    """`evomerge status`: counts from the study, archive and staleness from the last snapshot."""
    from evomerge.status import run_status, status_table

    run_dir, summary = finished_run
    status = run_status(run_dir)
    assert status["state"] == "finished"
    assert status["evaluations"] == summary["evaluations"] == 60
    assert status["failed"] == summary["failed"]
    assert status["best_train"] == summary["best"]["train_score"]
    assert status["best_member"] == summary["best"]["member_id"]
    assert 1 <= status["archive_size"] <= 60
    assert status["last_snapshot"].startswith("step-00000060")
    # 60 children through 2 workers: each was out while others came back
    assert status["mean_staleness"] == round(summary["mean_staleness"], 1) and status["mean_staleness"] > 0
    table = status_table(status)
    for label in ("evaluations", "60 / 60", "archive size", "children's staleness (evals)"):
        assert label in table
