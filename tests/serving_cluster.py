"""Test helpers: a private Ray cluster on loopback and the dev-cpu Serve app on it, and Ray
started inside the test's own process.

Each cluster is `ray start --head --block` in its own session with every port chosen
free, so parallel runs and other users' clusters on the machine do not collide; stopping
it ends only the processes it started. Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_until(check, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def http_get(url: str, timeout_s: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def kv_blocks_in_use(url: str) -> int:
    """What the served app's /health says its worker's KV cache has handed out."""
    return json.loads(http_get(f"{url}/health"))["kv_blocks_in_use"]


class RayCluster:
    def __init__(self, num_cpus: int = 4):
        (self.gcs_port, self.dashboard_port, self.metrics_port, client, agent, agent_grpc, env_agent, node_mgr,
         obj_mgr) = free_ports(9)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="ntr-ray-", dir="/tmp")  # short: socket paths are length-limited
        self.env = {**os.environ, "RAY_ADDRESS": self.address, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # A loopback-only test cluster: no token, whatever ~/.ray/auth_token an earlier
                    # local `ray.init()` left behind (with it, Ray would turn token auth on).
                    "RAY_AUTH_MODE": "disabled"}
        self.command = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RayCluster":
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or http_get(f"{self.dashboard}/api/version"), 120,
                   "the Ray dashboard")
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start failed: {Path(self.log.name).read_text()[-3000:]}")
        return self

    def run(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """args on this cluster; with check, a non-zero exit raises with what the command printed
        (CalledProcessError alone would not show it)."""
        out = subprocess.run(list(args), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return out

    def metric(self, name: str) -> float | None:
        """The sum of a Prometheus metric's samples on this node's Ray metrics endpoint (None if absent)."""
        text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics") or ""
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") or line.startswith(name + " ")]
        return sum(values) if values else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of this cluster's own session
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def ray_cluster(num_cpus: int = 4):
    cluster = RayCluster(num_cpus)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextmanager
def local_ray(num_cpus: int, num_gpus: int = 0):
    """Ray started in this process (`ray.init(address="local")`) on loopback, in a temp dir of
    its own, whatever RAY_ADDRESS points at; shut down, and the environment as it was, after."""
    import ray

    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback only (RayCluster says why)
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ntr-ray-", dir="/tmp")  # short: socket paths are length-limited
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dev_config(tmp_dir: Path, model_path: Path, **args) -> tuple[Path, int, int]:
    """configs/dev-cpu.yaml on free ports, serving model_path, with args overridden; -> (path, http, grpc)."""
    config = yaml.safe_load((REPO / "configs" / "dev-cpu.yaml").read_text())
    http_port, grpc_port = free_ports(2)
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    config["applications"][0]["args"] |= {"model": str(model_path), **args}
    path = tmp_dir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, http_port, grpc_port


@contextmanager
def served_app(cluster: RayCluster, config: Path, http_port: int, timeout_s: float = 300):
    """`ntr serve --config` on the cluster until the app answers /health; stopped by SIGTERM on
    exit, which must shut Serve down and end it (exit status 0) within a minute."""
    log = open(Path(cluster.temp_dir) / "ntr-serve.log", "w")
    proc = subprocess.Popen([str(BIN / "ntr"), "serve", "--config", str(config)], env=cluster.env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy():
            if proc.poll() is not None:
                raise RuntimeError(f"ntr serve exited: {Path(log.name).read_text()[-3000:]}")
            try:  # before the app is up the proxy answers 404 with plain text
                return json.loads(http_get(f"http://127.0.0.1:{http_port}/health"))["status"] == "ok"
            except (TypeError, ValueError, KeyError):
                return False

        wait_until(healthy, timeout_s, "the Serve app's /health", interval_s=2)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        running = proc.poll() is None
        if running:
            proc.send_signal(signal.SIGTERM)  # `ntr serve` deletes the apps and stops Serve on it
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        # exit status 0: it shut Serve down (SIGTERM's default action leaves -15, and the apps)
        if running and proc.returncode != 0:
            raise RuntimeError(f"ntr serve did not stop cleanly within 60 s of SIGTERM (exit status "
                               f"{proc.returncode}): {Path(log.name).read_text()[-3000:]}")
