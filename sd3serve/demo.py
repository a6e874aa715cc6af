"""`python -m sd3serve.demo` (`make demo`): a few prompts through the REST API, end to end.

Starts the embedded stack (Redis, API, one worker; see `sd3serve up`) unless --url points at a
running API, submits the prompts at once (so the worker batches them), waits, saves the PNGs to
outputs/ and prints a table (prompt, status, seconds, file). Stops what it started.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import httpx

DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a blue circle on a yellow background",
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "image"


def run_demo(url: str, prompts: list[str], out: Path, steps: int | None, timeout: float, headers: dict[str, str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with httpx.Client(base_url=url, headers=headers, timeout=60, follow_redirects=True) as http:
        submitted: list[tuple[str, str, float]] = []
        for prompt in prompts:
            body: dict = {"prompt": prompt, "seed": len(submitted)}
            if steps:
                body["steps"] = steps
            response = http.post("/v1/jobs", json=body)
            if response.status_code != 202:
                raise SystemExit(f"error: submitting {prompt!r} failed: {response.status_code} {response.text}")
            submitted.append((prompt, response.json()["id"], time.monotonic()))
        deadline = time.monotonic() + timeout
        for index, (prompt, job_id, started) in enumerate(submitted):
            job = http.get(f"/v1/jobs/{job_id}").json()
            while job["status"] in ("queued", "running") and time.monotonic() < deadline:
                wait = min(30.0, max(deadline - time.monotonic(), 0.0))
                job = http.get(f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 30).json()
            seconds = (job.get("timings") or {}).get("total_seconds") or time.monotonic() - started
            path = None
            if job["status"] == "succeeded":
                image = http.get(job["image_url"])
                image.raise_for_status()
                path = out / f"{index:02d}-{slug(prompt)}.png"
                path.write_bytes(image.content)
            rows.append(
                {
                    "prompt": prompt,
                    "status": job["status"],
                    "seconds": seconds,
                    "file": str(path) if path else (job.get("error") or {}).get("message", "-"),
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    width = max([len("prompt")] + [len(r["prompt"]) for r in rows])
    print(f"{'prompt':<{width}}  {'status':<9}  {'seconds':>7}  file")
    for r in rows:
        print(f"{r['prompt']:<{width}}  {r['status']:<9}  {r['seconds']:>7.2f}  {r['file']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd3serve.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running sd3serve API (default: start the embedded stack)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeat; default: four)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where the PNGs go (default outputs/)")
    parser.add_argument("--api-key", help="bearer API key, if the API wants one")
    parser.add_argument("--model", help="model folder for the embedded worker (default: the reference model)")
    parser.add_argument("--device", help="the embedded worker's device (default auto)")
    parser.add_argument("--data-dir", default=".sd3serve", help="the embedded stack's data folder")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all images")
    args = parser.parse_args(argv)
    prompts = args.prompts or list(DEFAULT_PROMPTS)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:
        rows = run_demo(args.url, prompts, args.out, args.steps, args.timeout, headers)
    else:
        from sd3serve.up import Stack, StackError

        print("starting the embedded stack (Redis, API, worker; loading the model)...", flush=True)
        try:
            with Stack(args.data_dir, port=0, quiet=True, model=args.model, device=args.device) as stack:
                print(f"API at {stack.url}; logs in {stack.data_dir / 'logs'}", flush=True)
                rows = run_demo(stack.url, prompts, args.out, args.steps, args.timeout, headers)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print_table(rows)
    return 0 if all(r["status"] == "succeeded" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
