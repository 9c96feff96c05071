"""`python -m randlift_dist.data write|verify`: convert a `.npz` into a shard directory, or check one.

    python -m randlift_dist.data write --npz data.npz --out DIR [--n-test N --seed S] [--classes C]
    python -m randlift_dist.data verify DIR

Exit status 0, or 2 with one line naming the file and what is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .files import holdout_split, read_arrays
from .shards import SHARD_BYTES, DataError, ShardSource, read_index, verify_part, write_shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m randlift_dist.data",
                                 description="Write or check a shard directory (data.kind=shards).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="convert a .npz (x, y, optional x_test, y_test) into shards")
    w.add_argument("--npz", required=True, help="the .npz (or .pt) file")
    w.add_argument("--out", required=True, help="a new directory")
    w.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 2**20, help="target MB per input shard")
    w.add_argument("--n-test", type=int, default=0,
                   help="without x_test in the file: rows held out for the test split (as data.kind=npz does)")
    w.add_argument("--seed", type=int, default=0, help="seed of that held-out split (data.seed of the npz kind)")
    w.add_argument("--classes", type=int, default=None, help="class count to record (classification labels)")
    v = sub.add_parser("verify", help="hash every shard against the index")
    v.add_argument("dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "verify":
            bad = []
            for split in read_index(Path(args.dir))["splits"]:
                bad += [p for p in (verify_part(f) for f in ShardSource(args.dir, split).files()) if p]
            for line in bad:
                print(f"randlift_dist.data: {line}", file=sys.stderr)
            print(f"{args.dir}: {'damaged' if bad else 'intact'}")
            return 2 if bad else 0
        arrays = read_arrays(Path(args.npz), "--npz")
        x, y = arrays["x"], arrays["y"]
        xt, yt = arrays.get("x_test"), arrays.get("y_test")
        if xt is None and args.n_test:
            (x, y), (xt, yt) = holdout_split(x, y, args.n_test, args.seed)
        out = write_shards(args.out, x, y, xt, yt, classes=args.classes, shard_bytes=int(args.shard_mb * 2**20))
    except DataError as e:
        print(f"randlift_dist.data: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{out}: {read_index(out)['splits']['train']['rows']} training rows written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
