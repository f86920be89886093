"""Convert a dataset between formats, or check a tree of any format.

Formats: native (ours: OPV2V layout + sidecars), opv2v (OPV2V / V2XSet as OpenCOOD reads them),
kitti (KITTI object tree, one frame per vehicle view), mmdet3d (a KITTI tree plus mmdet3d 1.4 info
files), nuscenes (``.pcd.bin`` sweeps; source only). Conversions are resumable: run the same command
again after an interruption and the frames already complete are skipped.

Examples:
    python tools/convert_dataset.py --src data/sim --src-format native --dst data/sim_kitti --dst-format kitti
    python tools/convert_dataset.py --src data/sim --dst data/sim_mm --dst-format mmdet3d --kitti-view fused
    python tools/convert_dataset.py --check data/sim_kitti

Exit codes: 0 done (or no problem found), 1 ``--check`` found problems, 2 bad arguments or a
conversion that stopped on bad input (the message names the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets.convert import FORMATS, KITTI_VIEWS, WRITABLE_FORMATS, check_tree, convert, detect_format
from datasets.native import PCD_ENCODINGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="source tree")
    parser.add_argument("--src-format", choices=FORMATS, help="source format (default: detected from the files)")
    parser.add_argument("--dst", type=Path, help="destination folder (created; resumed if a conversion stopped)")
    parser.add_argument("--dst-format", choices=WRITABLE_FORMATS, help="destination format")
    parser.add_argument(
        "--kitti-view",
        choices=KITTI_VIEWS,
        default="cav",
        help="native/opv2v -> kitti/mmdet3d: one KITTI frame per cav view, or per frame fused at the ego",
    )
    parser.add_argument(
        "--pcd-encoding", choices=PCD_ENCODINGS, default="binary_compressed", help="PCD data of native/opv2v output"
    )
    parser.add_argument("--check", type=Path, metavar="DIR", help="validate a tree and list every problem")
    parser.add_argument("--format", choices=FORMATS, help="with --check: the tree's format (default: detected)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.check is not None:
        if args.src or args.dst:
            parser.error("--check takes no --src or --dst")
    else:
        if args.src is None or args.dst is None or args.dst_format is None:
            parser.error("give --src, --dst and --dst-format (or --check DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check is not None:
        problems = check_tree(args.check, args.format)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) in {args.check}", file=sys.stderr if problems else sys.stdout)
        return 1 if problems else 0
    try:
        src_format = args.src_format or detect_format(args.src)
        summary = convert(
            args.src,
            src_format,
            args.dst,
            args.dst_format,
            kitti_view=args.kitti_view,
            pcd_encoding=args.pcd_encoding,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.text())
    print(f"-> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
