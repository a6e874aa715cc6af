"""The control plane at fleet scale, on CPU: one private Redis and one API process serving N fake
GPU workers (bench/fleet_workers.py: the real `BatchWorker`, a fake engine sleeping the H200's
step time), driven by bench/load_test.py over the REST API. Per N it records jobs/s, p95, lost and
duplicate jobs, and what the shared parts cost: Redis CPU and commands per job, the API's CPU
per job, the fake workers' and the load generator's CPU per job, and how busy the machine was.

    python -m bench.fleet_sim --workers 64,128,256 --duration 60 --out bench/results/fleet_sim_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.fake_engine import H200_BATCH, H200_STEP_SECONDS
from bench.load_test import LoadConfig, run_load
from bench.proc_stats import machine_cpu, process_cpu_seconds, tree_cpu_seconds
from bench.serving_stack import Stack

H200_IMAGES_PER_S = 1.10  # one H200 at 1024², 28 steps (bench/results/serving_h200.json)


@dataclass(frozen=True)
class SimConfig:
    workers: int
    duration_s: float = 60.0
    step_seconds: float = H200_STEP_SECONDS
    steps: int = 28
    batch: int = H200_BATCH
    outstanding_per_slot: float = 1.1  # closed loop: jobs kept outstanding per batch slot of the fleet
    size: int = 1024
    register_timeout_s: float = 120.0

    @property
    def capacity_jobs_per_s(self) -> float:
        return self.workers * self.batch / (self.steps * self.step_seconds)

    @property
    def concurrency(self) -> int:
        return math.ceil(self.workers * self.batch * self.outstanding_per_slot)


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Snapshot:
    """Counters of the shared parts at one moment."""

    def __init__(self, stack: Stack) -> None:
        info = stack._redis().info()
        self.t = time.monotonic()
        self.redis_cpu = process_cpu_seconds(stack.processes["redis"].pid)
        self.redis_commands = int(info["total_commands_processed"])
        self.redis_instant_ops = int(info["instantaneous_ops_per_sec"])
        stats = stack._redis().info("commandstats")
        self.redis_calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        self.api_cpu = tree_cpu_seconds(stack.processes["api"].pid)
        self.fleet_cpu = tree_cpu_seconds(stack.processes["fleet"].pid)
        self.loadgen_cpu = _self_cpu_seconds()
        self.machine_busy, self.machine_total = machine_cpu()


def registered_workers(stack: Stack) -> int:
    from rq import Worker

    return Worker.count(connection=stack._redis())


def wait_for_fleet(stack: Stack, count: int, timeout: float) -> float:
    """Seconds until all `count` fake workers registered with RQ."""
    start = time.monotonic()
    while registered_workers(stack) < count:
        if stack.processes["fleet"].poll() is not None:
            raise RuntimeError(f"the fleet exited:\n{stack.log_tail('fleet')}")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"only {registered_workers(stack)} of {count} workers registered after {timeout:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - start


def simulate(config: SimConfig, work: Path) -> dict:
    env = {"SD3SERVE_MODEL": "random:sd3-medium", "SD3SERVE_LOG_LEVEL": "WARNING", "SD3SERVE_MAX_WAIT": "60"}
    with Stack(work, env) as stack:
        stack.start_process(
            "fleet",
            [
                sys.executable,
                "-m",
                "bench.fleet_workers",
                "--count",
                str(config.workers),
                "--step-seconds",
                str(config.step_seconds),
                "--batch",
                str(config.batch),
            ],
        )
        startup_s = wait_for_fleet(stack, config.workers, config.register_timeout_s)
        load = LoadConfig(
            url=stack.api_url,
            concurrency=config.concurrency,
            duration_s=config.duration_s,
            max_seconds=config.duration_s + 8 * config.steps * config.step_seconds + 120,
            max_requests=1_000_000,
            sizes=(config.size,),
            steps=config.steps,
            redis_url=stack.redis_url,
            label=dict(system="fleet_sim", workers=config.workers),
        )
        before = Snapshot(stack)
        result = run_load(load)
        after = Snapshot(stack)
        registered = registered_workers(stack)
        client_lost = [j["job_id"] for j in result["jobs"] if j["status"] != "succeeded" or j["image_bytes"] <= 0]
        server_side = server_side_state(stack, client_lost)
    row = row_of(config, result["summary"], before, after, registered, startup_s)
    row["jobs_per_s"] = steady_jobs_per_s(result, config.duration_s)
    row.update(lost_breakdown(result), **server_side)
    return dict(row=row, summary=result["summary"], config=asdict(config))


def server_side_state(stack: Stack, job_ids: list[str]) -> dict:
    """Of the jobs the client did not see through, how many RQ finished with their PNG in storage
    (the client gave up, the fleet did not lose them)."""
    from rq.job import Job, JobStatus

    from worker.keys import image_key

    finished_and_stored = 0
    for job_id in job_ids:
        try:
            status = Job.fetch(job_id, connection=stack._redis()).get_status()
        except Exception:
            continue
        stored = (stack.work / "data" / "images" / image_key("", job_id)).is_file()
        finished_and_stored += status == JobStatus.FINISHED and stored
    return dict(client_lost_but_finished_and_stored=finished_and_stored)


def lost_breakdown(result: dict) -> dict:
    """What load_test counted as lost: jobs never seen to end, and jobs that succeeded but whose
    image the client could not download (with the client's first errors, to tell them apart)."""
    jobs = result["jobs"]
    return dict(
        lost_unfinished=sum(j["status"] in ("pending", "unfinished") for j in jobs),
        lost_no_image=sum(j["status"] == "succeeded" and j["image_bytes"] <= 0 for j in jobs),
        first_errors=result["summary"]["errors"][:3],
    )


def steady_jobs_per_s(result: dict, duration_s: float) -> float:
    """Jobs finished per second in the second half of the sending window: the closed loop has
    filled every batch by then, and the drain after the window is left out."""
    t0 = min(job["submit"] for job in result["jobs"]) if result["jobs"] else 0.0
    start, end = t0 + duration_s / 2, t0 + duration_s
    done = [j for j in result["jobs"] if j["status"] == "succeeded" and j["finished"] and start < j["finished"] <= end]
    return round(len(done) / (end - start), 2)


def row_of(config: SimConfig, summary: dict, before: Snapshot, after: Snapshot, registered: int, startup_s: float) -> dict:
    wall = after.t - before.t
    jobs = max(summary["completed"], 1)
    redis_cpu = after.redis_cpu - before.redis_cpu
    commands = after.redis_commands - before.redis_commands
    busy = after.machine_busy - before.machine_busy
    total = after.machine_total - before.machine_total
    return dict(
        workers=config.workers,
        registered_workers=registered,
        capacity_jobs_per_s=round(config.capacity_jobs_per_s, 2),
        concurrency=config.concurrency,
        completed=summary["completed"],
        jobs_per_s=None,  # filled in by `simulate` from the job records
        jobs_per_s_whole_run=round(summary["completed"] / wall, 2),
        p50_s=summary["p50_s"],
        p95_s=summary["p95_s"],
        lost=summary["lost"],
        duplicates=summary["duplicates"],
        failed=summary["failed"],
        rejected=summary["rejected"],
        redis_cpu_s_per_job=round(redis_cpu / jobs, 6),
        redis_cpu_core_fraction=round(redis_cpu / wall, 3),
        redis_ops_per_s=round(commands / wall),
        redis_ops_per_job=round(commands / jobs, 1),
        redis_ops_per_worker_s=round(commands / wall / config.workers, 1),
        api_cpu_s_per_job=round((after.api_cpu - before.api_cpu) / jobs, 5),
        api_cpu_core_fraction=round((after.api_cpu - before.api_cpu) / wall, 3),
        fleet_cpu_s_per_job=round((after.fleet_cpu - before.fleet_cpu) / jobs, 5),
        loadgen_cpu_s_per_job=round((after.loadgen_cpu - before.loadgen_cpu) / jobs, 5),
        machine_cores_busy=round(busy / wall, 2) if wall else None,
        machine_busy_fraction=round(busy / total, 3) if total else None,
        redis_top_commands_per_job=top_commands(before, after, jobs),
        wall_s=round(wall, 1),
        fleet_startup_s=round(startup_s, 1),
    )


def top_commands(before: Snapshot, after: Snapshot, jobs: int, count: int = 8) -> dict[str, float]:
    calls = {name: n - before.redis_calls.get(name, 0) for name, n in after.redis_calls.items()}
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:count]
    return {name: round(n / jobs, 1) for name, n in top}


