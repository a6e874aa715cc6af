"""The embedded stack: `sd3serve up` (its own redis-server, the API, one worker) serving real jobs
and stopping cleanly on SIGTERM, and the demo script end to end. Tiny model on CPU."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from tests.fleet_fixtures import REPO, free_port, wait_until

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD3SERVE_")}
    env.update(
        {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}
    )
    return env


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sd3serve_up_serves_jobs_and_stops_everything_on_sigterm(tiny_model_dir, tmp_path):
    unused_redis = free_port()  # nothing answers here, so `up` starts its own redis-server
    log = open(tmp_path / "up.log", "w+")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sd3serve.cli",
            "up",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--redis-url",
            f"redis://127.0.0.1:{unused_redis}/0",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--quiet",
        ],
        cwd=REPO,
        env=_env(SD3SERVE_QUEUE="sd3serve-up-test"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def url() -> str | None:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            found = re.search(r"sd3serve is up: (http://\S+)", (tmp_path / "up.log").read_text())
            return found.group(1) if found else None

        base = wait_until(url, 180, interval=0.2, what="`sd3serve up` to report its URL")
        redis_port = int(re.search(r"Redis redis://127.0.0.1:(\d+)", (tmp_path / "up.log").read_text()).group(1))
        assert redis_port != unused_redis

        job = httpx.post(f"{base}/v1/jobs", json={"prompt": "a red circle on a blue background", "seed": 3}).json()
        done = httpx.get(f"{base}/v1/jobs/{job['id']}", params={"wait": 60}, timeout=70).json()
        assert done["status"] == "succeeded", done
        image = httpx.get(done["image_url"])
        assert Image.open(io.BytesIO(image.content)).size == (64, 64)  # the model's own default size
        assert (tmp_path / "data" / "images" / f"{job['id']}.png").exists()

        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, (tmp_path / "up.log").read_text()
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    api_port = int(base.rsplit(":", 1)[1])
    assert not _port_open(api_port) and not _port_open(redis_port)  # the API and our Redis are gone
    assert (tmp_path / "data" / "redis").is_dir()  # where our Redis kept its append-only file


def test_demo_submits_prompts_saves_images_and_prints_a_table(tiny_model_dir, tmp_path):
    prompts = ["a red circle on a blue background", "a yellow square on a black background"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd3serve.demo",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "outputs"),
            "--data-dir",
            str(tmp_path / "data"),
            *[arg for p in prompts for arg in ("--prompt", p)],
        ],
        cwd=REPO,
        env=_env(SD3SERVE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("prompt"))
    assert lines[header].split() == ["prompt", "status", "seconds", "file"]
    rows = lines[header + 1 :]
    assert len(rows) == 2
    for prompt, row in zip(prompts, rows):
        assert row.startswith(prompt) and " succeeded " in row
        path = row.split()[-1]
        assert Image.open(path).size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [
        "00-a-red-circle-on-a-blue-background.png",
        "01-a-yellow-square-on-a-black-background.png",
    ]
