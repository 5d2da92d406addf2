"""Process-level tests of `sdxl serve`'s durable asynchronous jobs (docs/api.md): the SQLite
store (round trip, restart, cancellation, expiry) and a PostgreSQL fleet of two servers, one
of which is killed mid-job.

    python3 jobs_tests/test_jobs.py [TEST…]

Needs target/debug/sdxl (SDXL_BIN overrides) and, for the fleet test, SDXL_TEST_PG_URL: an
empty PostgreSQL database (jobs_tests/run.sh starts a throwaway cluster and sets it). Server
logs go to target/jobs-tests/. Prints PASS/FAIL per check; exits 1 if any failed."""

import atexit
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    BINARY, LOGS, MODEL, RUN, Checks, Server, body, digest, install_signal_handlers, kill_all, log,
)

CHECKS = Checks()
check = CHECKS.check
TMP = Path(os.environ.get("JOBS_TEST_TMP") or tempfile.mkdtemp(prefix="sdxl-jobs-tests."))
RECORD_KEYS = {"id", "status", "position", "step", "total", "seed", "attempts", "created_at", "started_at",
               "finished_at", "error"}


def data_dir(name):
    path = TMP / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_running_with_progress(job):
    return job["status"] == "running" and job["total"] > 0 and job["step"] >= 1


def compare_pngs(label, got, expected):
    """One check per job: the async bytes equal the synchronous ones."""
    mismatched = {k: (digest(got.get(k)), digest(expected[k])) for k in expected if got.get(k) != expected[k]}
    check(label, not mismatched, jobs=len(expected), mismatched=mismatched or None)


# --- 1 ---------------------------------------------------------------------------------------

def test_sqlite_round_trip():
    """One server on SQLite: /v1/jobs and the Workers AI queueRequest/request_id path both
    deliver the synchronous route's exact PNG for the same body."""
    with Server("sqlite-round-trip", "--data-dir", data_dir("round-trip")) as server:
        # a first job keeps the model busy so that the second is observably queued
        first_body = body(7, size=320, steps=20)
        first = server.submit(first_body).json()
        the_body = body(1234, size=256, steps=12)
        response = server.submit(the_body)
        job = response.json()
        job_id = job["id"]
        check("POST /v1/jobs: 202 with the record's fields",
              response.status == 202 and set(job) == RECORD_KEYS, keys=sorted(job))
        check("POST /v1/jobs: Location header", response.headers.get("location") == f"/v1/jobs/{job_id}",
              location=response.headers.get("location"))
        check("POST /v1/jobs: queued, seed as a string, nothing started",
              job["status"] == "queued" and job["seed"] == "1234" and job["attempts"] == 0
              and job["started_at"] is None and job["finished_at"] is None and job["error"] is None
              and isinstance(job["position"], int),
              status=job["status"], seed=job["seed"], position=job["position"])

        running = server.wait_job(first["id"], lambda j: j["status"] == "running", what="running")
        queued = server.job(job_id)
        check("a job behind a running one: queued at position 0",
              queued["status"] == "queued" and queued["position"] == 0,
              status=queued["status"], position=queued["position"], first=running["status"])
        early = server.image(job_id)
        check("image of a queued job: 409 code 3041", early.status == 409 and early.error_code() == 3041,
              status=early.status, code=early.error_code())
        early = server.image(first["id"])
        check("image of a running job: 409 code 3041", early.status == 409 and early.error_code() == 3041,
              status=early.status, code=early.error_code())
        polled = server.poll_run(job_id)
        check("run-route poll of a queued job: the queued envelope",
              polled.status == 200 and polled.json() == {
                  "result": {"status": "queued", "request_id": job_id}, "success": True, "errors": [],
                  "messages": []},
              answer=polled)
        progress = server.wait_job(first["id"], is_running_with_progress, what="running with progress")
        check("a running job reports step/total progress",
              1 <= progress["step"] <= progress["total"] and progress["position"] is None,
              step=progress["step"], total=progress["total"])

        done = server.wait_job(job_id)
        check("the job ends done with full progress and one attempt",
              done["status"] == "done" and done["step"] == done["total"] == 12 and done["attempts"] == 1
              and done["error"] is None and done["position"] is None
              and done["created_at"] <= done["started_at"] <= done["finished_at"],
              status=done["status"], step=done["step"], total=done["total"], attempts=done["attempts"])
        image = server.image(job_id)
        again = server.image(job_id)
        check("GET /v1/jobs/{id}/image: 200 image/png with x-seed",
              image.status == 200 and image.is_png() and image.headers.get("x-seed") == "1234",
              status=image.status, content_type=image.headers.get("content-type"),
              x_seed=image.headers.get("x-seed"))
        check("the image is the same on a second fetch", again.body == image.body)

        # the Workers AI convention, same body
        queued = server.post(RUN + "?queueRequest=true", the_body)
        envelope = queued.json() if queued.status == 200 else {}
        request_id = (envelope.get("result") or {}).get("request_id")
        check("?queueRequest=true: 200 queued envelope with a request_id",
              queued.status == 200 and envelope == {
                  "result": {"status": "queued", "request_id": request_id}, "success": True, "errors": [],
                  "messages": []} and isinstance(request_id, str) and request_id != job_id,
              answer=queued)
        statuses = set()
        deadline = time.monotonic() + 120
        while True:
            polled = server.poll_run(request_id)
            if polled.status == 200 and polled.is_png():
                break
            if polled.status != 200 or time.monotonic() > deadline:
                break
            statuses.add(polled.json()["result"]["status"])
            time.sleep(0.2)
        check("{request_id} poll: queued/running envelopes, then the PNG",
              polled.status == 200 and polled.is_png() and statuses <= {"queued", "running"},
              seen=sorted(statuses), last=polled)
        via_jobs = server.image(request_id)

        synchronous = server.generate(the_body)
        check("async PNG (/v1/jobs) == synchronous PNG for the same body", image.body == synchronous,
              job=digest(image.body), sync=digest(synchronous))
        check("async PNG (queueRequest poll) == synchronous PNG", polled.body == synchronous,
              poll=digest(polled.body), sync=digest(synchronous))
        check("the queueRequest job's /v1/jobs image == its poll answer", via_jobs.body == polled.body)
        first_png = server.image(first["id"]).body
        check("the first job's PNG == synchronous PNG", first_png == server.generate(first_body))

        # without a seed: the job draws one at submission and keeps it
        unseeded = {k: v for k, v in body(0, size=256, steps=4).items() if k != "seed"}
        job = server.submit(unseeded).json()
        done = server.wait_job(job["id"])
        image = server.image(job["id"])
        check("a job without a seed: the seed drawn at submission is kept and delivered",
              job["seed"].isdigit() and done["seed"] == job["seed"] and image.headers.get("x-seed") == job["seed"],
              submitted=job["seed"], done=done["seed"], x_seed=image.headers.get("x-seed"))
        check("… and its PNG == the synchronous PNG for that seed",
              image.body == server.generate({**unseeded, "seed": int(job["seed"])}))

        # unknown ids and bad bodies
        unknown = "0" * 32
        for what, response in [
            ("GET /v1/jobs/{unknown}", server.get(f"/v1/jobs/{unknown}")),
            ("GET /v1/jobs/{unknown}/image", server.image(unknown)),
            ("DELETE /v1/jobs/{unknown}", server.delete(f"/v1/jobs/{unknown}")),
            ("run-route poll of an unknown request_id", server.poll_run(unknown)),
        ]:
            check(f"{what}: 404 code 7003", response.status == 404 and response.error_code() == 7003,
                  answer=response)
        bad = server.post("/v1/jobs", {"prompt": ""})
        check("POST /v1/jobs with an invalid body: 400 envelope", bad.status == 400 and bad.error_code() is not None,
              answer=bad)
        bad = server.post("/v1/jobs", {"prompt": "x", "width": 100000, "height": 100000})
        check("POST /v1/jobs with an impossible size: 400 envelope",
              bad.status == 400 and bad.error_code() is not None, answer=bad)


