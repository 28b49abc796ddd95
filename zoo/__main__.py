"""`python -m zoo list` | `python -m zoo trace NAME [--height H --width W --batch B --txt-len L --depth D]` |
`python -m zoo inspect FILE`."""
from __future__ import annotations

import argparse
import inspect
import sys

import torch

import zoo


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into `error: argument --x: ...`, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def header(name: str, model: torch.nn.Module, size: dict[str, int], batch: int) -> str:
    """One line saying what is traced: resolution, text length, batch, device, dtype (family defaults resolved)."""
    defaults = {k: p.default for k, p in inspect.signature(model.example_inputs).parameters.items()
                if p.default is not inspect.Parameter.empty}
    height, width = size.get("height", defaults.get("height")), size.get("width", defaults.get("width"))
    if "height" in defaults or "width" in defaults:
        resolution = f"{height}x{width} px" if height and width else "the family's default resolution"
    else:
        resolution = "no image"
    if "txt_len" in defaults:
        text = f"text length {size.get('txt_len', defaults['txt_len']) or 'the model maximum'}"
    else:
        text = "no text"
    weight = next(model.parameters(), torch.empty(0))
    return (f"{name} ({type(model).__name__}): {resolution}, {text}, batch {batch}, "
            f"device {weight.device.type}, dtype {str(weight.dtype).removeprefix('torch.')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped model configs")
    tr = sub.add_parser("trace", help="build a model on the meta device and print its shape trace")
    tr.add_argument("name", help="config name (see `list`) or a YAML path")
    tr.add_argument("--height", type=positive_int, default=None,
                    help="image height in pixels (family default if omitted)")
    tr.add_argument("--width", type=positive_int, default=None, help="image width in pixels")
    tr.add_argument("--batch", type=positive_int, default=1)
    tr.add_argument("--txt-len", type=positive_int, default=None, help="text tokens (family default if omitted)")
    tr.add_argument("--depth", type=positive_int, default=None, help="only modules with at most this many path parts")
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
        size = {k: v for k, v in (("height", args.height), ("width", args.width), ("txt_len", args.txt_len))
                if v is not None}
        inputs, kwargs = zoo.example_inputs(model, batch=args.batch, device="meta", **size)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"python -m zoo trace: {e}", file=sys.stderr)
        return 2
    t = zoo.trace(model, *inputs, max_depth=args.depth, **kwargs)
    print(header(args.name, model, size, args.batch))
    print(t)
    total = sum(p.numel() for p in model.parameters())
    print(f"\n{args.name}: {len(t)} module calls, {total:,} parameters ({total / 1e9:.2f} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
