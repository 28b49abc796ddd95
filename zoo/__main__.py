"""`python -m zoo list` | `python -m zoo trace NAME [--height H --width W --batch B --depth D]` |
`python -m zoo inspect FILE`."""
from __future__ import annotations

import argparse
import sys

import zoo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped model configs")
    tr = sub.add_parser("trace", help="build a model on the meta device and print its shape trace")
    tr.add_argument("name", help="config name (see `list`) or a YAML path")
    tr.add_argument("--height", type=int, default=None, help="image height in pixels (family default if omitted)")
    tr.add_argument("--width", type=int, default=None, help="image width in pixels")
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--depth", type=int, default=None, help="only modules with at most this many path parts")
    ins = sub.add_parser("inspect", help="describe a checkpoint and name the zoo config that loads it")
    ins.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "inspect":
        from zoo.load import inspect_file

        try:
            print(inspect_file(args.file))
        except (ValueError, OSError) as e:
            print(f"python -m zoo inspect: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "list":
        for name in zoo.list_models():
            print(f"{name:24s} {zoo.get_config(name).__class__.__name__}")
        return 0
    try:
        model = zoo.build(args.name, device="meta")
        size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
        inputs, kwargs = zoo.example_inputs(model, batch=args.batch, device="meta", **size)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"python -m zoo trace: {e}", file=sys.stderr)
        return 2
    t = zoo.trace(model, *inputs, max_depth=args.depth, **kwargs)
    print(t)
    total = sum(p.numel() for p in model.parameters())
    print(f"\n{args.name}: {len(t)} module calls, {total:,} parameters ({total / 1e9:.2f} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