# --- 2 ---------------------------------------------------------------------------------------

def test_sqlite_restart():
    """Jobs accepted before a SIGKILL (running one left to its lease) and before a SIGTERM all
    complete on the next server over the same data dir, with the synchronous bytes."""
    directory = data_dir("restart")
    lease = ("--job-lease", 3)
    bodies = {}

    # SIGKILL while a long job runs and four wait
    server = Server("sqlite-restart-1", "--data-dir", directory, *lease)
    try:
        long_body = body(21, size=320, steps=20)
        long_id = server.submit(long_body).json()["id"]
        bodies[long_id] = long_body
        waiting = []
        for seed, steps in [(22, 8), (23, 10), (24, 12), (25, 9)]:
            b = body(seed, size=256, steps=steps)
            job_id = server.submit(b).json()["id"]
            bodies[job_id] = b
            waiting.append(job_id)
        server.wait_job(long_id, is_running_with_progress, what="running with progress")
        server.kill(signal.SIGKILL)
    finally:
        server.kill()
    check("SIGKILL mid-job: server 1 had started only the long job", server.jobs_run() == [long_id],
          ran=server.jobs_run())

    with Server("sqlite-restart-2", "--data-dir", directory, *lease) as server:
        # (the new server may already have claimed the first waiting job: the killed one is
        # not claimable until its lease has run out)
        job = server.job(long_id)
        check("after restart: the killed job is recorded as running, claimed once",
              job is not None and job["status"] == "running" and job["attempts"] == 1,
              status=job and job["status"], attempts=job and job["attempts"])
        states = [(server.job(j) or {}).get("status") for j in waiting]
        check("after restart: the waiting jobs are all still there, none lost",
              all(s in ("queued", "running", "done") for s in states), statuses=states)
        finished = server.wait_all(list(bodies), timeout=240)
        check("all 5 jobs accepted before the SIGKILL complete after the restart",
              all(j["status"] == "done" for j in finished.values()),
              statuses=sorted(j["status"] for j in finished.values()))
        check("the killed job was claimed again (attempts 2) once its lease ran out",
              finished[long_id]["attempts"] == 2 and long_id in server.jobs_run(),
              attempts=finished[long_id]["attempts"])
        check("the waiting jobs ran once", all(finished[j]["attempts"] == 1 for j in waiting),
              attempts=[finished[j]["attempts"] for j in waiting])

        # SIGTERM while a long job runs and two wait
        long2_body = body(31, size=320, steps=20)
        long2_id = server.submit(long2_body).json()["id"]
        bodies[long2_id] = long2_body
        waiting2 = []
        for seed, steps in [(32, 8), (33, 11)]:
            b = body(seed, size=256, steps=steps)
            job_id = server.submit(b).json()["id"]
            bodies[job_id] = b
            waiting2.append(job_id)
        server.wait_job(long2_id, is_running_with_progress, what="running with progress")
        started = time.monotonic()
        code = server.kill(signal.SIGTERM, timeout=90)
        check("SIGTERM: server 2 exits 0", code == 0, code=code, seconds=round(time.monotonic() - started, 1))

    with Server("sqlite-restart-3", "--data-dir", directory, *lease) as server:
        before = server.job(long2_id)
        log(f"after the SIGTERM the long job was {before['status']} (step {before['step']}/{before['total']})")
        finished = server.wait_all([long2_id, *waiting2], timeout=240)
        check("all 3 jobs accepted before the SIGTERM complete after the restart",
              all(j["status"] == "done" for j in finished.values()),
              statuses=sorted(j["status"] for j in finished.values()),
              long_job_attempts=finished[long2_id]["attempts"])

        pngs = {}
        for job_id in bodies:
            first, second = server.image(job_id), server.image(job_id)
            pngs[job_id] = first.body if first.status == 200 and first.body == second.body else None
        expected = {job_id: server.generate(b) for job_id, b in bodies.items()}
        compare_pngs("every job's PNG == the synchronous PNG for its body", pngs, expected)


