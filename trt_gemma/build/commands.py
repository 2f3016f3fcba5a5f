"""CLI subcommands of this package, registered into ``trt-gemma`` by trt_gemma/cli.py."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands (none yet)."""
