"""Instructions per loop body in the SASS that ``triton_compile_check.py --sass DIR``
writes, for two builds of the kernels side by side.

Role: without a GPU, the decode kernels' cost per tile can still be compared where
they are issue-bound (Nsight Compute on the H200: 0.4 warp instructions issued per
scheduler and cycle, long-scoreboard stalls first): a loop body's instruction count
is what each warp issues per tile. Loops are found from backward branches (a body is
``[target, branch]``; nested loops are listed each with their own span, outer spans
including inner ones). Variants are matched by the compile check's file names (the
kernel and its flags; the n-th of a name with the n-th), so both directories should
come from the same compile check script. Compile with the GPU host's Triton for its registers and SASS (e.g.
a wheel of that version installed with ``pip install --no-deps --target DIR`` and
``PYTHONPATH=DIR``).

    python scripts/sass_loops.py BEFORE_DIR AFTER_DIR [--match _attend_kernel_bf16]
    python scripts/sass_loops.py DIR --ops          # one build, opcode counts per loop
"""

from __future__ import annotations

import argparse
import collections
import os
import re

_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_KEY = re.compile(r"(_\w+?_kernel)_.*_(\d+)\.sass$")   # kernel, flags, launch index


def parse(path: str) -> list[tuple[int, str]]:
    """(address, instruction text) of every instruction of a ``cuobjdump -sass`` file."""
    out = []
    with open(path) as f:
        for line in f:
            m = _LINE.match(line)
            if m:
                out.append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(text: str) -> str:
    """The opcode without predicate and modifiers (``@!P0 LDG.E.128`` -> ``LDG``)."""
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0].split(".")[0]


def loops(ins: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Spans ``(first, last address)`` of the loop bodies (backward branches), in
    address order."""
    spans = set()
    for addr, text in ins:
        if opcode(text) == "BRA":
            m = re.search(r"0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) <= addr:
                spans.add((int(m.group(1), 16), addr))
    return sorted(spans)


def loop_sizes(path: str) -> list[int]:
    ins = parse(path)
    return [sum(1 for a, _ in ins if lo <= a <= hi) for lo, hi in loops(ins)]


def _files(d: str) -> dict:
    """Files by (name without the launch index, ordinal among those of that name in
    launch order): the same variant in two builds, whatever else each compiled."""
    named = collections.defaultdict(list)
    for f in os.listdir(d):
        m = _KEY.match(f)
        if m:
            named[f[:m.start(2) - 1]].append((int(m.group(2)), f))
    return {(tag, i): f for tag, fs in named.items() for i, (_, f) in enumerate(sorted(fs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="one or two --sass directories")
    ap.add_argument("--match", default="", help="only files whose name contains this")
    ap.add_argument("--ops", action="store_true", help="opcode counts per loop (one dir)")
    a = ap.parse_args()
    if len(a.dirs) == 1:
        for key, f in sorted(_files(a.dirs[0]).items()):
            if a.match not in f:
                continue
            ins = parse(os.path.join(a.dirs[0], f))
            print(f[:-5], len(ins), "instructions")
            for lo, hi in loops(ins):
                body = [t for addr, t in ins if lo <= addr <= hi]
                print(f"  loop {lo:#x}-{hi:#x}: {len(body)}")
                if a.ops:
                    top = collections.Counter(opcode(t) for t in body).most_common(16)
                    print("   ", " ".join(f"{o}:{n}" for o, n in top))
        return
    before, after = _files(a.dirs[0]), _files(a.dirs[1])
    print("variant: instructions per loop body, before -> after (loops > 2 instructions)")
    for key in sorted(set(before) & set(after)):
        if a.match not in after[key]:
            continue
        sb = loop_sizes(os.path.join(a.dirs[0], before[key]))
        sa = loop_sizes(os.path.join(a.dirs[1], after[key]))
        pairs = " ".join(f"{x}->{y}" for x, y in zip(sb, sa) if max(x, y) > 2)
        extra = "" if len(sb) == len(sa) else f"  (loops {len(sb)} -> {len(sa)})"
        print(f"{after[key][:-5]:58s} {pairs}{extra}")


if __name__ == "__main__":
    main()
