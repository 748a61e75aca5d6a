#!/usr/bin/env python3
"""Checks the PTX that nvcc kept for the sm_90a kernels: every CUTLASS GEMM entry issues wgmma.

    python .ci/check_wgmma.py PTX_DIR

Reads every *.ptx under PTX_DIR, splits it into .entry functions and, for each entry whose name is a
CUTLASS device kernel (cutlass13device_kernel), counts wgmma.mma_async, TMA loads (cp.async.bulk.tensor) and
ex2.approx. Exits non-zero when there is no such entry, or when one lacks wgmma or TMA: the sign of a
build for plain sm_90 (CUTLASS's arch guards then leave an empty body) or of a mainloop that fell back
to another instruction.
"""

from __future__ import annotations

import pathlib
import re
import sys

from ptxas_report import demangle, short_name  # same folder

ENTRY = re.compile(r"^(?:\.(?:visible|weak)\s+)?\.entry\s+([^\s(]+)", re.M)


def entries(ptx: str) -> list[tuple[str, str]]:
    starts = [(m.start(), m.group(1)) for m in ENTRY.finditer(ptx)]
    return [(name, ptx[pos:(starts[i + 1][0] if i + 1 < len(starts) else len(ptx))])
            for i, (pos, name) in enumerate(starts)]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    files = sorted(pathlib.Path(sys.argv[1]).glob("*.ptx"))
    failures, checked = [], 0
    for path in files:
        kernels = [(name, body) for name, body in entries(path.read_text(errors="replace"))
                   if "cutlass13device_kernel" in name]
        names = demangle([name for name, _ in kernels])
        for name, body in kernels:
            checked += 1
            counts = {op: body.count(op) for op in ("wgmma.mma_async", "cp.async.bulk.tensor", "ex2.approx")}
            print(f"{path.name}: {short_name(names[name])}: " + ", ".join(f"{op} x{n}" for op, n in counts.items()))
            if not counts["wgmma.mma_async"] or not counts["cp.async.bulk.tensor"]:
                failures.append(name)
    if not checked:
        print(f"check_wgmma: no CUTLASS kernel entry in {len(files)} PTX file(s) under {sys.argv[1]}", file=sys.stderr)
        return 1
    print(f"check_wgmma: {checked} CUTLASS kernel(s), {len(failures)} without wgmma or TMA")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
