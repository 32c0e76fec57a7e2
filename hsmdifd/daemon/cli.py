"""`hsmdifd`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from hsmdifd import __version__
from hsmdifd.daemon.config import Config, ConfigError, api_address, load_config, with_overrides
from hsmdifd.daemon.notify import setup_logging

log = logging.getLogger("hsmdifd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsmdifd",
        description="Run a GGUF language model across the devices you own.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    p.add_argument("--socket", metavar="PATH", help="control socket path")
    p.add_argument("--state-dir", metavar="DIR", help="state directory")
    p.add_argument("--port", type=int, metavar="N", help="peer TCP port (default 9999)")
    p.add_argument("--name", help="this device's name (default: the host name)")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS")
    p.add_argument("--secret-file", metavar="FILE", help="the cluster secret")
    p.add_argument(
        "--peers", metavar="HOST:PORT,...", help="static peers, for networks without multicast"
    )
    p.add_argument("--devices", metavar="FILE", help="a devices.json of static peers")
    p.add_argument("--listen", metavar="ADDRESS", help="peer service listen address")
    p.add_argument("--advertise", metavar="ADDRESS", help="the address peers reach this device on")
    p.add_argument(
        "--http",
        metavar="ADDRESS:PORT",
        help='the OpenAI-compatible HTTP API (default 127.0.0.1:9998); "off" turns it off',
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"hsmdifd {__version__}")
    return p


def resolve_config(args: argparse.Namespace) -> tuple[Config, dict[str, object]]:
    overrides: dict[str, object] = {
        "control_socket": args.socket,
        "state_dir": args.state_dir,
        "network_port": args.port,
        "node_name": args.name,
        "network_mdns": False if args.no_mdns else None,
        "network_peers": tuple(p for p in args.peers.split(",") if p) if args.peers else None,
        "network_listen_address": args.listen,
        "network_advertise_address": args.advertise,
        "cluster_secret_file": args.secret_file,
        "cluster_devices_file": args.devices,
        "api_listen": None if args.http is None else "" if args.http == "off" else args.http,
    }
    config = with_overrides(load_config(args.config), **overrides)
    if not 0 < config.network.port < 65536:
        raise ConfigError(f"--port {config.network.port}: give a port between 1 and 65535")
    if config.api.listen and api_address(config.api.listen) is None:
        raise ConfigError(f"--http {config.api.listen}: give ADDRESS:PORT, or off")
    return config, overrides


def check(config: Config, path: Path | None) -> int:
    """Report every problem with `config` and what it points at: 2 if any, else 0."""
    from hsmdifd.daemon.check import check_config

    source = path or "the built-in defaults"
    problems = check_config(config)
    for problem in problems:
        print(f"hsmdifd: {problem}", file=sys.stderr)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        print(f"hsmdifd: {source}: {count}, each above with its fix", file=sys.stderr)
        return 2
    print(f"{source}: configuration is valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config, overrides = resolve_config(args)
    except ConfigError as e:
        print(f"hsmdifd: {e}", file=sys.stderr)
        return 2 if args.check_config else 1
    if args.check_config:
        return check(config, args.config)
    setup_logging(args.verbose)
    from hsmdifd.daemon.server import serve

    return asyncio.run(serve(config, args.config, overrides))


if __name__ == "__main__":
    sys.exit(main())
