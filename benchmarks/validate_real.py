"""Validate the full real LGG set (88 patients): unpack, scan every pair, check the counts, time it.

    python benchmarks/validate_real.py [--dest DIR] [--reuse] [--workers N]

Unpacks ``../shared/data/lgg`` (or ``$BRAINSEG_SHARED_DATA``) with ``unpack.sh DEST all`` into a
temporary folder (removed afterwards) or DEST (kept), runs the same scan as
``brainseg data validate``, prints counts and timings, and exits 1 unless it finds 88 patients and
3,137 slices with no problems (2 when the shared data is missing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from brainseg.data.layout import open_dataset
from brainseg.data.manifest import scan

EXPECTED_PATIENTS = 88
EXPECTED_SLICES = 3137


def shared_lgg_dir() -> Path | None:
    env = os.environ.get("BRAINSEG_SHARED_DATA")
    candidates = [Path(env), Path(env) / "lgg", Path(env) / "data" / "lgg"] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg")
    return next((c for c in candidates if (c / "unpack.sh").is_file()), None)


def run(dest: Path, reuse: bool, workers: int) -> int:
    lgg = shared_lgg_dir()
    if lgg is None:
        print("real LGG data not available: ../shared/data/lgg/unpack.sh missing", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if reuse and (dest / "kaggle_3m").is_dir():
        print(f"reusing {dest / 'kaggle_3m'}")
    else:
        subprocess.run(["bash", str(lgg / "unpack.sh"), str(dest), "all"], check=True)
    t1 = time.perf_counter()
    result = scan(open_dataset(dest), workers=workers)
    t2 = time.perf_counter()
    s = result.summary()
    print(f"root: {s['root']}")
    for inst, c in s["institutions"].items():
        print(f"  {inst}: {c['patients']} patients, {c['slices']} slices")
    print(f"patients: {s['patients']}  slices: {s['slices']}  tumor slices: {s['tumor_slices']}  "
          f"problems: {s['problems']}")
    for p in result.problems[:20]:
        print(f"BAD {p}")
    print(f"unpack {t1 - t0:.1f} s, validate scan {t2 - t1:.1f} s "
          f"({s['slices'] / max(t2 - t1, 1e-9):.0f} slices/s, {workers} workers)")
    ok = s["patients"] == EXPECTED_PATIENTS and s["slices"] == EXPECTED_SLICES and result.ok
    if not ok:
        print(f"FAILED: expected {EXPECTED_PATIENTS} patients and {EXPECTED_SLICES:,} slices "
              "with no problems", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path,
                        help="unpack here and keep it (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip unpacking if DEST/kaggle_3m exists")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    args = parser.parse_args(argv)
    if args.dest:
        args.dest.mkdir(parents=True, exist_ok=True)
        return run(args.dest, args.reuse, args.workers)
    with tempfile.TemporaryDirectory(prefix="brainseg-validate-real-") as tmp:
        return run(Path(tmp), False, args.workers)


if __name__ == "__main__":
    sys.exit(main())
