"""The ``ppg`` command. Each subcommand takes ``--config FILE`` and ``key.sub=value`` overrides."""

from __future__ import annotations

import argparse
import sys

from ppg.config import ConfigError, load_config

EXAMPLES = """examples:
  ppg config show
  ppg config show --config examples/greedy.yaml objective.policy_class.type=k_step objective.policy_class.k=2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppg",
        description="Partial Policy Gradients for multi-turn LLM agents on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser(
        "config",
        help="inspect and validate configuration",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser(
        "show",
        help="print the resolved config (defaults <- file <- overrides) as YAML",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(show)
    show.set_defaults(handler=cmd_config_show)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (default: built-in defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. objective.gamma=0.9 rollout.num_workers=2",
    )


def cmd_config_show(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"ppg: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
