#!/usr/bin/env python3
"""Summarises nvcc's `-Xptxas -v` output (CUDA compile gate log) and fails on register spills.

    python .ci/ptxas_report.py BUILD_LOG [--allow-spills REGEX]

Prints one line per kernel and architecture (registers, stack frame, spill stores / loads, shared
memory) with demangled names, and exits non-zero when a kernel spills, unless "<arch> <demangled name>"
(e.g. "sm_80 void oclear::cuda::...") matches --allow-spills (default: the float64 instantiations, which
are correctness paths, not hot).
Exits non-zero too when the log holds no kernel at all (the gate compiled nothing), and when ptxas reports
that it serialised wgmma instructions (warnings C7510-C7515, "Potential Performance Loss: wgmma..."): a
CUTLASS sm_90a kernel that compiles that way runs its tensor cores one instruction group at a time.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PROPS_HEAD = re.compile(r"Function properties for (\S+)")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
DEFAULT_ALLOW = r"<double(, double)?>"
WGMMA_SERIALISED = re.compile(r"Potential Performance Loss: (wgmma[^']*) in the function '([^']+)'")
# The epilogue types the project defines for its CUTLASS kernels (c++filt cannot demangle those kernel names,
# so they are named by the project's types found in them).
SM90_SOURCES = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda_sm90"
OUR_TYPES = {m for f in SM90_SOURCES.glob("*.cu") for m in re.findall(r"^struct (\w+)", f.read_text(), re.M)}


def short_name(name: str) -> str:
    """A readable name: CUTLASS GEMMs by the project's epilogue types they instantiate."""
    if "cutlass13device_kernel" in name or name.startswith("void cutlass::device_kernel<"):
        found = [t for t in OUR_TYPES if re.search(rf"{len(t)}{t}(?=[A-Z]|$)|::{t}\b", name)]
        return f"cutlass GEMM, epilogue [{', '.join(sorted(found)) or 'CUTLASS only'}]"
    return re.sub(r"^oclear::cuda::\(anonymous namespace\)::", "", name)


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse(lines: list[str]) -> list[dict]:
    kernels: list[dict] = []
    current: dict | None = None
    props_for: str | None = None
    for line in lines:
        if m := ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "smem": 0}
            kernels.append(current)
            props_for = None
        elif m := PROPS_HEAD.search(line):
            props_for = m.group(1)
        elif (m := PROPS.search(line)) and current is not None and props_for == current["mangled"]:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif (m := USED.search(line)) and current is not None and current["registers"] is None:
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--allow-spills", default=DEFAULT_ALLOW, help="regex on demangled names (default: %(default)s)")
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        lines = f.read().splitlines()
    kernels = parse(lines)
    serialised = [(m.group(1), m.group(2)) for line in lines if (m := WGMMA_SERIALISED.search(line))]
    if not kernels:
        print(f"ptxas report: no 'Compiling entry function' lines in {args.log}: nothing was compiled", file=sys.stderr)
        return 1
    names = demangle(sorted({k["mangled"] for k in kernels} | {fn for _, fn in serialised}))
    allow = re.compile(args.allow_spills)
    failures = []
    print(f"{'arch':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  kernel")
    for k in sorted(kernels, key=lambda k: (names[k["mangled"]], k["arch"])):
        name = names[k["mangled"]]
        short = short_name(name)
        spills = k["spill_stores"] + k["spill_loads"]
        flag = ""
        allowed = allow.search(f"{k['arch']} {name}")
        if spills:
            flag = "  (spills allowed by --allow-spills)" if allowed else "  <-- SPILLS"
            if not allowed:
                failures.append(f"{k['arch']} {short}")
        print(f"{k['arch']:<7} {k['registers'] or 0:>4} {k['stack']:>5} {k['spill_stores']:>5}/{k['spill_loads']:<5} "
              f"{k['smem']:>6}  {short[:150]}{flag}")
    print(f"ptxas report: {len(kernels)} kernel compilations, {len(failures)} with spills outside the allow-list")
    for f in failures:
        print(f"  spills: {f}", file=sys.stderr)
    for why, fn in serialised:
        print(f"  serialised wgmma: {short_name(names[fn])}: {why}", file=sys.stderr)
    return 1 if failures or serialised else 0


if __name__ == "__main__":
    sys.exit(main())
