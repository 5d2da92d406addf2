"""Hostile input: oversized bodies, huge and deeply nested arrays, invalid UTF-8, bad base64,
decompression bombs, masks that do not fit. Each must get a 4xx with the error envelope,
the server must keep serving, and its peak resident memory stays bounded."""

import base64
import concurrent.futures
import json
import socket
import struct
import zlib

from common import RUN, Checks, Server, is_envelope
from soak import png

MB = 1024 * 1024


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_header_only(side):
    """A PNG whose header declares side × side pixels, with one empty data chunk."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


def bomb_zeros(side):
    """A complete, valid 16-bit RGBA PNG of side × side black pixels: a few hundred KB that
    decode to side² × 8 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side * 8)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def send_raw(port, body, content_type="application/json"):
    """POSTs `body` on a raw socket, tolerating a server that answers and closes before the
    whole body is sent; returns (status, response body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = (f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        s.sendall(head)
        view = memoryview(body)
        for start in range(0, len(body), MB):
            s.sendall(view[start:start + MB])
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else None
    if b"transfer-encoding: chunked" in head.lower():
        rest = dechunk(rest)
    return status, rest


def dechunk(data):
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def cases():
    image = png(64, 64, 1)
    array_of = lambda n, v: ("[" + ",".join([v] * n) + "]").encode()  # noqa: E731
    return [
        ("50 MB of junk (not JSON)", b"x" * (50 * MB), 400),
        ("50 MB prompt in valid JSON", b'{"prompt":"' + b"a" * (50 * MB) + b'"}', 400),
        ("body over the 128 MiB limit", b'{"prompt":"' + b"a" * (129 * MB) + b'"}', 413),
        ("10-million-element image array", b'{"prompt":"x","image":' + array_of(10_000_000, "0") + b"}", 400),
        ("10-million-element image array of out-of-range bytes",
         b'{"prompt":"x","image":' + array_of(10_000_000, "999") + b"}", 400),
        ("image array nested 100000 deep", b'{"prompt":"x","image":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        ("unknown field nested 100000 deep",
         b'{"prompt":"x","extra":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}", 400),
        ("invalid UTF-8 in the prompt", b'{"prompt":"\xff\xfe\xfd"}', 400),
        ("base64 with junk characters", json.dumps({"prompt": "x", "image_b64": "data:image/png;base64,@@##!!"}).encode(), 400),
        ("base64 of bytes that are no image",
         json.dumps({"prompt": "x", "image_b64": base64.b64encode(b"\x00" * 1000).decode()}).encode(), 400),
        ("PNG declaring 100000x100000 pixels",
         json.dumps({"prompt": "x", "image_b64": base64.b64encode(bomb_header_only(100_000)).decode()}).encode(), 400),
        ("valid 8192x8192 16-bit RGBA PNG (512 MiB decoded)",
         json.dumps({"prompt": "x", "image_b64": base64.b64encode(bomb_zeros(8192)).decode()}).encode(), 400),
        ("truncated PNG", json.dumps({"prompt": "x", "image": list(image[: len(image) // 2])}).encode(), 400),
        ("mask of another size than the image",
         json.dumps({"prompt": "x", "image": list(image), "mask": list(png(32, 64, 2))}).encode(), 400),
        ("width far out of range", json.dumps({"prompt": "x", "width": 1e308}).encode(), 400),
        ("num_steps as a string", json.dumps({"prompt": "x", "num_steps": "4"}).encode(), 400),
        ("JSON array instead of an object", b"[1,2,3]", 400),
        ("empty body", b"", 400),
    ]


def main():
    checks = Checks("hostile")
    with Server(5, 4, name="hostile") as server:
        status, _, _ = server.post(RUN, {"prompt": "warm-up", "num_steps": 1})
        baseline = server.peak_rss_mb()
        for name, body, expected in cases():
            status, answer = send_raw(server.port, body)
            alive = server.get("/health")[0] == 200
            checks.check(f"{name}: {expected} with the envelope", status == expected and is_envelope(answer) and alive,
                         status=status, body_mb=round(len(body) / MB, 2),
                         message=json.loads(answer)["errors"][0]["message"][:100] if is_envelope(answer) else None,
                         peak_rss_mb=round(server.peak_rss_mb(), 1))
        # many large bodies at once: the shared body budget (512 MiB) makes them take turns
        junk = b'{"prompt":"' + b"a" * (100 * MB) + b'"}'
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: send_raw(server.port, junk), range(12)))
        statuses = sorted(status for status, _ in answers)
        checks.check("12 concurrent 100 MB bodies: each 400 or 429 with the envelope",
                     all(status in (400, 429) and is_envelope(body) for status, body in answers),
                     statuses=statuses, peak_rss_mb=round(server.peak_rss_mb(), 1))
        status, _, png_bytes = server.post(RUN, {"prompt": "after", "num_steps": 1})
        checks.check("the server still generates afterwards", status == 200 and png_bytes[:4] == b"\x89PNG")
        peak = server.peak_rss_mb()
        checks.check("peak resident memory stays bounded (under 1 GiB)", peak < 1024,
                     baseline_mb=round(baseline, 1), peak_mb=round(peak, 1))
    checks.finish()


if __name__ == "__main__":
    main()