# --- 3 ---------------------------------------------------------------------------------------

def test_cancellation():
    """DELETE: a queued job never runs, a running one stops and frees the model, a finished one
    is deleted."""
    with Server("cancellation", "--data-dir", data_dir("cancellation")) as server:
        # long enough that it is obvious whether the cancelled generation kept running
        long_id = server.submit(body(41, size=512, steps=20)).json()["id"]
        queued_id = server.submit(body(42, size=256, steps=8)).json()["id"]
        last_id = server.submit(body(43, size=256, steps=8)).json()["id"]
        server.wait_job(long_id, lambda j: j["status"] == "running", what="running")
        positions = (server.job(queued_id)["position"], server.job(last_id)["position"])
        check("behind the running job: queued at positions 0 and 1", positions == (0, 1), positions=positions)

        response = server.delete(f"/v1/jobs/{queued_id}")
        check("DELETE a queued job: 200 cancelled",
              response.status == 200 and response.json() == {"id": queued_id, "status": "cancelled"},
              answer=response)
        gone = [server.get(f"/v1/jobs/{queued_id}"), server.image(queued_id), server.poll_run(queued_id)]
        check("the cancelled queued job is gone: GET, image and run-route poll answer 404 code 7003",
              all(r.status == 404 and r.error_code() == 7003 for r in gone), answers=[r.status for r in gone])
        check("the job behind moved up to position 0", server.job(last_id)["position"] == 0)

        running = server.wait_job(long_id, is_running_with_progress, what="running with progress")
        cancelled_at = time.time()
        response = server.delete(f"/v1/jobs/{long_id}")
        check("DELETE a running job: 200 cancelled",
              response.status == 200 and response.json() == {"id": long_id, "status": "cancelled"},
              answer=response, step=f"{running['step']}/{running['total']}")
        check("the running job is gone: 404", server.get(f"/v1/jobs/{long_id}").status == 404)

        last = server.wait_job(last_id, timeout=120)
        waited = round(last["started_at"] / 1000 - cancelled_at, 2)
        took = round(last["finished_at"] / 1000 - cancelled_at, 2)
        # the cancelled 512×512 generation had well over 10 s left; the next job must not wait for it
        check("the model is free again: the next job starts within 3 s of the cancel and completes",
              last["status"] == "done" and waited <= 3 and took <= 15,
              status=last["status"], started_after_s=waited, done_after_s=took)
        check("the server logged that it stopped the cancelled job",
              f"stopping it job={long_id}" in server.log_text())
        check("the cancelled job stored no result: still 404 afterwards",
              server.get(f"/v1/jobs/{long_id}").status == 404 and server.image(long_id).status == 404)
        check("the cancelled queued job never ran", queued_id not in server.jobs_run(), ran=server.jobs_run())
        ready = server.get("/ready").json()
        check("/ready: idle afterwards", ready.get("busy") is False and ready.get("queue_waiting") == 0,
              ready=ready)

        response = server.delete(f"/v1/jobs/{last_id}")
        check("DELETE a done job: 200 deleted",
              response.status == 200 and response.json() == {"id": last_id, "status": "deleted"},
              answer=response)
        gone = [server.get(f"/v1/jobs/{last_id}"), server.image(last_id), server.delete(f"/v1/jobs/{last_id}")]
        check("the deleted done job: GET, image and DELETE answer 404 code 7003",
              all(r.status == 404 and r.error_code() == 7003 for r in gone),
              answers=[r.status for r in gone])


