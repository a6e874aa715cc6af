"""The two result files of bench/engine_bench.py (engine_<card>.json, caching_<card>.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bench.summary import caching_summary, engine_summary

log = logging.getLogger("bench")


class Results:
    """Both JSON files, rewritten after every change so a cut-off run still leaves its rows."""

    def __init__(self, out_dir: Path, card: str, meta: dict, parts: tuple[str, ...], keep_row=None) -> None:
        """`keep_row(which, row)`: with it, start from the files already there (a run split over
        several device calls) and keep the rows it accepts; without it, start empty. `runs`
        lists every call that wrote a file, with its parts and configuration."""
        self.engine_path = out_dir / f"engine_{card}.json"
        self.caching_path = out_dir / f"caching_{card}.json"
        this_run = dict(started=meta["started"], parts=list(parts), config=meta["config"])
        self.engine = dict(meta, rows=[], summary={}, runs=[this_run])
        self.caching = dict(meta, rows=[], summary={}, runs=[this_run])
        if keep_row is not None:
            for which, path in (("engine", self.engine_path), ("caching", self.caching_path)):
                if path.exists():
                    old = json.loads(path.read_text())
                    rows = [r for r in old.get("rows", []) if keep_row(which, r)]
                    runs = old.get("runs", []) + [this_run]
                    setattr(self, which, dict(old, rows=rows, summary={}, runs=runs))
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, which: str, item: dict) -> None:
        getattr(self, which)["rows"].append(item)
        log.info("%s row: %s", which, json.dumps(item))
        self.save()

    def note(self, key: str, value, which: str = "engine") -> None:
        getattr(self, which)[key] = value
        self.save()

    def save(self) -> None:
        self.engine["summary"] = engine_summary(self.engine)
        self.caching["summary"] = caching_summary(self.caching)
        write_json(self.engine_path, self.engine)
        write_json(self.caching_path, self.caching)


def write_json(path: Path, data: dict) -> None:
    """The one format of the result files, written whole (a cut-off write leaves the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def note_in_engine_file(path: Path, key: str, value) -> None:
    """Set `key` in an existing engine_<card>.json and recompute its summary (the probes and the
    quality runs note their numbers there)."""
    data = json.loads(path.read_text())
    data[key] = value
    write_engine_file(path, data)


def write_engine_file(path: Path, data: dict) -> None:
    """An engine_<card>.json with its summary recomputed from what it holds."""
    data["summary"] = engine_summary(data)
    write_json(path, data)
