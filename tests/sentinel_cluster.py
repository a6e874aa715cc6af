"""A Redis master, a replica and three sentinels as real `redis-server` processes on loopback
ports, for failover tests; every process is stopped at the end."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import redis

from tests.stack_processes import free_port, wait_until

SERVICE = "mymaster"


class SentinelCluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = {"a": free_port(), "b": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _server(self, name: str, *extra: str) -> None:
        folder = self.directory / name
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.ports[name]),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            *extra,
        ]
        self.processes[name] = subprocess.Popen(args, stdout=open(folder / "log", "ab"), stderr=subprocess.STDOUT)
        _wait_answering(self.ports[name], f"redis-server {name}")

    def start(self) -> "SentinelCluster":
        """Servers and sentinels up and answering (the sentinels know the master from their
        config, so clients connect); `wait_ready` waits until a failover could happen."""
        # The first sync without Redis 7's 5 s wait for more replicas (repl-diskless-sync-delay).
        # Only the first master gets it: syncs after a failover keep the default timing.
        self._server("a", "--repl-diskless-sync-delay", "0")
        self._server("b", "--replicaof", "127.0.0.1", str(self.ports["a"]))
        replica = redis.Redis(port=self.ports["b"], socket_timeout=2)
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 20, what="the replica in sync")
        for index, port in enumerate(self.sentinel_ports):
            folder = self.directory / f"sentinel{index}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports['a']} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 2000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.processes[f"sentinel{index}"] = subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"], stdout=open(folder / "log", "ab"), stderr=subprocess.STDOUT
            )
        for port in self.sentinel_ports:
            _wait_answering(port, f"the sentinel on port {port}")
        return self

    def wait_ready(self) -> "SentinelCluster":
        # Ready once every sentinel knows the replica and the other two sentinels.
        def sentinels_ready() -> bool:
            for port in self.sentinel_ports:
                try:
                    state = redis.Redis(port=port, socket_timeout=1).sentinel_master(SERVICE)
                except redis.RedisError:
                    return False
                if int(state.get("num-other-sentinels", 0)) < 2 or int(state.get("num-slaves", 0)) < 1:
                    return False
            return True

        wait_until(sentinels_ready, 30, interval=0.2, what="three sentinels watching the master and replica")
        return self

    def master_port(self) -> int | None:
        """The master's port as the first reachable sentinel reports it."""
        for port in self.sentinel_ports:
            try:
                address = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(SERVICE)
                if address:
                    return int(address[1])
            except redis.RedisError:
                continue
        return None

    def logs(self, chars: int = 1500) -> str:
        """The tail of every process's log, for a failing test's message."""
        parts = []
        for log in sorted(self.directory.glob("*/log")):
            parts.append(f"--- {log.parent.name} ---\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def kill(self, name: str) -> None:
        self.processes[name].kill()  # SIGKILL: no shutdown, no final sync
        self.processes[name].wait(10)

    def restart_as_replica(self, name: str, of_port: int) -> None:
        self._server(name, "--replicaof", "127.0.0.1", str(of_port))

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _wait_answering(port: int, what: str) -> None:
    client = redis.Redis(port=port, socket_timeout=2)
    wait_until(lambda: _pings(client), 10, what=what)


@contextmanager
def sentinel_cluster(directory: Path, wait_ready: bool = True) -> Iterator[SentinelCluster]:
    """`wait_ready=False`: yield as soon as clients can connect, so a test can start its slow
    parts (a worker process) while the sentinels find each other; it calls `wait_ready()`."""
    cluster = SentinelCluster(directory)
    try:
        cluster.start()
        yield cluster.wait_ready() if wait_ready else cluster
    finally:
        cluster.stop()
