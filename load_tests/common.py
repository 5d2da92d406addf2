"""Shared by the load and fault scripts: start `sdxl serve` with the test backend on a free
loopback port, talk HTTP to it, read its memory, and record results.

Everything here uses the Python standard library only; `wrk` (Debian's package) is the load
generator."""

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("SDXL_BIN", ROOT / "target" / "release" / "sdxl"))
RUN = "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"
RESULTS = Path(os.environ.get("LOAD_RESULTS", ROOT / "target" / "load-results"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sdxl serve --test-backend-step-ms STEP_MS` on 127.0.0.1, stderr to a log file."""

    def __init__(self, step_ms, queue_capacity=4, extra=(), name="server", prefix=()):
        """`prefix`: a command to run the server under (e.g. `prlimit --nofile=256:256`)."""
        self.port = free_port()
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.log_path = RESULTS / f"{name}.log"
        # a job store of its own: stored jobs must not outlive the test or reach another server
        self.data_dir = RESULTS / f"{name}-data"
        shutil.rmtree(self.data_dir, ignore_errors=True)
        args = [
            *prefix, str(BINARY), "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--test-backend-step-ms", str(step_ms), "--queue-capacity", str(queue_capacity),
            *extra,
        ]
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.capacity = queue_capacity
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError):
                if self.get("/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not answer /health within 30 s")
            time.sleep(0.05)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def connection(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path, timeout=10):
        conn = self.connection(timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, path, body, timeout=60, headers=None):
        """POSTs `body` (bytes, or an object sent as JSON); returns (status, headers, bytes)."""
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        conn = self.connection(timeout)
        try:
            conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def ready(self):
        status, body = self.get("/ready")
        return status, (json.loads(body) if body else {})

    def rss_mb(self):
        return proc_status_mb(self.process.pid, "VmRSS")

    def peak_rss_mb(self):
        return proc_status_mb(self.process.pid, "VmHWM")

    def terminate(self, sig=signal.SIGTERM, wait=60):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=wait)
        finally:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def proc_status_mb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def is_envelope(body, code=None):
    """Whether `body` is the Workers AI error envelope (with error `code`, when given)."""
    try:
        value = json.loads(body)
    except ValueError:
        return False
    ok = (
        isinstance(value, dict)
        and value.get("success") is False
        and value.get("result") is None
        and isinstance(value.get("errors"), list)
        and len(value["errors"]) == 1
        and isinstance(value["errors"][0].get("message"), str)
    )
    return ok and (code is None or value["errors"][0].get("code") == code)


class Sampler(threading.Thread):
    """Calls `probe()` every `interval` seconds until stopped; keeps the results."""

    def __init__(self, probe, interval):
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.samples = []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), self.probe()))
            self.stopped.wait(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()
        return self.samples


def wrk(url, *, seconds, connections, body, timeout_s=60):
    """Runs wrk for `seconds` with `connections` connections, each POSTing `body` again as
    soon as it is answered; returns the summary that post.lua prints."""
    args = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--timeout", f"{timeout_s}s",
            "-s", str(Path(__file__).parent / "post.lua"), url]
    env = {**os.environ, "WRK_BODY": json.dumps(body)}
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


class Checks:
    """Collects named pass/fail results with their figures; prints them and writes JSON."""

    def __init__(self, name):
        self.name, self.results = name, []

    def check(self, what, passed, **figures):
        self.results.append({"check": what, "passed": bool(passed), **figures})
        mark = "PASS" if passed else "FAIL"
        detail = ", ".join(f"{k}={v}" for k, v in figures.items())
        print(f"[{mark}] {self.name}: {what}" + (f" ({detail})" if detail else ""), flush=True)

    def finish(self):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{self.name}.json").write_text(json.dumps(self.results, indent=2))
        failed = [r["check"] for r in self.results if not r["passed"]]
        if failed:
            print(f"{self.name}: {len(failed)} check(s) failed", file=sys.stderr)
            sys.exit(1)
