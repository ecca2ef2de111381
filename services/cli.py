"""The `splitserve` command: up, serve ROLE, generate, bench."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from services.common.logging import configure_logging
from services.common.settings import ClusterSettings, Endpoint, SettingsError, load_settings

# role -> "module:function"; each function is serve(settings, index) and blocks until SIGTERM.
SERVE_TARGETS = {
    "kvstore": "kvstore.server:serve",
    "prefill": "services.prefill.server:serve",
    "decode": "services.decode.server:serve",
    "gateway": "gateway.server:serve",
}


def _load(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def own_endpoint(settings: ClusterSettings, role: str, index: int) -> Endpoint:
    """The config entry of the service ``role`` number ``index``."""
    if role in ("prefill", "decode"):
        entries = getattr(settings, role)
        if not 0 <= index < len(entries):
            raise SettingsError(f"--index {index}: the config has {len(entries)} {role} entries")
        return entries[index]
    return getattr(settings, role)


def cmd_serve(args: argparse.Namespace) -> int:
    from services.common.launcher import die_with_parent

    die_with_parent()  # when `splitserve up` (or a test) started this service
    settings = load_settings(args.config)
    if args.bind:  # containers: listen on every interface, peers still dial the config's name
        own_endpoint(settings, args.role, args.index).host = args.bind
    configure_logging(settings.log_level)
    _load(SERVE_TARGETS[args.role])(settings, args.index)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    return _load("services.up:run")(args)


def cmd_generate(args: argparse.Namespace) -> int:
    return _load("gateway.cli_client:run")(args)


def cmd_plan(args: argparse.Namespace) -> int:
    _load("bench.plan:run")(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    result = _load(f"bench.{args.bench_kind}:run")(args)
    return 0 if result is not None else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service (what a container runs)")
    serve.add_argument("role", choices=sorted(SERVE_TARGETS))
    serve.add_argument("--config", default=None, help="cluster YAML (default: embedded)")
    serve.add_argument("--index", type=int, default=0, help="which prefill/decode entry")
    serve.add_argument(
        "--bind", default=None,
        help="listen on this address instead of the config's host (e.g. 0.0.0.0 in a "
             "container, where the config names the service as its peers reach it)",
    )
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser("up", help="start a whole cluster on this machine")
    up.add_argument("config", nargs="?", default=None, help="cluster YAML (default: embedded)")
    up.add_argument("--log-dir", default=None, help="where service logs go (default: a temp dir)")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="stream an answer from a gateway")
    _load("gateway.cli_client:add_arguments")(gen)
    gen.set_defaults(func=cmd_generate)

    plan = sub.add_parser("plan", help="choose a deployment for a workload and an SLO")
    _load("bench.plan:add_arguments")(plan)
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    for kind in ("offline", "transfer", "ttft", "gateway_load", "serve", "migration",
                 "preemption", "agents"):
        kp = kinds.add_parser(kind)
        _load(f"bench.{kind}:add_arguments")(kp)
        kp.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"splitserve: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
