"""Connection exhaustion: 300 sockets that send nothing, or only the start of the HTTP/2
preface (`PRI * HTTP/2.0\\r\\n`), against a server whose process may open 256 files. Every one
must be closed by the server within 25 s, and `/health` on fresh connections must answer
throughout."""

import socket
import threading
import time

from common import Checks, Sampler, Server

SILENT, HALF_H2 = 200, 100
HEADER_TIMEOUT = 5


def hold(port, payload, sockets, lock):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return  # refused or reset at once: closed, which is allowed
    if payload:
        s.sendall(payload)
    with lock:
        sockets.append((time.monotonic(), s))


def closed_after(opened, s, bound):
    """Seconds until the server closed `s` (EOF or reset), or None past `bound`."""
    s.settimeout(max(0.01, opened + bound - time.monotonic()))
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - opened


def main():
    checks = Checks("connections")
    with Server(5, 4, extra=["--header-read-timeout", str(HEADER_TIMEOUT)], name="connections",
                prefix=["prlimit", "--nofile=256:256", "--"]) as server:
        def health():
            started = time.monotonic()
            status, _ = server.get("/health", timeout=5)
            return status, time.monotonic() - started

        sampler = Sampler(health, 0.1)
        sampler.start()
        sockets, lock = [], threading.Lock()
        threads = [threading.Thread(target=hold, args=(server.port, b"", sockets, lock)) for _ in range(SILENT)]
        threads += [threading.Thread(target=hold, args=(server.port, b"PRI * HTTP/2.0\r\n", sockets, lock))
                    for _ in range(HALF_H2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        waits = [closed_after(opened, s, 25) for opened, s in sockets]
        samples = sampler.stop()
        for _, s in sockets:
            s.close()
        open_past = sum(w is None for w in waits)
        longest = max((w for w in waits if w is not None), default=0)
        checks.check("300 silent or half-HTTP/2 sockets are all closed within 25 s",
                     open_past == 0, held=len(sockets), still_open=open_past, longest_s=round(longest, 2))
        answered = [r for _, r in samples]
        ok = [r for r in answered if r[0] == 200]
        checks.check("/health answers on a fresh connection throughout",
                     len(samples) > 0 and len(ok) == len(answered),
                     samples=len(answered), ok=len(ok), max_ms=round(max((r[1] for r in ok), default=0) * 1000, 1))
        checks.check("the server is still running", server.process.poll() is None)
    checks.finish()


if __name__ == "__main__":
    main()
