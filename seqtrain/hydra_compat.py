"""The one private Hydra API seqtrain uses, behind a checked fallback.

seqtrain reads Hydra's command line (overrides, --config-dir, -m, -sc, ...) before Hydra runs,
to refuse bad input in one line. Hydra's own parser is in `hydra._internal`, which may move in a
release; the fallback below declares the same options, and tests/test_hydra.py checks the two
parse alike while Hydra still has its own.
"""

from __future__ import annotations

import argparse

try:
    from hydra._internal.utils import get_args_parser as hydra_args_parser
except ImportError:  # a Hydra that moved it: the fallback declares the same arguments
    hydra_args_parser = None

INFO = ["all", "config", "defaults", "defaults-tree", "plugins", "searchpath"]


def fallback_args_parser() -> argparse.ArgumentParser:
    """Hydra 1.3's command-line options (hydra/_internal/utils.py), without their help texts."""
    parser = argparse.ArgumentParser(add_help=False, description="Hydra")
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--hydra-help", action="store_true")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--package", "-p")
    parser.add_argument("--run", "-r", action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--shell-completion", "-sc", action="store_true")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--experimental-rerun")
    parser.add_argument("--info", "-i", const="all", nargs="?", action="store", choices=INFO)
    return parser


def parse_args(argv: list[str] | None = None, intermixed: bool = False) -> argparse.Namespace:
    """Hydra's reading of the command line (sys.argv[1:] when argv is None); intermixed: the
    overrides may stand on both sides of a flag (`a=1 -m b=2`), which Hydra's own call refuses."""
    parser = hydra_args_parser() if hydra_args_parser is not None else fallback_args_parser()
    return parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