# --- 4 ---------------------------------------------------------------------------------------

def test_expiry():
    """--job-ttl 2: a finished job and its image are deleted a few seconds after it finished."""
    with Server("expiry", "--data-dir", data_dir("expiry"), "--job-ttl", 2) as server:
        job_id = server.submit(body(51, size=256, steps=8)).json()["id"]
        done = server.wait_job(job_id, interval=0.1)
        image = server.image(job_id)
        check("the job is done and its image there just after it finished",
              done["status"] == "done" and image.status == 200 and image.is_png(),
              status=done["status"], image=image.status)
        deadline = time.monotonic() + 30
        while server.job(job_id) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        gone_after = round(time.time() - done["finished_at"] / 1000, 1)
        answers = [server.get(f"/v1/jobs/{job_id}"), server.image(job_id), server.poll_run(job_id)]
        check("GET, image and run-route poll answer 404 code 7003 once the TTL ran out",
              all(r.status == 404 and r.error_code() == 7003 for r in answers), answers=[r.status for r in answers])
        # TTL 2 s, swept every min(30, ttl) = 2 s: gone between 2 and ~4 s after finishing
        check("expired between 2 and 8 s after it finished", 2 <= gone_after <= 8, seconds=gone_after)
        check("the server logged the deletion", "deleted finished jobs past their TTL" in server.log_text())


# --- 4b --------------------------------------------------------------------------------------

def test_failed_job():
    """A job that fails (here: past --request-timeout) stores its error; the image route and
    the run-route poll answer that error envelope with its HTTP status."""
    with Server("failed-job", "--data-dir", data_dir("failed"), "--request-timeout", 1) as server:
        job_id = server.submit(body(61, size=512, steps=20)).json()["id"]
        job = server.wait_job(job_id, timeout=120)
        error = job.get("error") or {}
        check("the job ends failed with the timeout error recorded",
              job["status"] == "failed" and error.get("code") == 3007 and isinstance(error.get("message"), str)
              and job["finished_at"] is not None,
              status=job["status"], error=error)
        for what, response in [("GET /v1/jobs/{id}/image", server.image(job_id)),
                               ("run-route poll", server.poll_run(job_id))]:
            check(f"{what} of the failed job: 408 with its stored error envelope",
                  response.status == 408 and response.error_code() == 3007
                  and response.json()["errors"][0]["message"] == error.get("message"),
                  answer=response)
        response = server.delete(f"/v1/jobs/{job_id}")
        check("DELETE the failed job: deleted", response.status == 200 and response.json()["status"] == "deleted",
              answer=response)


# --- 4c --------------------------------------------------------------------------------------

def test_poison_job():
    """A job whose server dies each time it runs it (SIGKILL, as an OOM kill or a crash in
    native code) is failed after --job-max-attempts, and the job submitted behind it runs
    first and completes."""
    directory = data_dir("poison")
    flags = ("--data-dir", directory, "--job-lease", 3, "--job-max-attempts", 2)
    server = Server("poison-1", *flags)
    poison = fresh = None
    try:
        poison = server.submit(body(71, size=320, steps=20)).json()["id"]
        fresh = server.submit(body(72, size=256, steps=4)).json()["id"]
        server.wait_job(poison, is_running_with_progress, what="running with progress")
        server.kill(signal.SIGKILL)
    finally:
        server.kill()
    # the next server runs the fresh job first (the poison one backs off), then the poison
    # one again, and dies in it too
    server = Server("poison-2", *flags)
    try:
        done = server.wait_job(fresh, timeout=120)
        check("the job behind it ran first and completed", done["status"] == "done" and done["attempts"] == 1,
              status=done["status"], ran=server.jobs_run())
        server.wait_job(poison, lambda job: job["attempts"] == 2 and is_running_with_progress(job), timeout=120,
                        what="running again")
        server.kill(signal.SIGKILL)
    finally:
        server.kill()
    with Server("poison-3", *flags) as server:
        job = server.wait_job(poison, timeout=120)
        error = job.get("error") or {}
        check("after 2 attempts it is failed with the gave-up code, and not run a third time",
              job["status"] == "failed" and job["attempts"] == 2 and error.get("code") == 3031
              and "gave up after 2 attempts" in error.get("message", "") and poison not in server.jobs_run(),
              status=job["status"], attempts=job["attempts"], error=error)
        check("the give-up is counted on /metrics", server.metric('sdxl_jobs_total{outcome="gave_up"}') == 1)


