"""``splitserve generate "prompt"``: stream one answer from a gateway to the terminal.

Text deltas go to stdout as they arrive; usage, finish reason and TTFT go to
stderr. A gRPC error prints ``error: CODE: message`` and exits non-zero, as does
an aborted answer; with no gateway listening it says how to start one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

import grpc

from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
API_KEY_ENV = "SPLITSERVE_API_KEY"
PRIORITIES = {
    "batch": common_pb2.PRIORITY_CLASS_BATCH,
    "normal": common_pb2.PRIORITY_CLASS_NORMAL,
    "high": common_pb2.PRIORITY_CLASS_HIGH,
    "critical": common_pb2.PRIORITY_CLASS_CRITICAL,
}
FINISH_NAMES = {
    common_pb2.FINISH_REASON_UNSPECIFIED: "none",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"gateway host:port (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument("--model", default=None, help="model id (default: the first served)")
    parser.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0: 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )
    parser.add_argument(
        "--stop-token-id", type=int, action="append", default=[], metavar="ID",
        help="stop token id (repeatable)",
    )  # fmt: skip
    parser.add_argument("--priority", choices=sorted(PRIORITIES), default="normal")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user message")
    parser.add_argument("--system", default=None, help="with --chat: a system message first")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at eos")
    parser.add_argument("--request-id", default="", help="(default: the gateway assigns one)")
    parser.add_argument("--session-id", default="", help="groups the turns of a conversation")
    parser.add_argument("--deadline-ms", type=int, default=0, help="answer wanted within (0: none)")
    parser.add_argument("--show-ids", action="store_true", help="print token ids to stderr")
    parser.add_argument("--timeout", type=float, default=None, help="RPC timeout in seconds")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"the gateway's API key, if it needs one (default: ${API_KEY_ENV})")
    parser.add_argument("--cache-salt", default="", help="share cached prefixes only with "
                        "requests of the same salt")


def build_request(
    args: argparse.Namespace, model: str, prompt: str
) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    req = generation_pb2.GenerateRequest(
        model=model,
        sampling=sampling,
        priority=PRIORITIES[args.priority],
        request_id=args.request_id,
        session_id=args.session_id,
        deadline_ms=args.deadline_ms,
        cache_salt=args.cache_salt,
    )
    if args.chat:
        msgs = []
        if args.system:
            msgs.append(generation_pb2.ChatMessage(role="system", content=args.system))
        msgs.append(generation_pb2.ChatMessage(role="user", content=prompt))
        req.chat.messages.extend(msgs)
    else:
        req.prompt = prompt
    return req


def _check_args(args: argparse.Namespace) -> str | None:
    if args.max_tokens < 0:
        return "--max-tokens must be >= 0"
    if args.seed is not None and args.seed < 0:
        return "--seed must be >= 0"
    if any(i < 0 for i in args.stop_token_id):
        return "--stop-token-id must be >= 0"
    if args.deadline_ms < 0:
        return "--deadline-ms must be >= 0"
    if args.system is not None and not args.chat:
        return "--system needs --chat"
    return None


def run(
    args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=err)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    call = None
    try:
        with grpc.insecure_channel(args.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            metadata = (("x-api-key", args.api_key),) if args.api_key else ()
            model = args.model
            if not model:
                models = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=args.timeout,
                                         metadata=metadata)
                if not models.models:
                    print("error: the gateway serves no model", file=err)
                    return 1
                model = models.models[0].id
            req = build_request(args, model, prompt)
            start = time.monotonic()
            call = stub.Generate(req, timeout=args.timeout, metadata=metadata)
            last = None
            ttft = None
            ids: list[int] = []
            for msg in call:
                if msg.text:
                    out.write(printable(msg.text) if out.isatty() else msg.text)
                    out.flush()
                ids.extend(msg.token_ids)
                if ttft is None and msg.ttft_seconds:
                    ttft = msg.ttft_seconds
                last = msg
            elapsed = time.monotonic() - start
    except KeyboardInterrupt:
        if call is not None:
            call.cancel()
        print("\nerror: interrupted", file=err)
        return 130
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        print(f"\nerror: {code.name if code else 'UNKNOWN'}: {details}", file=err)
        if code == grpc.StatusCode.UNAVAILABLE and _no_listener(details):
            print(f"hint: no gateway is listening at {args.address}; start a local cluster "
                  "with `splitserve up` (or pass --address HOST:PORT)", file=err)
        return 1
    out.write("\n")
    out.flush()
    _print_summary(err, last, ttft, elapsed, ids if args.show_ids else None)
    if last is None or last.finish_reason == common_pb2.FINISH_REASON_ABORT:
        print("error: the request was aborted", file=err)
        return 1
    return 0


def _no_listener(details: str | None) -> bool:
    text = (details or "").lower()
    return any(s in text for s in ("failed to connect", "connection refused",
                                   "connect failed"))


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """Control characters (random weights emit them) shown as escapes on a terminal."""
    return text.translate(_CONTROL)


def _print_summary(
    err: TextIO,
    last: generation_pb2.GenerateResponse | None,
    ttft: float | None,
    elapsed: float,
    ids: list[int] | None,
) -> None:
    if ids is not None:
        print(f"token_ids: {ids}", file=err)
    if last is None:
        print(f"no response (total {elapsed:.3f}s)", file=err)
        return
    u = last.usage
    parts = [
        f"request_id={last.request_id}",
        f"finish={FINISH_NAMES.get(last.finish_reason, str(last.finish_reason))}",
        f"prompt_tokens={u.prompt_tokens}",
        f"completion_tokens={u.completion_tokens}",
        f"cached_tokens={u.cached_tokens}",
        f"ttft={ttft:.3f}s" if ttft is not None else "ttft=n/a",
        f"total={elapsed:.3f}s",
    ]
    if ttft is not None and u.completion_tokens > 1 and elapsed > ttft:
        parts.append(f"tpot={(elapsed - ttft) / (u.completion_tokens - 1) * 1000:.1f}ms")
    print(" ".join(parts), file=err)
