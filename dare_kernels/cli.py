"""The ``dare-kernels`` command line (also ``python -m dare_kernels``)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# modules that add subcommands (bench, report, maps, selftest, ...): one line each
_SUBCOMMAND_MODULES: list[str] = [
    "dare_kernels.benchmarking.cli",  # bench, report
    "dare_kernels.selftest",
    "dare_kernels.maps_cli",
]


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"dare_kernels {data['version']}  (torch {data['torch']})")
    print(f"extension: {data['extension']}")
    if data["torch_mismatch"]:
        m = data["torch_mismatch"]
        print(f"  torch mismatch: built against {m['built']}, running {m['running']}: "
              "rebuild with `pip install --no-build-isolation -e .` (or `make setup`)")
    for k, v in data["build"].items():
        print(f"  {k}: {v}")
    print("backends:")
    for name, (ok, why) in data["backends"].items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
    from .tuning import AUTO_EVIDENCE

    for op, row in data["ops"].items():
        print(f"auto order of {op}: " + "; ".join(f"{dev}: {' > '.join(order)}" for dev, order in row["auto"].items()))
        for backend, why in AUTO_EVIDENCE.get(op, {}).items():  # the measurements behind the GPU order
            print(f"  {backend} on a GPU: {why}")
    print("switches (value, where it comes from; see README 'Switches'):")
    for name, row in data["switches"].items():
        print(f"  {name:<36} {row['value'] or '-':<16} {row['source']:<9} {row['scope']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dare-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="which backends are available here, and why not")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)
    # each subcommand below lives in its own module, which defines add_parser(subparsers)
    for module in _SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


# optional dependencies a subcommand may import -> the extra that installs them (pyproject.toml)
_OPTIONAL_DEPENDENCIES = {
    "diffusers": "diffusers", "matplotlib": "diffusers", "transformers": "bench", "tokenizers": "test",
    "pytest": "test", "pytest_benchmark": "bench", "wordfreq": "density", "triton": "triton",
    "accelerate": "test",
}


def missing_dependency_message(command: str, exc: ModuleNotFoundError) -> str | None:
    """The one-line message for a subcommand stopped by a missing optional dependency, or None (not one of ours)."""
    top = (exc.name or "").split(".")[0]
    extra = _OPTIONAL_DEPENDENCIES.get(top)
    if extra is None:
        return None
    package = top.replace("_", "-")
    return (f"dare-kernels {command}: needs {package}, which is not installed here: "
            f"pip install {package}  (or the extra: pip install -e '.[{extra}]')")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        # a missing optional dependency is a set-up fact, not a crash: one line saying what to install
        msg = missing_dependency_message(args.command, exc)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