# --- 4d --------------------------------------------------------------------------------------

def test_auth():
    """With --api-key every job route wants the key; a 64-bit seed survives as a string."""
    with Server("auth", "--data-dir", data_dir("auth"), "--api-key", "secret-key") as server:
        key = {"authorization": "Bearer secret-key"}
        the_body = body(2**64 - 1, size=256, steps=4)
        response = server.request("POST", "/v1/jobs", the_body, headers=key)
        job_id = response.json().get("id") if response.status == 202 else None
        check("POST /v1/jobs with the key: 202, the u64 seed as a string",
              response.status == 202 and response.json()["seed"] == str(2**64 - 1), answer=response)
        refused = [
            server.post("/v1/jobs", the_body),
            server.get(f"/v1/jobs/{job_id}"),
            server.image(job_id),
            server.delete(f"/v1/jobs/{job_id}"),
            server.post(RUN + "?queueRequest=true", the_body),
            server.poll_run(job_id),
        ]
        check("without the key: every job route answers 401 in the envelope",
              all(r.status == 401 and r.error_code() is not None for r in refused),
              answers=[r.status for r in refused])
        deadline = time.monotonic() + 120
        while True:
            job = server.request("GET", f"/v1/jobs/{job_id}", headers=key).json()
            if job["status"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        image = server.request("GET", f"/v1/jobs/{job_id}/image", headers=key)
        check("the job ran and its image (with the key) carries x-seed 2^64-1",
              job["status"] == "done" and image.is_png() and image.headers.get("x-seed") == str(2**64 - 1),
              status=job["status"], x_seed=image.headers.get("x-seed"))


def test_expiry_while_busy():
    """With --job-ttl 2 a finished job is gone a few seconds after finishing even while the
    server is busy running the next (long) job."""
    with Server("expiry-while-busy", "--data-dir", data_dir("expiry-busy"), "--job-ttl", 2) as server:
        short_id = server.submit(body(71, size=256, steps=8)).json()["id"]
        long_id = server.submit(body(72, size=512, steps=20)).json()["id"]
        done = server.wait_job(short_id, interval=0.1)
        deadline = time.monotonic() + 60
        while server.job(short_id) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        gone_after = round(time.time() - done["finished_at"] / 1000, 1)
        long_job = server.job(long_id)
        check("a finished job expires within 8 s although another job is running",
              gone_after <= 8, seconds=gone_after, long_job_meanwhile=long_job["status"])
        server.delete(f"/v1/jobs/{long_id}")


# --- 5 ---------------------------------------------------------------------------------------

def test_postgres_fleet():
    """Two servers on one PostgreSQL store; one is SIGKILLed mid-job; every job completes once,
    with the synchronous bytes, the killed one re-run by the survivor."""
    url = os.environ.get("SDXL_TEST_PG_URL")
    if not url:
        check("SDXL_TEST_PG_URL is set (run jobs_tests/run.sh)", False)
        return
    common = ("--jobs", url, "--job-lease", 3)
    with Server("fleet-a", *common) as a, Server("fleet-b", *common) as b:
        servers = [a, b]
        bodies, owner = {}, {}
        for i in range(20):
            the_body = body(1000 + 7919 * i, size=320, steps=10 + (3 * i) % 11)
            job_id = servers[i % 2].submit(the_body).json()["id"]
            bodies[job_id] = the_body
            owner[job_id] = servers[i % 2].name
        ids = list(bodies)

        # the backlog, as both servers see it (each received 10 of the 20); the gauge is
        # refreshed every 5 s, so wait for one refresh
        seen = {}
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and not all(seen.get(s.name, 0) > 10 for s in servers):
            seen = {s.name: s.metric("sdxl_jobs_queued") or 0 for s in servers}
            time.sleep(0.5)
        check("sdxl_jobs_queued reports the shared backlog on both servers (more than each received)",
              all(v > 10 for v in seen.values()), **seen)
        crossed = [b.job(i) for i in ids[0::2]] + [a.job(i) for i in ids[1::2]]
        check("every job is visible from the server that did not receive it",
              all(j is not None for j in crossed))

        # wait until both are running jobs, then kill B in the first half of one of its jobs
        deadline = time.monotonic() + 180
        while not (a.jobs_run() and len(b.jobs_run()) >= 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        # the backlog again, now that both servers have taken jobs from it (a gauge is at most
        # one 5 s refresh old: a few jobs)
        seen_a, seen_b = a.metric("sdxl_jobs_queued"), b.metric("sdxl_jobs_queued")
        queued_now = sum((a.job(i) or {}).get("status") == "queued" for i in ids)
        check("sdxl_jobs_queued follows the shrinking backlog on both servers",
              None not in (seen_a, seen_b) and all(20 > v >= queued_now and v - queued_now <= 4
                                                   for v in (seen_a, seen_b)),
              a=seen_a, b=seen_b, queued_by_status=queued_now)
        victim = None
        delivered = {}
        while victim is None and time.monotonic() < deadline:
            current = b.jobs_run()[-1] if b.jobs_run() else None
            job = a.job(current) if current else None
            if job and job["status"] == "running" and job["total"] > 0 and 1 <= job["step"] <= job["total"] // 2:
                b.kill(signal.SIGKILL)
                victim = current
                break
            time.sleep(0.1)
        if victim is None:
            raise TimeoutError("never saw server B in the first half of a job")
        ran_a, ran_b = a.jobs_run(), b.jobs_run()
        after_kill = a.job(victim)
        log(f"killed B while it ran {victim} (step {job['step']}/{job['total']}); "
            f"before the kill A had run {len(ran_a)} job(s), B {len(ran_b)}")
        check("jobs were spread over both servers before the kill", len(ran_a) >= 1 and len(ran_b) >= 2,
              a=len(ran_a), b=len(ran_b))
        check("the killed server's job was left running (mid-way)", after_kill["status"] == "running",
              status=after_kill["status"], step=f"{after_kill['step']}/{after_kill['total']}")
        # images delivered before the kill, to compare with what is delivered after
        for job_id in ids:
            response = a.image(job_id)
            if response.status == 200:
                delivered[job_id] = response.body

        finished = a.wait_all(ids, timeout=420)
        check("all 20 jobs complete on the survivor",
              all(j["status"] == "done" for j in finished.values()),
              statuses={s: sum(j["status"] == s for j in finished.values())
                        for s in {j["status"] for j in finished.values()}})
        check("the killed job was re-run by the survivor (attempts >= 2)",
              finished[victim]["attempts"] >= 2 and victim in a.jobs_run(),
              attempts=finished[victim]["attempts"])
        reruns = sorted(j["attempts"] for j in finished.values() if j["attempts"] >= 2)
        check("at least one job has attempts >= 2", len(reruns) >= 1, reruns=reruns)
        runs = {job_id: a.jobs_run().count(job_id) + ran_b.count(job_id) for job_id in ids}
        wrong = {job_id: (runs[job_id], finished[job_id]["attempts"]) for job_id in ids
                 if runs[job_id] != finished[job_id]["attempts"]}
        check("every job ran exactly `attempts` times across both logs (no double claims)", not wrong,
              runs_vs_attempts=wrong or None)
        check("no job ran twice except those whose server died",
              all(runs[job_id] == 1 for job_id in ids if job_id != victim), runs=sum(runs.values()))

        # each image fetched twice from /v1/jobs/{id}/image and once by the run-route poll
        pngs = {}
        inconsistent = []
        for job_id in ids:
            answers = [a.image(job_id), a.image(job_id), a.poll_run(job_id)]
            if not all(r.status == 200 and r.is_png() for r in answers) or len({r.body for r in answers}) != 1:
                inconsistent.append(job_id)
            elif job_id in delivered and delivered[job_id] != answers[0].body:
                inconsistent.append(job_id)
            elif answers[0].headers.get("x-seed") != str(bodies[job_id]["seed"]):
                inconsistent.append(job_id)
            pngs[job_id] = answers[0].body
        check("no image delivered twice with different bytes (2× image, run-route poll, before/after kill)",
              not inconsistent, inconsistent=inconsistent or None, delivered_before_kill=len(delivered))
        drained = wait_for("sdxl_jobs_queued 0", lambda: a.metric("sdxl_jobs_queued") == 0, 12)
        check("sdxl_jobs_queued is 0 once everything ran (within a refresh)", drained is not None)
        expected = {job_id: a.generate(the_body) for job_id, the_body in bodies.items()}
        compare_pngs("every job's PNG == the synchronous PNG for its body (computed on the survivor)",
                     pngs, expected)


# --- store faults, bounds, clocks -------------------------------------------------------------

def test_store_stall():
    """A writer holds SQLite's lock for 15 s (five 3 s leases) while a job runs: the job goes
    on, its lease is renewed once the store answers, and it is done once (attempts 1) with its
    image stored."""
    directory = data_dir("stall")
    with Server("stall", "--data-dir", directory, "--job-lease", 3) as server:
        job_id = server.submit(body(81, size=512, steps=12)).json()["id"]
        server.wait_job(job_id, is_running_with_progress, what="running with progress")
        stalled_at = server.job(job_id)["step"]
        with sqlite3.connect(directory / "jobs.db", timeout=30, isolation_level=None) as db:
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(15)
            db.execute("COMMIT")
        log(f"held the store's write lock for 15 s from step {stalled_at}")
        job = server.wait_job(job_id, timeout=180)
        image = server.image(job_id)
        check("a 15 s store stall: the job is done once, attempts 1, its image stored",
              job["status"] == "done" and job["attempts"] == 1 and image.status == 200 and image.is_png()
              and server.jobs_run() == [job_id],
              status=job["status"], attempts=job["attempts"], runs=len(server.jobs_run()))
        check("the stall was felt: a lease renewal failed and the job went on",
              "cannot renew the lease; the job goes on" in server.log_text())


def test_queue_bound():
    """Past --max-queued-jobs, POST /v1/jobs answers 429 with Retry-After; every accepted job
    completes, and /metrics shows the store's size."""
    with Server("bound", "--data-dir", data_dir("bound"), "--max-queued-jobs", 3) as server:
        answers = [server.post("/v1/jobs", body(90 + i, size=256, steps=6)) for i in range(8)]
        accepted = [r.json()["id"] for r in answers if r.status == 202]
        refused = [r for r in answers if r.status != 202]
        check("past 3 queued jobs the POSTs get 429 + Retry-After, naming the limit",
              3 <= len(accepted) <= 5 and refused
              and all(r.status == 429 and r.headers.get("retry-after") and r.error_code() == 3040
                      and "--max-queued-jobs" in r.body.decode() for r in refused),
              accepted=len(accepted), refused=[(r.status, r.headers.get("retry-after")) for r in refused])
        finished = server.wait_all(accepted, timeout=240)
        check("every accepted job completes", all(j["status"] == "done" for j in finished.values()),
              statuses=sorted(j["status"] for j in finished.values()))
        deadline = time.monotonic() + 15
        stored = server.metric("sdxl_jobs_stored_bytes")
        while not stored and time.monotonic() < deadline:
            time.sleep(0.5)
            stored = server.metric("sdxl_jobs_stored_bytes")
        check("sdxl_jobs_stored_bytes counts the stored requests and images", stored and stored > 1000,
              stored_bytes=stored)


def test_idempotency():
    """The same Idempotency-Key and body twice give one job; another body under it is a 409."""
    with Server("idempotency", "--data-dir", data_dir("idempotency")) as server:
        the_body = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_steps": 4}  # seed drawn
        key = {"idempotency-key": "order-4711"}
        first = server.post("/v1/jobs", the_body, headers=key)
        again = server.post("/v1/jobs", the_body, headers=key)
        queued = server.post(RUN + "?queueRequest=true", the_body, headers=key)
        other = server.post("/v1/jobs", {**the_body, "prompt": "a harbour"}, headers=key)
        ids = {first.json()["id"], again.json()["id"], queued.json()["result"]["request_id"]}
        check("the same key and body give one job, on both submit routes",
              first.status == again.status == 202 and queued.status == 200 and len(ids) == 1,
              statuses=(first.status, again.status, queued.status), ids=len(ids))
        check("another body under the key is a 409", other.status == 409 and other.error_code() == 3042,
              status=other.status)
        server.wait_job(first.json()["id"])
        check("the job ran once", server.jobs_run() == [first.json()["id"]], runs=len(server.jobs_run()))


def postgres_url():
    url = os.environ.get("SDXL_TEST_PG_URL")
    if not url:
        check("SDXL_TEST_PG_URL is set (run jobs_tests/run.sh)", False)
    return url


def postgres(action):
    """Stops or starts the tests' PostgreSQL cluster (commands set by jobs_tests/run.sh)."""
    subprocess.run(os.environ[f"SDXL_TEST_PG_{action.upper()}"], shell=True, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(what, predicate, timeout):
    """Polls `predicate` until true; answers the seconds it took (None on timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError):
            if predicate():
                return time.monotonic() - started
        time.sleep(0.2)
    log(f"not {what} within {timeout} s")
    return None


def test_postgres_outage():
    """PostgreSQL stopped: POST /v1/jobs 503 + Retry-After, /ready 503, /health 200, and the
    job running meanwhile keeps its result; PostgreSQL back: ready again and jobs run, without
    a restart."""
    url = postgres_url()
    if not url:
        return
    with Server("outage", "--jobs", url, "--job-lease", 3) as server:
        running = server.submit(body(101, size=512, steps=12)).json()["id"]
        server.wait_job(running, is_running_with_progress, what="running with progress")
        postgres("stop")
        try:
            not_ready_after = wait_for("not ready", lambda: server.get("/ready").status == 503, 30)
            refused = server.post("/v1/jobs", body(102, size=256, steps=4))
            health = server.get("/health")
            check("PostgreSQL stopped: POST /v1/jobs is a 503 with Retry-After (not 500)",
                  refused.status == 503 and refused.headers.get("retry-after") and refused.error_code() == 3040,
                  status=refused.status, retry_after=refused.headers.get("retry-after"))
            check("PostgreSQL stopped: /ready 503, /health 200",
                  not_ready_after is not None and health.status == 200,
                  not_ready_after_s=not_ready_after and round(not_ready_after, 1), health=health.status)
            time.sleep(5)
        finally:
            postgres("start")
        ready_after = wait_for("ready", lambda: server.get("/ready").status == 200, 60)
        check("PostgreSQL back: /ready 200 again by itself", ready_after is not None,
              ready_after_s=ready_after and round(ready_after, 1))
        job = server.wait_job(running, timeout=180)
        check("the job running through the outage is done once, its image stored",
              job["status"] == "done" and job["attempts"] == 1 and server.image(running).status == 200,
              status=job["status"], attempts=job["attempts"])
        after = server.submit(body(103, size=256, steps=4)).json()["id"]
        check("jobs are accepted and run again", server.wait_job(after, timeout=120)["status"] == "done")


def test_fast_clock_fleet():
    """A fleet server whose clock runs two days fast (faketime) neither expires another's
    fresh result (TTL one day) nor takes over a live lease: leases and expiry use the
    database's clock."""
    url = postgres_url()
    if not url:
        return
    if not shutil.which("faketime"):
        check("faketime is installed (jobs_tests/run.sh installs it)", False)
        return
    common = ("--jobs", url, "--job-lease", 3, "--job-ttl", 86_400)
    with Server("clock-a", *common) as a:
        finished = a.submit(body(111, size=256, steps=4)).json()["id"]
        a.wait_job(finished)
        live = a.submit(body(112, size=512, steps=10)).json()["id"]
        a.wait_job(live, is_running_with_progress, what="running with progress")
        fast = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        with Server("clock-b-fast", *common, prefix=("faketime", "-f", "+2d"), env=fast) as b:
            ahead = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 2 * 86_400))
            check("server B's clock runs two days fast", ahead in b.log_text(), expected_date=ahead)
            # B sweeps expired jobs at start and claims every 250 ms meanwhile
            job = a.wait_job(live, timeout=180)
            check("B did not take over A's live lease: done once, by A",
                  job["status"] == "done" and job["attempts"] == 1 and live not in b.jobs_run()
                  and live in a.jobs_run(),
                  attempts=job["attempts"], ran_on_b=live in b.jobs_run())
            kept = [b.image(finished).status, a.image(finished).status]
            check("B did not expire A's result finished seconds before", kept == [200, 200], statuses=kept)
            mine = b.submit(body(113, size=256, steps=4)).json()
            skew = mine["created_at"] / 1000 - time.time()
            check("B's jobs are stamped by the database's clock", abs(skew) < 60, skew_s=round(skew, 1))
            a.wait_job(mine["id"], timeout=120)


TESTS = [test_sqlite_round_trip, test_sqlite_restart, test_cancellation, test_expiry, test_expiry_while_busy,
         test_failed_job, test_poison_job, test_auth, test_store_stall, test_queue_bound, test_idempotency,
         test_postgres_fleet, test_postgres_outage, test_fast_clock_fleet]


def main(argv):
    install_signal_handlers()
    atexit.register(kill_all)
    names = argv[1:]
    selected = [t for t in TESTS if t.__name__ in names or t.__name__[5:] in names] if names else TESTS
    if not selected or len(selected) < len(names):
        print(f"unknown test; choose from {[t.__name__[5:] for t in TESTS]}", file=sys.stderr)
        return 2
    if not BINARY.exists():
        print(f"{BINARY} is missing: cargo build -p sdxl-cli", file=sys.stderr)
        return 2
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.glob("*.log"):
        if old.name != "postgres.log":
            old.unlink()
    log(f"binary {BINARY}, model {MODEL}, logs in {LOGS}")
    started = time.monotonic()
    timings = []
    try:
        for test in selected:
            CHECKS.test = test.__name__[5:]
            t0 = time.monotonic()
            print(f"--- {CHECKS.test}", flush=True)
            try:
                test()
            except Exception as e:  # noqa: BLE001 - a crash is one failed check, and the next test runs
                traceback.print_exc()
                check("ran to the end", False, error=f"{type(e).__name__}: {e}")
            finally:
                kill_all()
            timings.append((CHECKS.test, time.monotonic() - t0))
    finally:
        kill_all()
        if not os.environ.get("JOBS_TEST_TMP"):
            shutil.rmtree(TMP, ignore_errors=True)
    failed = CHECKS.failed()
    print("--- summary")
    for name, seconds in timings:
        results = [ok for test, _, ok in CHECKS.results if test == name]
        verdict = "PASS" if all(results) else "FAIL"
        print(f"{verdict} {name}: {sum(results)}/{len(results)} checks ({seconds:.0f} s)")
    total = len(CHECKS.results)
    print(f"jobs tests: {total - len(failed)}/{total} checks passed, {len(failed)} failed "
          f"in {time.monotonic() - started:.0f} s; server logs in {LOGS}")
    for test, what in failed:
        print(f"  FAILED {test}: {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
