"""A server shared by two API keys and reachable from browsers, tested as whole processes:
each key's jobs are invisible to the other by every route; one key flooding the queue leaves
room for another; a small request passes while two chunked uploads trickle; cross-origin
and foreign-Host requests are refused while curl, the OpenAI and Cloudflare SDKs (pinned,
unmodified) and the playground's own origin work; the playground's security headers.

Run with the Python that has the pinned SDKs (load_tests/run.sh makes it)."""

import base64
import concurrent.futures
import json
import socket
import subprocess
import threading
import time

import cloudflare
import openai

from common import RUN, Checks, Server, is_envelope

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
KEYS = ["--api-key", ALICE, "--api-key", BOB]
SMALL = {"prompt": "sharing", "num_steps": 1, "guidance": 0, "seed": 1, "width": 256, "height": 256}


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def basic(key):
    return {"authorization": "Basic " + base64.b64encode(f"webui:{key}".encode()).decode()}


def request(server, method, path, headers=None, body=None):
    """(status, headers, body) of one request on a fresh connection."""
    conn = server.connection(30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def tenancy(checks):
    with Server(5, 4, extra=KEYS, name="sharing-tenancy") as server:
        status, _, body = request(server, "POST", "/v1/jobs", bearer(ALICE), SMALL)
        job = json.loads(body)["id"]
        checks.check("a key stores a job (128-bit id)", status == 202 and len(job) == 32, status=status)
        deadline = time.monotonic() + 30
        while json.loads(request(server, "GET", f"/v1/jobs/{job}", bearer(ALICE))[2])["status"] != "done":
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.05)
        unknown = "0" * 32
        for label, (method, path, body) in {
            "get": ("GET", "/v1/jobs/{}", None),
            "image": ("GET", "/v1/jobs/{}/image", None),
            "poll": ("POST", RUN, "poll"),
            "delete": ("DELETE", "/v1/jobs/{}", None),
        }.items():
            answers = []
            for target in (job, unknown):
                payload = {"request_id": target} if body == "poll" else None
                status, _, text = request(server, method, path.format(target), basic(BOB), payload)
                answers.append((status, is_envelope(text, 7003)))
            checks.check(f"another key's {label} is a 404 as for an unknown id",
                         answers[0] == answers[1] == (404, True), answers=answers)
        status, headers, png = request(server, "GET", f"/v1/jobs/{job}/image", basic(ALICE))
        checks.check("the owner reads it (Basic auth)", status == 200 and png[:4] == b"\x89PNG", status=status)
        status, _, _ = request(server, "POST", RUN, {"authorization": f"BEARER {ALICE}"}, {"request_id": job})
        checks.check("and polls it (scheme in any case)", status == 200, status=status)
        status, _, _ = request(server, "DELETE", f"/v1/jobs/{job}", bearer(ALICE))
        checks.check("and deletes it", status == 200, status=status)


def flood(checks):
    # 4 slots, 2 per key; 400 ms jobs, so a burst arrives while the first runs
    with Server(400, 4, extra=KEYS, name="sharing-flood") as server:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            alice = [pool.submit(request, server, "POST", RUN, bearer(ALICE), {**SMALL, "seed": i}) for i in range(9)]
            time.sleep(0.2)
            bob = [pool.submit(request, server, "POST", RUN, bearer(BOB), {**SMALL, "seed": 50 + i}) for i in range(2)]
            alice = [f.result() for f in alice]
            bob = [f.result() for f in bob]
        refused = [a for a in alice if a[0] == 429]
        checks.check("one key flooding a 4-slot queue gets its share (1 running + 2 waiting)",
                     sum(a[0] == 200 for a in alice) == 3 and len(refused) == 6,
                     statuses=sorted(a[0] for a in alice))
        checks.check("its excess gets 429 with Retry-After and the envelope",
                     all(r[1].get("retry-after") == "5" and is_envelope(r[2], 3040) for r in refused))
        checks.check("another key is admitted meanwhile", [b[0] for b in bob] == [200, 200],
                     statuses=[b[0] for b in bob])