def extrapolate(rows: list[dict], images_per_gpu_s: float = H200_IMAGES_PER_S) -> dict:
    """Jobs/s one core of Redis (and of the API) would carry at the measured CPU per job, and the
    H200s at 1024² that is. Conservative: the costliest CPU per job of any run (the API's cost
    per job grows with how long each job is long-polled, so it varies most)."""
    redis_s = max(r["redis_cpu_s_per_job"] for r in rows)
    api_s = max(r["api_cpu_s_per_job"] for r in rows)
    redis_jobs = 1 / redis_s if redis_s else None
    api_jobs = 1 / api_s if api_s else None
    return dict(
        redis_cpu_s_per_job=redis_s,
        api_cpu_s_per_job=api_s,
        images_per_gpu_s=images_per_gpu_s,
        redis_core_jobs_per_s=_r(redis_jobs),
        redis_core_gpus=_r(redis_jobs and redis_jobs / images_per_gpu_s),
        api_core_jobs_per_s=_r(api_jobs),
        api_core_gpus=_r(api_jobs and api_jobs / images_per_gpu_s),
    )


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="64,128,256", help="fleet sizes, comma separated")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--step-seconds", type=float, default=H200_STEP_SECONDS)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--batch", type=int, default=H200_BATCH)
    p.add_argument("--outstanding-per-slot", type=float, default=1.1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for workers in [int(w) for w in args.workers.split(",") if w]:
        config = SimConfig(
            workers=workers,
            duration_s=args.duration,
            step_seconds=args.step_seconds,
            steps=args.steps,
            batch=args.batch,
            outstanding_per_slot=args.outstanding_per_slot,
        )
        with tempfile.TemporaryDirectory(prefix=f"fleet-sim-{workers}-") as work:
            run = simulate(config, Path(work))
        print(json.dumps(run["row"]), flush=True)
        rows.append(run["row"])
        if args.out:  # after every N, so a cut-short sweep keeps what it measured
            args.out.write_text(
                json.dumps(
                    dict(
                        rows=rows,
                        extrapolation=extrapolate(rows),
                        settings=dict(
                            step_seconds=args.step_seconds,
                            steps=args.steps,
                            batch=args.batch,
                            duration_s=args.duration,
                            outstanding_per_slot=args.outstanding_per_slot,
                            size=1024,
                            storage="local",
                            api_workers=1,
                        ),
                    ),
                    indent=1,
                )
                + "\n"
            )
    return 0 if all(r["lost"] == 0 and not r["duplicates"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
