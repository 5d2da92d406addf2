"""Process-level helpers for the durable-job tests: start `sdxl serve` on the tiny test model
(on a free loopback port, its log in target/jobs-tests/NAME.log), talk HTTP to it, poll jobs,
and record PASS/FAIL checks.

Python standard library only."""

import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("SDXL_BIN", ROOT / "target" / "debug" / "sdxl"))
MODEL = Path(os.environ.get("SDXL_TEST_MODEL", ROOT / "crates" / "sdxl-models" / "tests" / "fixtures" / "tiny-sdxl"))
LOGS = Path(os.environ.get("JOBS_TEST_LOGS", ROOT / "target" / "jobs-tests"))
RUN = "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LISTENING = re.compile(rb"sdxl listening on http://127\.0\.0\.1:(\d+)")
RUNNING_JOB = re.compile(r"running a stored job job=([0-9a-f]+)")


def _die_with_parent():
    """In the child before exec: SIGKILL it when this test process dies, however it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return json.loads(self.body)

    def is_png(self):
        return self.headers.get("content-type") == "image/png" and self.body.startswith(PNG_SIGNATURE)

    def error_code(self):
        """The Workers AI error envelope's code, or None if the body is not that envelope."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        if (
            isinstance(value, dict)
            and value.get("success") is False
            and value.get("result") is None
            and isinstance(value.get("errors"), list)
            and len(value["errors"]) == 1
            and isinstance(value["errors"][0].get("message"), str)
        ):
            return value["errors"][0].get("code")
        return None

    def __repr__(self):
        body = self.body[:300] if not self.body.startswith(PNG_SIGNATURE) else f"<png {len(self.body)} bytes>"
        return f"<{self.status} {body!r}>"


def digest(data):
    return hashlib.sha256(data).hexdigest()[:12] if data is not None else None