def trickle(port, stop):
    """A chunked run request whose body arrives one byte every 100 ms until `stop`."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              "Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n".encode())
    while not stop.is_set():
        try:
            s.sendall(b"1\r\n \r\n")
        except OSError:
            break
        stop.wait(0.1)
    s.close()


def trickling_uploads(checks):
    with Server(5, 4, name="sharing-trickle") as server:
        stop = threading.Event()
        uploads = [threading.Thread(target=trickle, args=(server.port, stop)) for _ in range(2)]
        for upload in uploads:
            upload.start()
        time.sleep(1)
        latencies = []
        for i in range(5):
            started = time.monotonic()
            status, _, _ = server.post(RUN, {**SMALL, "seed": i})
            latencies.append((status, round(time.monotonic() - started, 3)))
        stop.set()
        for upload in uploads:
            upload.join()
        checks.check("small requests are answered within 2 s while two chunked uploads trickle",
                     all(s == 200 and t < 2 for s, t in latencies), answers=latencies)


def origins(checks):
    with Server(5, 4, extra=["--cors-origin", "https://app.example"], name="sharing-origins") as server:
        own = f"http://127.0.0.1:{server.port}"
        text = {"content-type": "text/plain"}
        status, _, body = request(server, "POST", RUN, {"origin": "http://evil.example", **text}, SMALL)
        checks.check("a cross-site text/plain POST is refused (403)", status == 403 and is_envelope(body, 10403),
                     status=status)
        status, _, body = request(server, "POST", "/v1/jobs", {"origin": "null"}, SMALL)
        checks.check("Origin: null is refused", status == 403, status=status)
        status, _, body = request(server, "POST", RUN, {"origin": own, **text}, SMALL)
        checks.check("a browser's JSON body declared text/plain is refused (415)",
                     status == 415 and is_envelope(body, 10415), status=status)
        for method, path in [("GET", "/v1/jobs/x"), ("GET", "/metrics"), ("POST", RUN)]:
            status, _, body = request(server, method, path, {"host": f"rebound.example:{server.port}"}, SMALL)
            checks.check(f"a foreign Host is refused on {method} {path} (421)",
                         status == 421 and is_envelope(body, 10421), status=status)
        status, _, png = request(server, "POST", RUN, {"origin": own}, SMALL)
        checks.check("the playground's own origin works", status == 200 and png[:4] == b"\x89PNG", status=status)
        status, headers, _ = request(server, "POST", RUN, {"origin": "https://app.example"}, SMALL)
        checks.check("an allowed --cors-origin works, with its CORS header",
                     status == 200 and headers.get("access-control-allow-origin") == "https://app.example",
                     status=status)
        curl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{server.url}{RUN}",
                               "-d", json.dumps(SMALL)], capture_output=True, text=True, timeout=30)
        checks.check("curl -d (a form content type, no Origin) works", curl.stdout == "200", status=curl.stdout)
        local = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://localhost:{server.port}/health"], capture_output=True, text=True, timeout=30)
        checks.check("localhost works", local.stdout == "200", status=local.stdout)
        status, headers, _ = request(server, "GET", "/")
        csp = headers.get("content-security-policy", "")
        checks.check("the playground's headers", status == 200 and "frame-ancestors 'none'" in csp
                     and "unsafe-inline" not in csp and headers.get("x-content-type-options") == "nosniff"
                     and headers.get("referrer-policy") == "no-referrer", csp=csp)


def sdks(checks):
    with Server(5, 4, extra=KEYS, name="sharing-sdks") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0)
        result = client.images.generate(prompt="sharing", size="256x256", extra_body={"num_steps": 1, "seed": 3})
        png = base64.b64decode(result.data[0].b64_json)
        checks.check(f"the openai SDK {openai.__version__} works through the checks", png[:4] == b"\x89PNG")
        try:
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
            refused = False
        except openai.AuthenticationError:
            refused = True
        checks.check("and is refused with a wrong key (401)", refused)
        cf = cloudflare.Cloudflare(api_token=BOB, base_url=f"{server.url}/client/v4", max_retries=0)
        raw = cf.ai.with_raw_response.run("@cf/bytedance/stable-diffusion-xl-lightning", account_id="acct",
                                          prompt="sharing", num_steps=1, width=256, height=256)
        checks.check(f"the cloudflare SDK {cloudflare.__version__} works through the checks",
                     raw.http_response.status_code == 200 and raw.http_response.content[:4] == b"\x89PNG")


def main():
    checks = Checks("sharing")
    tenancy(checks)
    flood(checks)
    trickling_uploads(checks)
    origins(checks)
    sdks(checks)
    checks.finish()


if __name__ == "__main__":
    main()
