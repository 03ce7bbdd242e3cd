"""`jaxserve serve | generate | convert`: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
import types
import typing

from jaxserve.config import EngineArgs


def field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment lines just above it in the class body (its --help text)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): flags still work, unexplained
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
            continue
        name = text.split(":", 1)[0]
        if name in names and pending:
            comments[name] = " ".join(pending)
        pending = []
    return comments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Older spellings kept working: field -> extra option strings.
_ALIASES = {"enable_warmup": ["--warmup"]}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field: its name, type, default and (Literal) choices; the
    help is the field's comment. Booleans get --x / --no-x."""
    g = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineArgs)
    helps = field_comments(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # X | None: optional, parsed as X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        options = [_flag(f.name), *_ALIASES.get(f.name, [])]
        kw: dict[str, typing.Any] = {"default": f.default, "help": helps.get(f.name, "")}
        if hint is bool:
            g.add_argument(*options, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(hint) is typing.Literal:
            g.add_argument(*options, choices=list(typing.get_args(hint)), **kw)
        else:
            g.add_argument(*options, type=hint, **kw)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)})


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "multi-host (jax.distributed; defaults from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
        "JAX_PROCESS_ID)"
    )
    g.add_argument(
        "--distributed-coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address for jax.distributed (same on every process)",
    )
    g.add_argument("--num-processes", type=int, default=None, help="processes (hosts) in all")
    g.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's rank: 0 serves, the others follow its steps",
    )


def _distributed(ns: argparse.Namespace) -> int | None:
    """Starts jax.distributed; on a follower runs the follower loop and returns its code."""
    from jaxserve import distributed

    cfg = distributed.DistributedConfig.resolve(
        ns.distributed_coordinator, ns.num_processes, ns.process_id
    )
    if not cfg.enabled:
        return None
    if cfg.process_id != 0:
        from jaxserve.engine.follower import run_follower

        run_follower(engine_args_from(ns), cfg)
        return 0
    if ns.command == "serve":
        # the engine core runs in its own process: it initialises from these variables
        cfg.export_env()
    else:
        distributed.initialize(cfg)
    return None


def _serve(ns: argparse.Namespace) -> int:
    from server.serve import run_server

    return run_server(ns, engine_args_from(ns))


def _generate(ns: argparse.Namespace) -> int:
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        seed=ns.sampling_seed,
    )
    with LLM(**vars(engine_args_from(ns))) as llm:
        start = time.perf_counter()
        if ns.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in ns.prompts], params)
        else:
            outs = llm.generate(ns.prompts, params)
        elapsed = time.perf_counter() - start
        for out in outs:
            if ns.json:
                print(
                    json.dumps(
                        {
                            "prompt": out.prompt,
                            "text": out.outputs[0].text,
                            "finish_reason": out.outputs[0].finish_reason,
                        }
                    )
                )
            else:
                print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"[{n} tokens in {elapsed:.2f} s]", file=sys.stderr)
    return 0


def _convert(ns: argparse.Namespace) -> int:
    from jaxserve.model.checkpoint import save_checkpoint
    from jaxserve.model.loader import load_model, resolve_dtype

    loaded = load_model(ns.src, resolve_dtype(ns.dtype))
    save_checkpoint(ns.dst, loaded.params, loaded.spec, loaded.tokenizer)
    print(f"wrote {ns.dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="A pure-JAX LLM engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    # the server's own flags live with the server (server/args.py)
    from server.args import add_server_args

    add_server_args(srv)
    add_engine_args(srv)
    add_distributed_args(srv)
    srv.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate text for prompts offline")
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    gen.add_argument("--json", action="store_true", help="print one JSON line per prompt")
    add_engine_args(gen)
    add_distributed_args(gen)
    gen.set_defaults(func=_generate)
    conv = sub.add_parser("convert", help="write a model as an orbax checkpoint + tokenizer")
    conv.add_argument("src", help="built-in name, HF dir or .gguf file")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    conv.set_defaults(func=_convert)
    ns = parser.parse_args(argv)
    try:
        if ns.command in ("serve", "generate") and (rc := _distributed(ns)) is not None:
            return rc
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
