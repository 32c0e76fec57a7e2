"""`hsmdifctl`: the command line for hsmdifd.

Exit codes: 0 ok, 1 the command failed, 2 usage, 3 the daemon is unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from hsmdif import keyfiles
from hsmdif.limits import shorten
from hsmdifctl.arguments import UsageError, build_parser, check_arguments
from hsmdifctl.client import Unreachable, connect, ping, probe, socket_path
from hsmdifctl.commands import cmd_devices, cmd_load, cmd_plan, cmd_status, cmd_unload
from hsmdifctl.generation import cmd_chat, cmd_prompt
from hsmdifctl.session import CommandFailed, Session

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


COMMANDS: dict[str, Callable[[Session, argparse.Namespace], None]] = {
    "status": cmd_status,
    "devices": cmd_devices,
    "load": cmd_load,
    "plan": cmd_plan,
    "unload": cmd_unload,
    "prompt": cmd_prompt,
    "chat": cmd_chat,
}


def write_key_file(new: Callable[[Path], object], out: Path, done: str) -> int:
    """Write a new secret with `new` (mode 0600, never over an existing file) and say
    `done`; no daemon needed."""
    try:
        new(out)
    except (keyfiles.KeyFileError, OSError) as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(done)
    return EXIT_OK


def cluster_secret_written(out: Path) -> str:
    return (
        f"Wrote a new cluster secret to {out} (mode 0600).\n"
        "Copy the same file to every device, keeping it private, for example:\n"
        f"  scp {out} DEVICE:/etc/hsmdif/cluster.secret\n"
        'then set secret_file = "/etc/hsmdif/cluster.secret" in [cluster] of each\n'
        "device's /etc/hsmdif/hsmdifd.toml (or start hsmdifd with --secret-file) and\n"
        "restart hsmdifd. The file must be readable by hsmdifd only:\n"
        "  chown hsmdif: /etc/hsmdif/cluster.secret && chmod 600 /etc/hsmdif/cluster.secret"
    )


def api_key_written(out: Path) -> str:
    return (
        f"Wrote a new HTTP API key to {out} (mode 0600).\n"
        f'Set api_key_file = "{out}" in [api] of hsmdifd.toml, make the file readable by\n'
        f"hsmdifd (chown hsmdif: {out}) and restart hsmdifd. Clients send it as\n"
        "  Authorization: Bearer KEY   (the openai SDK: api_key=KEY)"
    )


def entry() -> None:
    """The `hsmdifctl` program: `main`, then out at once. The interpreter's own teardown
    can wait for ever on gRPC's threads (now and then, after a stream has ended); there
    is nothing left to tidy once the output is flushed."""
    try:
        code = main()
    except SystemExit as e:  # argparse: usage errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        code = code or EXIT_FAILED
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "cluster":
            return write_key_file(
                keyfiles.new_cluster_secret, args.out, cluster_secret_written(args.out)
            )
        if args.command == "api-key":
            return write_key_file(keyfiles.new_api_key, args.out, api_key_written(args.out))
        check_arguments(args)
        return run(args)
    except UsageError as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader of stdout went away (| head): say nothing more, and keep the flush
        # at exit from failing again (the recipe of Python's signal documentation).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nhsmdifctl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: a sentence, never a traceback
        print(
            f"hsmdifctl: unexpected error ({type(e).__name__}: {shorten(str(e), 200)}); "
            "please report it",
            file=sys.stderr,
        )
        return EXIT_FAILED


def run(args: argparse.Namespace) -> int:
    path: Path = socket_path(args.socket)
    try:
        channel, stub = connect(path)
    except Unreachable as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        with channel:
            session = Session(stub=stub, json=bool(args.json), path=path)
            if args.command != "status":
                ping(stub, path)  # a daemon that accepts but does not answer is found now
            COMMANDS[args.command](session, args)
    except Unreachable as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as e:
        print(f"hsmdifctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except grpc.RpcError as e:
        return report_rpc_error(e, path)
    return EXIT_OK


def report_rpc_error(error: grpc.RpcError, path: Path) -> int:
    code = error.code()
    details = error.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        try:
            probe(path)
        except Unreachable:
            print(
                f"hsmdifctl: hsmdifd stopped during the request ({path} is gone)", file=sys.stderr
            )
            return EXIT_UNREACHABLE
    if code == grpc.StatusCode.CANCELLED and not details:
        details = "the request was cancelled (hsmdifd is stopping?)"
    print(f"hsmdifctl: {details or code.name}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