class Server:
    """`sdxl serve --model tiny-sdxl --port 0 EXTRA…`; stdout and stderr to LOGS/NAME.log."""

    started = []  # every server this process started, for the last-resort cleanup

    def __init__(self, name, *extra, ready_timeout=120, prefix=(), env=None):
        """`prefix`: a command that runs the server (`faketime -f +2d`); `env`: more variables."""
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOGS / f"{name}.log"
        self.args = [
            *prefix, str(BINARY), "serve", "--model", str(MODEL), "--host", "127.0.0.1", "--port", "0",
            *[str(a) for a in extra],
        ]
        # hermetic: no SDXL_* settings (API keys, job store, …) from the caller's environment
        extra_env = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
        env.setdefault("RUST_LOG", "info")
        env.update(extra_env)
        self.log = open(self.log_path, "ab")
        self.log.write(f"=== {' '.join(self.args)}\n".encode())
        self.log.flush()
        self.log_start = self.log.tell()
        self.process = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_die_with_parent,
        )
        Server.started.append(self)
        self.port = None
        deadline = time.monotonic() + ready_timeout
        try:
            while self.port is None:
                match = LISTENING.search(self.log_bytes())
                if match:
                    self.port = int(match.group(1))
                    break
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no start-up line within {ready_timeout} s; see {self.log_path}")
                time.sleep(0.05)
            while True:
                with contextlib.suppress(OSError):
                    if self.get("/ready", timeout=5).status == 200:
                        break
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: /ready not 200 within {ready_timeout} s; see {self.log_path}")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def _check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")

    # --- HTTP -------------------------------------------------------------------------------

    def request(self, method, path, body=None, timeout=30, headers=None):
        data = None
        all_headers = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
            all_headers.setdefault("content-type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            return Response(response.status, response.getheaders(), response.read())
        finally:
            conn.close()

    def get(self, path, timeout=30):
        return self.request("GET", path, timeout=timeout)

    def post(self, path, body, timeout=30, headers=None):
        return self.request("POST", path, body, timeout=timeout, headers=headers)

    def delete(self, path, timeout=30):
        return self.request("DELETE", path, timeout=timeout)

    # --- jobs -------------------------------------------------------------------------------

    def submit(self, body):
        """POST /v1/jobs; answers the 202 response (raises on anything else)."""
        response = self.post("/v1/jobs", body)
        if response.status != 202:
            raise AssertionError(f"{self.name}: POST /v1/jobs answered {response!r}")
        return response

    def job(self, job_id):
        """GET /v1/jobs/{id} as a dict; None for 404."""
        response = self.get(f"/v1/jobs/{job_id}")
        if response.status == 404:
            return None
        if response.status != 200:
            raise AssertionError(f"{self.name}: GET /v1/jobs/{job_id} answered {response!r}")
        return response.json()

    def image(self, job_id):
        return self.get(f"/v1/jobs/{job_id}/image")

    def poll_run(self, job_id):
        """The Workers AI poll: POST {"request_id"} to the run route."""
        return self.post(RUN, {"request_id": job_id})

    def generate(self, body, timeout=600):
        """The synchronous run route's PNG for `body` (raises unless it is a PNG)."""
        response = self.post(RUN, body, timeout=timeout)
        if response.status != 200 or not response.is_png():
            raise AssertionError(f"{self.name}: synchronous run answered {response!r}")
        return response.body

    def wait_job(self, job_id, until=lambda job: job["status"] in ("done", "failed"), timeout=120,
                 interval=0.2, what="finished"):
        """Polls GET /v1/jobs/{id} until `until(job)`; answers the job (raises on timeout)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.job(job_id)
            if last is None:
                raise AssertionError(f"{self.name}: job {job_id} vanished (404) while waiting for it to be {what}")
            if until(last):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: job {job_id} not {what} within {timeout} s; last: {last}")
            self._check_alive()
            time.sleep(interval)

    def wait_all(self, job_ids, timeout=300, interval=0.5):
        """Polls until every job is finished; answers {id: job}."""
        deadline = time.monotonic() + timeout
        pending = list(job_ids)
        finished = {}
        while pending:
            for job_id in list(pending):
                job = self.job(job_id)
                if job is None:
                    raise AssertionError(f"{self.name}: job {job_id} vanished (404)")
                if job["status"] in ("done", "failed"):
                    finished[job_id] = job
                    pending.remove(job_id)
            if not pending:
                break
            if time.monotonic() > deadline:
                states = {i: (self.job(i) or {}).get("status") for i in pending}
                raise TimeoutError(f"{self.name}: {len(pending)} job(s) not finished within {timeout} s: {states}")
            self._check_alive()
            time.sleep(interval)
        return finished

    def metric(self, name):
        """The value of an unlabelled metric on /metrics, or None if absent."""
        response = self.get("/metrics")
        if response.status != 200:
            raise AssertionError(f"{self.name}: /metrics answered {response!r}")
        for line in response.body.decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return float(parts[1])
        return None

    # --- log and process --------------------------------------------------------------------

    def log_bytes(self):
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read()

    def log_text(self):
        return self.log_bytes().decode(errors="replace")

    def jobs_run(self):
        """Job ids in the order this server started running them (its `running a stored job` lines)."""
        return RUNNING_JOB.findall(self.log_text())

    def kill(self, sig=signal.SIGKILL, timeout=60):
        """Sends `sig` (if still running) and waits; answers the exit status (SIGKILL after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def kill_all():
    for server in Server.started:
        with contextlib.suppress(Exception):
            server.kill()


class Checks:
    """Named PASS/FAIL results, printed as they come."""

    def __init__(self):
        self.results = []  # (test, check, passed)
        self.test = "?"

    def check(self, what, passed, **figures):
        self.results.append((self.test, what, bool(passed)))
        mark = "PASS" if passed else "FAIL"
        detail = ", ".join(f"{k}={v}" for k, v in figures.items())
        print(f"[{mark}] {self.test}: {what}" + (f" ({detail})" if detail else ""), flush=True)
        return bool(passed)

    def failed(self):
        return [(t, w) for t, w, ok in self.results if not ok]


def body(seed, size=256, steps=12, prompt="a lighthouse on a cliff"):
    """A Workers AI run body with every generation parameter given (so runs are comparable)."""
    return {
        "prompt": f"{prompt}, #{seed}",
        "width": size,
        "height": size,
        "num_steps": steps,
        "guidance": 7.5,
        "seed": seed,
    }


def install_signal_handlers():
    """SIGTERM / SIGHUP end the run through the normal clean-up (finally blocks, atexit)."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def log(message):
    print(f"      {message}", flush=True)
    sys.stdout.flush()
