"""Compare two sm_90 compile tables of ``bench.perf.compile_check``: registers, stack (spill bytes) and shared
memory per kernel specialisation, matched by kernel, case, flags and warps.

    python -m bench.perf.compile_compare OLD.md NEW.md [--all]

Tables written before the walk and the chunk mode became one kernel name the chunk kernels
``_rf_chunk_*_kernel``; they are matched to the merged kernels with ``RANGES=1`` (the chunk forward to the
forward's PHASE 0, the chunk state kernel to its PHASE 1). Prints one line per changed row (``--all``: every
row), then the rows of NEW that match no row of OLD, and a count.
"""

from __future__ import annotations

import argparse

# old chunk-mode kernel -> (merged kernel, flags it must carry besides RANGES=1)
MERGED = {
    "_rf_chunk_fwd_kernel": ("_rf_fwd_kernel", {"PHASE": "0"}),
    "_rf_chunk_state_kernel": ("_rf_fwd_kernel", {"PHASE": "1"}),
    "_rf_chunk_bwd_dq_kernel": ("_rf_bwd_dq_kernel", {}),
    "_rf_chunk_bwd_dkv_kernel": ("_rf_bwd_dkv_kernel", {}),
    "_rf_chunk_bwd_dstate_kernel": ("_rf_bwd_dstate_kernel", {}),
}


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if not line.startswith("| _"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            name, case, flags, warps, _stages, regs, stack, shared = cells[:8]
            rows.append(
                dict(
                    name=name,
                    case=case,
                    flags=dict(f.split("=", 1) for f in flags.split()),
                    warps=warps,
                    regs=int(regs),
                    stack=int(stack),
                    shared=int(shared),
                )
            )
    return rows


def _matches(old: dict, new: dict) -> bool:
    name, extra = MERGED.get(old["name"], (old["name"], {}))
    ranges = "1" if old["name"] in MERGED else old["flags"].get("RANGES", "0")
    return (
        new["name"] == name
        and new["case"] == old["case"]
        and new["warps"] == old["warps"]
        and new["flags"].get("RANGES", "0") == ranges
        and all(new["flags"].get(k) == v for k, v in {**old["flags"], **extra}.items() if k != "RANGES")
    )


def compare(old_rows: list[dict], new_rows: list[dict], show_all: bool = False) -> list[str]:
    lines, used, changed, missing = [], set(), 0, 0
    for o in old_rows:
        hit = next((i for i, n in enumerate(new_rows) if i not in used and _matches(o, n)), None)
        if hit is None:
            missing += 1
            lines.append(f"- no match in NEW: `{o['name']}` {o['case']}")
            continue
        used.add(hit)
        n = new_rows[hit]
        moved = (n["regs"], n["stack"], n["shared"]) != (o["regs"], o["stack"], o["shared"])
        changed += moved
        if moved or show_all:
            lines.append(
                f"- `{o['name']}` -> `{n['name']}`, {o['case']}: regs {o['regs']} -> {n['regs']}, "
                f"stack {o['stack']} -> {n['stack']}, shared {o['shared']} -> {n['shared']}"
            )
    for i, n in enumerate(new_rows):
        if i not in used:
            lines.append(f"- new in NEW: `{n['name']}` {n['case']} (regs {n['regs']}, stack {n['stack']})")
    lines.append(f"{len(old_rows)} rows in OLD, {len(new_rows)} in NEW, {changed} changed, {missing} without a match.")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--all", action="store_true", help="list unchanged rows too")
    args = ap.parse_args(argv)
    print("\n".join(compare(read_rows(args.old), read_rows(args.new), args.all)))


if __name__ == "__main__":
    main()
