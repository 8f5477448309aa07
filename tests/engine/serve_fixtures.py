"""A real ``reg2rg-serve --demo`` on loopback in a child process, for the service tests and the bench.

The child's stdout and stderr go to a log file, so tests can read everything the server ever logged
(token and identifier leak checks) and can kill and restart it (fault tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "t0k3n-for-tests-only-5f1c2a9e7b"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class ServerProcess:
    """``python -m reg2rg.engine.service.server --demo`` with a token file, on a free loopback port."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None, token: str = TOKEN) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.token_file = self.workdir / "token"
        self.token_file.write_text(token + "\n", encoding="utf-8")
        self.token = token
        self.log = self.workdir / "server.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HOME=str(self.workdir), XDG_CONFIG_HOME=str(self.workdir / "config"))
        env.pop("REG2RG_SERVER_TOKEN", None)
        cmd = [sys.executable, "-m", "reg2rg.engine.service.server", "--demo", "--device", "cpu", "--port",
               str(self.port), "--token-file", str(self.token_file), *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reg2rg-serve exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"reg2rg-serve did not start in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-draft, as in a crash or a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token or self.token}"})

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")
