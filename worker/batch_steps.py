"""The batching worker's engine side: one engine step, its finished images handed to upload
threads, and finished uploads turned into job results. No Redis here (worker/bookkeeping.py and
`BatchWorker._sync` do that), so a Redis outage never loses computed work.

A mixin of `BatchWorker` (worker/batch_worker.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, wait

from rq.utils import now

from worker import metrics
from worker.batch import BatchWorkerState, Phase
from worker.durable_upload import DurableUploader, StoreFailed
from worker.job_spec import split_request_id
from worker.jobs import build_result

log = logging.getLogger("sd3serve.worker")


class BatchStepping(BatchWorkerState):
    def _step_engine(self) -> None:
        if not self.engine.has_work():
            for entry in self._entries.values():
                if entry.phase is Phase.RUNNING:  # cannot happen unless the engine lost it
                    entry.fail("engine_error", "the engine dropped the request without a result", retry=True)
            uploads = [e.upload for e in self._entries.values() if e.phase is Phase.STORING and e.upload]
            uploads = [u for u in uploads if u is not None]
            if uploads:
                held = self._uploads is not None and self._uploads.waiting  # storage is down: poll slower
                wait(uploads, timeout=0.5 if held else 0.05, return_when=FIRST_COMPLETED)
            self._collect_uploads()
            return
        try:
            report = self.engine.step()
        except Exception as exc:  # a broken step fails the requests in it, not the worker
            log.exception("engine step failed")
            for entry in self._entries.values():
                if entry.phase is Phase.RUNNING:
                    for request_id in entry.request_ids:
                        self.engine.cancel(request_id)
                    entry.fail("engine_error", f"the engine failed: {exc}", retry=True)
            return
        self._steps += 1
        for failed in report.failed:
            failing = self._entries.get(split_request_id(failed.request.request_id)[0])
            if failing is not None and failing.phase is Phase.RUNNING:
                for request_id in failing.in_engine - {failed.request.request_id}:
                    self.engine.cancel(request_id)  # the job fails as a whole; its other images stop
                failing.fail(failed.code, failed.message, retry=failed.code == "out_of_memory")
        for finished in report.finished:
            job_id, index = split_request_id(finished.request.request_id)
            done = self._entries.get(job_id)
            if done is None or done.phase is not Phase.RUNNING:
                continue
            done.in_engine.discard(finished.request.request_id)
            if not done.in_engine:
                done.phase = Phase.STORING
            done.generate_seconds = max(done.generate_seconds, finished.seconds)
            done.uploads[index] = self._uploader().submit(done.job_id, finished.image, done.spec, index)
        if report.device_seconds:
            metrics.DEVICE_SECONDS.inc(report.device_seconds)
        if report.batch_size:
            metrics.STEP_DURATION.observe(report.step_seconds)
            metrics.BATCH_SIZE.observe(report.batch_size)
            metrics.FRESH_RATIO.set(report.fresh_ratio)
        metrics.RUNNING_REQUESTS.set(len(self.engine.running_ids()))
        if self.config.step_log_len:
            self._step_records.append(
                {
                    "t": f"{time.time():.4f}",
                    "batch_size": report.batch_size,
                    "size": f"{report.size[1]}x{report.size[0]}" if report.size else "",
                    "fresh_ratio": f"{report.fresh_ratio:.3f}",
                    "step_seconds": f"{report.step_seconds:.5f}",
                    # the device seconds of the steps it finished meanwhile, each with its size
                    "device": ";".join(f"{w}x{h}={seconds:.5f}" for (h, w), seconds in report.measured),
                    "finished": len(report.finished),
                    "running": len(self.engine.running_ids()),
                }
            )
        self._collect_uploads()

    def _uploader(self) -> DurableUploader:
        if self._uploads is None:
            raise RuntimeError("the worker was not loaded (BatchWorker.load)")
        return self._uploads

    def _collect_uploads(self) -> None:
        for entry in self._entries.values():
            if entry.phase is not Phase.STORING or entry.upload is not None:
                continue  # images still running, or uploads under way
            try:
                stored = [entry.uploads[i].result() for i in sorted(entry.uploads)]
            except StoreFailed as exc:  # past the storage deadline: RQ's retry path, if retries remain
                entry.fail(exc.code, exc.message, retry=exc.retry)
                continue
            except Exception:
                log.exception("storing the image of job %s failed", entry.job_id)
                entry.fail("storage_error", "the image could not be stored (see the worker log)", retry=True)
                continue
            assert entry.spec is not None  # a job is validated before its images run
            entry.result = build_result(
                entry.spec, stored, entry.generate_seconds, entry.job.enqueued_at, entry.job.started_at, now(), self.name
            )
            entry.phase = Phase.SUCCEEDED
