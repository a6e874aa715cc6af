"""Load generator for a running sd3serve API (or any server speaking its REST jobs API).

Open loop: Poisson arrivals (seeded) at `--rate` jobs/s for `--duration` seconds; closed loop
(`--concurrency N`): N jobs outstanding at all times for `--duration` seconds (a system's
saturated throughput). Either way it then waits for every accepted job to end, within the hard
cap `--max-seconds` on the whole run, and stops by itself. Each job is submitted over REST
(async httpx), followed to its end by long-polling `GET /v1/jobs/{id}?wait=`, and its image is
downloaded and checked. With `--redis-url` the run is also audited in RQ: a job with more than
one successful execution counts as finished twice.

    python -m bench.load_test --url http://127.0.0.1:8000 --rate 0.8 --duration 60 --size 1024
    python -m bench.load_test --url http://127.0.0.1:8000 --concurrency 24 --duration 60 --size 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.load_stats import JobRecord, count_duplicates, summarize
from bench.gpu_sampler import GpuSampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    rate: float = 0.0  # open loop: mean arrivals per second (Poisson)
    concurrency: int = 0  # closed loop: jobs kept outstanding (used when rate is 0)
    duration_s: float = 60.0  # how long requests are sent
    max_requests: int = 10_000  # hard cap on submissions
    max_seconds: float = 900.0  # hard cap on the whole run, draining included
    sizes: tuple[int, ...] = (1024,)  # square sides; several: each request draws one (seeded)
    steps: int = 28
    guidance_scale: float = 7.0
    cache_interval: int = 1
    cache_policy: str | None = None
    seed: int = 0  # arrival times, prompts and sizes all follow it
    api_key: str | None = None
    poll_wait: float = 30.0
    fetch_images: bool = True
    redis_url: str | None = None  # audit duplicates in RQ
    label: dict = field(default_factory=dict)  # copied into the result (system, mode, ...)

    def __post_init__(self) -> None:
        if (self.rate > 0) == (self.concurrency > 0):
            raise ValueError("give either a rate (open loop) or a concurrency (closed loop), not both")
        if self.duration_s <= 0 or self.max_seconds <= self.duration_s:
            raise ValueError("duration must be > 0 and max_seconds longer than the duration")
        if not self.sizes or any(s % 16 or s < 64 for s in self.sizes):
            raise ValueError("sizes must be multiples of 16, at least 64")

    @property
    def mode(self) -> str:
        return "open" if self.rate > 0 else "closed"


def arrival_plan(config: LoadConfig) -> list[tuple[float, str, int, int]]:
    """(offset seconds, prompt, size, seed) of each open-loop arrival: the same for every system."""
    rng = random.Random(config.seed)
    plan: list[tuple[float, str, int, int]] = []
    t = 0.0
    while len(plan) < config.max_requests:
        t += rng.expovariate(config.rate)
        if t >= config.duration_s:
            break
        plan.append((t, *_request_draw(rng, config)))
    return plan


def _request_draw(rng: random.Random, config: LoadConfig) -> tuple[str, int, int]:
    prompt = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} on a {rng.choice(COLOURS)} background"
    return prompt, rng.choice(config.sizes), rng.randrange(2**31)


class LoadRun:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.records: list[JobRecord] = []
        self.rejected = 0
        self.errors: list[str] = []
        self.t0 = 0.0
        self.deadline = 0.0

    async def run(self) -> dict:
        c = self.config
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
        timeout = httpx.Timeout(c.poll_wait + 30, connect=10)
        sampler = GpuSampler()
        async with httpx.AsyncClient(base_url=c.url, headers=headers, limits=limits, timeout=timeout) as http:
            self.t0 = time.time()
            self.deadline = time.monotonic() + c.max_seconds
            sampler.start()
            try:
                if c.mode == "open":
                    await self._open_loop(http)
                else:
                    await self._closed_loop(http)
            finally:
                busy = sampler.stop()
        duplicates = count_duplicates(c.redis_url, [r.job_id for r in self.records if r.job_id]) if c.redis_url else None
        summary = summarize(self.records, self.rejected, c.duration_s, c.mode, self.t0)
        summary.update(duplicates=duplicates, gpu_busy=busy, errors=self.errors[:20])
        return dict(config=_config_dict(c), summary=summary, jobs=[asdict(r) for r in self.records])

    async def _open_loop(self, http: httpx.AsyncClient) -> None:
        tasks = []
        start = time.monotonic()
        for offset, prompt, size, seed in arrival_plan(self.config):
            await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
            tasks.append(asyncio.create_task(self._one_job(http, prompt, size, seed)))
        await self._drain(tasks)

    async def _closed_loop(self, http: httpx.AsyncClient) -> None:
        rng = random.Random(self.config.seed)
        end = time.monotonic() + self.config.duration_s
        submitted = 0

        async def client_loop() -> None:
            nonlocal submitted
            while time.monotonic() < end and submitted < self.config.max_requests:
                submitted += 1
                await self._one_job(http, *_request_draw(rng, self.config))

        await self._drain([asyncio.create_task(client_loop()) for _ in range(self.config.concurrency)])

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        remaining = self.deadline - time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=max(remaining, 0.0)) if tasks else (set(), set())
        for task in pending:  # past the hard cap: their jobs stay unfinished and count as lost
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _one_job(self, http: httpx.AsyncClient, prompt: str, size: int, seed: int) -> None:
        c = self.config
        body = dict(
            prompt=prompt,
            width=size,
            height=size,
            steps=c.steps,
            guidance_scale=c.guidance_scale,
            seed=seed,
            cache_interval=c.cache_interval,
        )
        if c.cache_policy:
            body["cache_policy"] = c.cache_policy
        record = JobRecord(size=size, submit=time.time())
        try:
            response = await http.post("/v1/jobs", json=body)
        except httpx.HTTPError as exc:
            self.errors.append(f"submit: {exc!r}")
            self.rejected += 1
            return
        if response.status_code != 202:
            self.rejected += 1
            self.errors.append(f"submit: HTTP {response.status_code} {response.text[:200]}")
            return
        record.job_id = response.json()["id"]
        self.records.append(record)
        try:
            await self._follow(http, record)
        except asyncio.CancelledError:
            record.status = "unfinished"
            raise

    async def _follow(self, http: httpx.AsyncClient, record: JobRecord) -> None:
        while time.monotonic() < self.deadline:
            wait = min(self.config.poll_wait, max(self.deadline - time.monotonic(), 0.1))
            try:
                response = await http.get(f"/v1/jobs/{record.job_id}", params={"wait": f"{wait:.1f}"})
            except httpx.HTTPError as exc:
                self.errors.append(f"status: {exc!r}")
                await asyncio.sleep(0.5)
                continue
            if response.status_code != 200:
                self.errors.append(f"status: HTTP {response.status_code}")
                await asyncio.sleep(0.5)
                continue
            info = response.json()
            if info["status"] in ("succeeded", "failed", "canceled"):
                record.observe_end(info, time.time())
                if info["status"] == "succeeded" and self.config.fetch_images:
                    record.image_bytes = await self._image_size(http, record.job_id)
                return
        record.status = "unfinished"

    async def _image_size(self, http: httpx.AsyncClient, job_id: str) -> int:
        try:
            response = await http.get(f"/v1/jobs/{job_id}/image", follow_redirects=True)
        except httpx.HTTPError as exc:
            self.errors.append(f"image: {exc!r}")
            return 0
        ok = response.status_code == 200 and response.content.startswith(PNG_MAGIC)
        return len(response.content) if ok else 0


def _config_dict(config: LoadConfig) -> dict:
    data = asdict(config)
    data.pop("api_key")
    data["mode"] = config.mode
    return data


def run_load(config: LoadConfig) -> dict:
    return asyncio.run(LoadRun(config).run())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: arrivals per second")
    p.add_argument("--concurrency", type=int, default=0, help="closed loop: jobs kept outstanding")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=10_000)
    p.add_argument("--max-seconds", type=float, default=900.0)
    p.add_argument("--size", type=int, action="append", help="square side (repeat for a mix); default 1024")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--cache-interval", type=int, default=1)
    p.add_argument("--cache-policy", choices=("attention", "step"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--redis-url", help="audit duplicate executions in RQ")
    p.add_argument("--no-images", action="store_true", help="don't download the images")
    p.add_argument("--out", type=Path, help="write the whole record (summary and every job) here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = LoadConfig(
            url=args.url,
            rate=args.rate,
            concurrency=args.concurrency,
            duration_s=args.duration,
            max_requests=args.max_requests,
            max_seconds=args.max_seconds,
            sizes=tuple(args.size or [1024]),
            steps=args.steps,
            guidance_scale=args.guidance,
            cache_interval=args.cache_interval,
            cache_policy=args.cache_policy,
            seed=args.seed,
            api_key=args.api_key,
            fetch_images=not args.no_images,
            redis_url=args.redis_url,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_load(config)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0 if result["summary"]["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
