"""Fault tests: clients that disconnect mid-generation or while queued, clients that trickle
their headers or body, and SIGTERM while requests run and wait."""

import argparse
import concurrent.futures
import json
import signal
import socket
import time

from common import RUN, Checks, Server, is_envelope

BODY = {"prompt": "faults", "num_steps": 10, "guidance": 0, "seed": 5, "width": 512, "height": 512}


def raw_request(port, body):
    """Sends a complete run request on a raw socket and returns the socket, unanswered."""
    payload = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    s.sendall(head + payload)
    return s


def wait_until(predicate, timeout, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def disconnects(checks, step_ms):
    with Server(step_ms, 4, name="faults-disconnect") as server:
        busy = lambda: server.ready()[1].get("busy") is True  # noqa: E731
        idle = lambda: server.ready()[1].get("busy") is False  # noqa: E731
        waiting = lambda n: lambda: server.ready()[1].get("queue_waiting") == n  # noqa: E731

        running = raw_request(server.port, BODY)
        checks.check("a request starts running", wait_until(busy, 5))
        time.sleep(2.5 * step_ms / 1000)  # mid-generation
        queued = raw_request(server.port, {**BODY, "seed": 6})
        checks.check("a second request waits in the queue", wait_until(waiting(1), 5))
        queued.close()
        started = time.monotonic()
        freed = wait_until(waiting(0), 5)
        checks.check("a queued client that disconnects frees its slot at once", freed,
                     freed_ms=round((time.monotonic() - started) * 1000, 1))
        running.close()
        started = time.monotonic()
        freed = wait_until(idle, 5)
        freed_ms = (time.monotonic() - started) * 1000
        checks.check("a running client that disconnects frees the worker within one step",
                     freed and freed_ms <= step_ms + 100, freed_ms=round(freed_ms, 1), step_ms=step_ms)
        status, _, png = server.post(RUN, {**BODY, "num_steps": 2})
        checks.check("the worker serves the next request", status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n")
        metrics = server.get("/metrics")[1].decode()
        checks.check("both disconnected jobs are counted cancelled", 'sdxl_jobs_total{outcome="cancelled"} 2' in metrics)


def slow_clients(checks, timeout_s):
    extra = ["--header-read-timeout", str(timeout_s), "--body-read-timeout", str(timeout_s)]
    with Server(5, 4, extra=extra, name="faults-slow") as server:
        # many connections trickling their headers, one byte every half second
        trickling = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            trickling.append(s)
        started = time.monotonic()
        health_ms = []
        closed = set()
        while time.monotonic() - started < timeout_s + 3 and len(closed) < len(trickling):
            for i, s in enumerate(trickling):
                if i in closed:
                    continue
                try:
                    s.sendall(b"X")
                    s.settimeout(0.001)
                    if s.recv(1024) == b"":
                        closed.add(i)
                except (BlockingIOError, socket.timeout):
                    pass
                except OSError:
                    closed.add(i)
            t = time.perf_counter()
            server.get("/health")
            health_ms.append((time.perf_counter() - t) * 1000)
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        checks.check("50 clients trickling headers are cut off by the header timeout",
                     len(closed) == len(trickling), closed=len(closed), seconds=round(elapsed, 1), timeout_s=timeout_s)
        checks.check("/health answers while they trickle", max(health_ms) < 100, max_health_ms=round(max(health_ms), 2))
        for s in trickling:
            s.close()

        # a body promised but trickled
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
        s.settimeout(0.5)
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < timeout_s + 5:
            try:
                s.sendall(b" ")
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        s.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        status = head.split(b" ")[1] if head.startswith(b"HTTP/1.1 ") else b"none"
        checks.check("a trickled body is answered 408 with the envelope (code 3007)",
                     status == b"408" and (is_envelope(body, 3007) or b"content-length" in head.lower()),
                     status=status.decode(), seconds=round(time.monotonic() - started, 1))
        checks.check("the server still serves after the slow clients", server.get("/health")[0] == 200)


def sigterm(checks, step_ms):
    capacity = 4
    with Server(step_ms, capacity, name="faults-sigterm") as server:
        def send(seed):
            try:
                return server.post(RUN, {**BODY, "num_steps": 8, "seed": seed}, timeout=60)
            except OSError as e:
                return ("connection error", {}, str(e).encode())

        with concurrent.futures.ThreadPoolExecutor(capacity + 1) as pool:
            futures = [pool.submit(send, seed) for seed in range(capacity + 1)]
            full = wait_until(lambda: server.ready()[1].get("queue_waiting") == capacity, 10)
            checks.check("one request runs and the queue is full before SIGTERM", full)
            time.sleep(2 * step_ms / 1000)
            started = time.monotonic()
            code = server.terminate(signal.SIGTERM, wait=60)
            elapsed = time.monotonic() - started
            answers = [f.result() for f in futures]
        statuses = sorted(a[0] for a in answers if isinstance(a[0], int))
        clean = all(
            (status == 200 and body[:4] == b"\x89PNG") or (status == 503 and is_envelope(body, 3040))
            for status, _, body in answers
        )
        checks.check("every in-flight request completes or gets a clean 503 envelope", clean,
                     statuses=[a[0] for a in answers])
        checks.check("the running request completes", statuses.count(200) == 1)
        checks.check("the process exits 0 after SIGTERM", code == 0, exit_code=code, seconds=round(elapsed, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step-ms", type=int, default=200)
    parser.add_argument("--slow-timeout", type=int, default=2)
    args = parser.parse_args()
    checks = Checks("faults")
    disconnects(checks, args.step_ms)
    slow_clients(checks, args.slow_timeout)
    sigterm(checks, args.step_ms)
    checks.finish()


if __name__ == "__main__":
    main()
