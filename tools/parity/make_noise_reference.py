"""Reference draws of torch.randn on a seeded CPU generator, for crates/sdxl-models/tests/noise.rs.

    python tools/parity/make_noise_reference.py crates/sdxl-models/tests/fixtures/noise_reference.json

Torch's float Box-Muller has two CPU kernels: the AVX2 one (avx_mathfun polynomials), which x86-64
builds run on every CPU with AVX2 (AVX-512 ones too), and the generic libm one. Each is drawn in a
child process with ATEN_CPU_CAPABILITY set ("avx2", "default"), so the fixture does not depend on
the machine that made it (which needs AVX2). Below 16 elements both take the same double path.

Per case: all float32 values when there are 16 or fewer, else the first and last 8 and the exact
sum; always a position-weighted checksum of the values' bit patterns
(sum of (i + 1) * bits[i] mod 2^64) that pins every value bit for bit.
"""
import json
import math
import os
import subprocess
import sys

SEEDS = [0, 1, 2, 3, 7, 42, 1234, 31337, 65535, 2**31 - 1, 2**31, 0xDEADBEEF, 2**32 - 1, 2**32,
         2**32 + 5, 2**40 + 123, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
SHAPES = [[1], [5], [15], [16], [17], [31], [4, 8, 6], [3, 7, 11], [1, 4, 128, 128]]
# The generic kernel only matters from 16 elements; a few seeds suffice.
KERNELS = {"vectorized": ("avx2", SEEDS, SHAPES),
           "scalar": ("default", [0, 42, 2**32 - 1, 2**64 - 1], [s for s in SHAPES if math.prod(s) >= 16])}


def case(seed, shape):
    import numpy as np
    import torch

    x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    flat = x.flatten().numpy()
    bits = flat.view(np.uint32).astype(np.uint64)
    weights = np.arange(1, flat.size + 1, dtype=np.uint64)
    values = [float(v) for v in flat]
    out = {"seed": seed, "shape": shape}
    if flat.size <= 16:
        out["values"] = values
    else:
        out["head"], out["tail"] = values[:8], values[-8:]
        out["sum"] = math.fsum(values)
    out["bits_checksum"] = int((bits * weights).sum(dtype=np.uint64))
    return out


def child(kernel):
    import torch

    capability, seeds, shapes = KERNELS[kernel]
    assert torch.backends.cpu.get_cpu_capability().lower() == capability, "machine lacks AVX2"
    meta = {"torch": torch.__version__, "cpu_capability": capability}
    print(json.dumps({"meta": meta, "cases": [case(s, sh) for s in seeds for sh in shapes]}))


def main(path):
    parts = {}
    for kernel, (capability, _, _) in KERNELS.items():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        out = subprocess.run([sys.executable, __file__, "--child", kernel], env=env, check=True,
                             capture_output=True, text=True).stdout
        parts[kernel] = json.loads(out)
    with open(path, "w") as f:
        f.write("{\n")
        for n, (kernel, part) in enumerate(parts.items()):
            f.write(f' "{kernel}": {{"meta": {json.dumps(part["meta"])}, "cases": [\n')
            f.write(",\n".join("  " + json.dumps(c) for c in part["cases"]))
            f.write("\n ]}" + (",\n" if n + 1 < len(parts) else "\n"))
        f.write("}\n")
    print({k: len(p["cases"]) for k, p in parts.items()}, "cases ->", path)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main(sys.argv[1])
