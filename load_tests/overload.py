"""Overload: ten times the queue capacity of concurrent clients, each sending again as soon as
it is answered. Every request must be answered 200 or 429 (code 3040), none lost or hung; the
queue never holds more than its capacity; /health stays under 100 ms at p99 throughout."""

import argparse
import re
import statistics
import time

from common import RUN, Checks, Sampler, Server, wrk


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--step-ms", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    checks = Checks("overload")
    clients = 10 * args.capacity
    body = {"prompt": "overload", "num_steps": 4, "guidance": 0, "seed": 1, "width": 512, "height": 512}
    with Server(args.step_ms, args.capacity, name="overload") as server:

        def health_ms():
            started = time.perf_counter()
            status, _ = server.get("/health", timeout=5)
            assert status == 200
            return (time.perf_counter() - started) * 1000

        depth = Sampler(lambda: server.ready()[1].get("queue_waiting", 0), 0.02)
        health = Sampler(health_ms, 0.02)
        depth.start()
        health.start()
        started = time.monotonic()
        report = wrk(server.url + RUN, seconds=args.seconds, connections=clients, body=body)
        elapsed = time.monotonic() - started
        depths = [d for _, d in depth.stop()]
        latencies = sorted(ms for _, ms in health.stop())
        metrics = server.get("/metrics")[1].decode()

    codes = {int(k): v for k, v in report["statuses"].items()}
    errors = {k: v for k, v in report["errors"].items() if v}
    checks.check(
        "every request answered 200 or 429, no socket error or timeout",
        sum(codes.values()) == report["requests"] and set(codes) <= {200, 429} and not errors,
        clients=clients, requests=report["requests"], status_codes=codes, client_errors=errors,
        seconds=round(elapsed, 1), p99_ms=report["latency_ms"]["p99"], max_ms=report["latency_ms"]["max"],
    )
    # wrk abandons the requests in flight when its time is up; those jobs end cancelled
    ok_jobs = sum(int(float(v)) for v in re.findall(r'sdxl_jobs_total\{outcome="ok"\} (\S+)', metrics))
    checks.check("each 200 is one finished job (none lost or run twice)",
                 codes.get(200, 0) <= ok_jobs <= codes.get(200, 0) + 1,
                 jobs_ok=ok_jobs, answered_200=codes.get(200, 0))
    checks.check("some requests were shed with 429 (the test overloads)", codes.get(429, 0) > 0)
    checks.check("queue never above its capacity", max(depths, default=0) <= args.capacity,
                 max_waiting=max(depths, default=0), capacity=args.capacity, samples=len(depths))
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("inf")
    checks.check("/health p99 under 100 ms", p99 < 100, p99_ms=round(p99, 2),
                 median_ms=round(statistics.median(latencies), 2) if latencies else None, samples=len(latencies))
    checks.finish()


if __name__ == "__main__":
    main()
