"""Soak: steady load above the server's throughput for a long time (10 minutes by default),
with img2img and invalid requests mixed in, sampling the server's resident memory. After
the warm-up (the first fifth of the run) memory must stay within 10 % of where it settled."""

import argparse
import base64
import statistics
import struct
import threading
import time
import zlib

from common import RUN, Checks, Sampler, Server, wrk


def png(width, height, seed):
    """A small valid RGB PNG (for img2img bodies), made without any imaging library."""
    rows = b"".join(b"\x00" + bytes((x * 7 + y * 3 + seed) % 256 for x in range(width * 3)) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def side_traffic(server, stop, counts):
    """img2img requests (image arrays and base64) and invalid ones, one after another."""
    image = png(64, 64, 1)
    bodies = [
        ({"prompt": "soak img2img", "image": list(image), "strength": 0.5, "num_steps": 2}, {200, 429}),
        ({"prompt": "soak b64", "image_b64": base64.b64encode(image).decode(), "strength": 0.5, "num_steps": 2},
         {200, 429}),
        ({"prompt": "", "num_steps": 2}, {400}),
        (b"{not json", {400}),
        ({"prompt": "x", "width": 100000}, {400}),
    ]
    i = 0
    while not stop.is_set():
        body, expected = bodies[i % len(bodies)]
        status, _, _ = server.post(RUN, body)
        counts["sent"] += 1
        counts["unexpected"] += status not in expected
        i += 1
        stop.wait(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--step-ms", type=int, default=20)
    parser.add_argument("--capacity", type=int, default=4)
    args = parser.parse_args()
    checks = Checks("soak")
    body = {"prompt": "soak", "num_steps": 4, "guidance": 0, "width": 1024, "height": 1024}
    with Server(args.step_ms, args.capacity, name="soak") as server:
        memory = Sampler(server.rss_mb, 1.0)
        memory.start()
        stop, counts = threading.Event(), {"sent": 0, "unexpected": 0}
        side = threading.Thread(target=side_traffic, args=(server, stop, counts), daemon=True)
        side.start()
        started = time.monotonic()
        report = wrk(server.url + RUN, seconds=args.seconds, connections=args.capacity + 2, body=body)
        stop.set()
        side.join()
        samples = memory.stop()
        peak = server.peak_rss_mb()

    warm_up_end = started + args.seconds / 5
    after = [(t - started, mb) for t, mb in samples if t >= warm_up_end]
    window = max(1, len(after) // 10)
    settled = statistics.median(mb for _, mb in after[:window])
    final = statistics.median(mb for _, mb in after[-window:])
    highest = max(mb for _, mb in after)
    codes = {int(k): v for k, v in report["statuses"].items()}
    errors = {k: v for k, v in report["errors"].items() if v}
    checks.check("every request answered 200 or 429, no socket error", set(codes) <= {200, 429} and not errors,
                 requests=report["requests"], status_codes=codes, client_errors=errors)
    checks.check("side traffic (img2img, invalid bodies) answered as expected", counts["unexpected"] == 0,
                 **counts)
    drift = (final - settled) / settled
    checks.check("resident memory at the end within 10 % of where it settled", abs(drift) <= 0.10,
                 settled_mb=round(settled, 1), final_mb=round(final, 1), drift_pct=round(100 * drift, 2),
                 highest_after_warm_up_mb=round(highest, 1), peak_mb=round(peak, 1), seconds=args.seconds)
    checks.check("resident memory never above 10 % over where it settled", highest <= 1.10 * settled,
                 highest_mb=round(highest, 1))
    checks.finish()


if __name__ == "__main__":
    main()
