"""The images' entrypoints start outside Docker.

The API test rebuilds the API image's file tree from Dockerfile.api's COPY lines in a temporary
folder and runs its entrypoint there with an import guard that lets through only the standard
library, the distributions in deploy/requirements-api.txt (and what they depend on) and the files
the image copies: so it also proves the slim image has everything the API needs and no torch.
The worker's entrypoint is exercised by every `running_stack` (tests/stack_processes.py).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests import stack_processes as sp

ROOT = sp.ROOT
PROJECT_PACKAGES = ("api", "worker", "engine", "sd3serve", "models", "bench")

GUARD = """
import importlib.abc, importlib.machinery, os, sys
IMAGE = {image!r}
BLOCKED = set({blocked!r})
PROJECT = set({project!r})

class ImageGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            # What a missing module raises (optional imports, e.g. anyio's of sniffio, catch exactly it).
            raise ModuleNotFoundError(f"{{name}} is not installed in the API image (deploy/requirements-api.txt)")
        if top in PROJECT:
            # Search the image's folders only (not, e.g., an editable install of the repository).
            image_path = [p for p in (path or sys.path) if os.path.abspath(p or os.getcwd()).startswith(IMAGE)]
            spec = importlib.machinery.PathFinder.find_spec(name, image_path)
            if spec is None:
                raise ImportError(f"{{name}} is not copied into the API image (deploy/Dockerfile.api)")
            return spec
        return None

sys.meta_path.insert(0, ImageGuard())
"""


def _allowed_distributions(requirements: list[str]) -> set[str]:
    allowed: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        allowed.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue  # an optional dependency for another platform
        for line in requires:
            dep = Requirement(line)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return allowed


def _requirements() -> list[str]:
    lines = (ROOT / "deploy/requirements-api.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _blocked_modules(allowed: set[str]) -> list[str]:
    blocked = set()
    for module, dists in md.packages_distributions().items():
        if module in PROJECT_PACKAGES or module.startswith("_") or "." in module:
            continue
        if not any(canonicalize_name(d) in allowed for d in dists):
            blocked.add(module)
    return sorted(blocked)


def build_image_tree(dockerfile: Path, root: Path) -> tuple[Path, str]:
    """Copy what the Dockerfile's COPY lines copy into `root` (WORKDIR becomes root/app);
    returns the work dir and the entrypoint's path."""
    text = dockerfile.read_text()
    workdir = re.search(r"^WORKDIR (\S+)", text, flags=re.M).group(1)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        *sources, dest = line.split()
        target = root / (dest.lstrip("/") if dest.startswith("/") else f"{workdir.lstrip('/')}/{dest}")
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, flags=re.M).group(1))[0]
    return root / workdir.lstrip("/"), shutil.which(entrypoint, path=str(root / "usr/local/bin")) or entrypoint


def test_image_guard_blocks_torch_so_the_api_test_can_fail(tmp_path: Path) -> None:
    blocked = _blocked_modules(_allowed_distributions(_requirements()))
    assert "torch" in blocked and "diffusers" in blocked
    assert "fastapi" not in blocked and "redis" not in blocked and "starlette" not in blocked
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD.format(image=str(tmp_path), blocked=blocked, project=PROJECT_PACKAGES))
    code = "import fastapi\ntry:\n    import torch\nexcept ImportError as e:\n    print('blocked:', e)"
    result = subprocess.run(
        [str(sp.VENV_BIN / "python"), "-c", code],
        env=sp.base_env(PYTHONPATH=str(guard)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "blocked: torch is not installed in the API image" in result.stdout, result.stderr


def test_api_entrypoint_serves_from_the_slim_image_tree(tmp_path: Path) -> None:
    workdir, entrypoint = build_image_tree(ROOT / "deploy/Dockerfile.api", tmp_path / "image")
    guard = tmp_path / "guard"
    guard.mkdir()
    blocked = _blocked_modules(_allowed_distributions(_requirements()))
    (guard / "sitecustomize.py").write_text(
        GUARD.format(image=str(tmp_path / "image"), blocked=blocked, project=PROJECT_PACKAGES)
    )
    port = sp.free_port()
    with sp.redis_server(tmp_path) as redis_url:
        env = sp.api_env(redis_url, port, tmp_path / "data", PYTHONPATH=f"{guard}:{workdir}")
        log = tmp_path / "api.log"
        with sp.process(["sh", entrypoint], env, log, cwd=workdir) as proc:
            base = f"http://127.0.0.1:{port}"
            health = json.loads(sp.wait_http(f"{base}/healthz", 60, proc, log))
            assert health["status"] == "ok"
            ready = json.loads(sp.wait_http(f"{base}/readyz", 10, proc, log))
            assert ready["checks"] == {"redis": "ok", "storage": "ok"}
            assert 'sd3serve_queue_depth{queue="sd3serve"} 0.0' in _metrics(base)

            request = urllib.request.Request(
                f"{base}/v1/jobs",
                data=json.dumps({"prompt": "a red circle"}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 202
            metrics = _metrics(base)
            assert 'sd3serve_queue_depth{queue="sd3serve"} 1.0' in metrics
            assert "sd3serve_jobs_submitted_total 1.0" in metrics

            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught (exit -15).
            assert proc.wait(20) in (0, -signal.SIGTERM), sp.tail(log)
    output = log.read_text()
    assert "Application shutdown complete" in output, output
    assert "Traceback" not in output, output
    assert "is not installed in the API image" not in output


def _metrics(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        return response.read().decode()


# The worker's entrypoint (and the API's, from the repository) start every stack in
# test_metrics_e2e.py and test_playground.py (tests/stack_processes.running_stack), which also
# checks that both stop cleanly on SIGTERM.
