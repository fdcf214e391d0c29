"""`make demo`'s job, end to end on the shipped models: a Shapes collection is generated,
indexed with shapes-clip (captions by shapes-vlm) and served; the printed address answers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
REPO = Path(__file__).resolve().parent.parent


def start_demo(out: Path) -> tuple[subprocess.Popen, str, list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "multimodal_models.cli", "demo", "--out", str(out),
                                "--images", "12", "--port", "0", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("multimodal serve: http://"):
            return process, line.split()[2].rstrip("/"), lines
    process.kill()
    pytest.fail("the demo did not print the server's address:\n" + "".join(lines))


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.mark.slow
def test_demo_generates_indexes_and_serves(tmp_path):
    process, url, lines = start_demo(tmp_path / "demo")
    try:
        output = "".join(lines)
        assert "1/3 generating a Shapes collection of 12 images" in output
        assert "12 images indexed: 12 embedded, 12 captioned" in output
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["index"] == {"images": 12}
        hits = httpx.post(f"{url}/v1/search", json={"query": "a red circle", "k": 5}, timeout=30).json()["data"]
        assert len(hits) == 5 and all(hit["caption"] and hit["thumbnail"].startswith("data:image/png") for hit in hits)
        assert httpx.get(url + "/", timeout=30).text.lstrip().lower().startswith("<!doctype html>")
    finally:
        stop(process)
    # a rerun reuses the collection and the index: nothing is generated or embedded again
    process, url, lines = start_demo(tmp_path / "demo")
    try:
        output = "".join(lines)
        assert "the Shapes collection in" in output and "12 images indexed: 0 embedded, 0 captioned, 12 unchanged" in output
    finally:
        stop(process)
