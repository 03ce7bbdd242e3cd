"""The flags of `jaxserve serve` that belong to the server, not the engine.

jaxserve/cli.py adds these to its `serve` parser next to the engine's flags; server/serve.py
reads them from the parsed namespace. The engine's flags come from EngineArgs (the CLI builds
EngineArgs and hands it to `run_server`), so the server never imports the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on /v1/*, /tokenize and /detokenize",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as `model` (default: the --model value)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="queued requests beyond which new ones get 429 with Retry-After",
    )
    g.add_argument(
        "--max-core-restarts",
        type=int,
        default=5,
        help="restarts of a dead engine core allowed within 10 minutes; past them the "
        "server exits 1 (0: the first death is final)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests before closing (a second exits now)",
    )
    g.add_argument("--max-n", type=int, default=16, help="most completions per prompt (n)")
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 << 20,
        help="largest request body; larger ones get 413",
    )
    g.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="encode control-token spellings (e.g. <|im_start|>) inside chat messages as "
        "control tokens; by default they are text, so user text cannot forge a turn",
    )
    add_chat_args(parser)
    add_http_args(parser)
    add_lora_args(parser)


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """LoRA adapters served next to the model (server/lora.py; the engine's --enable-lora,
    --max-loras, --max-lora-rank and --max-cpu-loras come with the engine's flags)."""
    from server.lora import parse_lora_module

    g = parser.add_argument_group("LoRA adapters")
    g.add_argument(
        "--lora-modules",
        type=parse_lora_module,
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH|JSON",
        help="adapters (PEFT directories) loaded at startup, each selected by its name as "
        "`model`; name=path, or vLLM's JSON form "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\'; needs --enable-lora',
    )
    g.add_argument(
        "--runtime-lora-updating",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with "
        "--enable-lora; behind --api-key when one is set). They read any directory on the "
        "server that the client names: turn them off on a server open to untrusted clients",
    )


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """Chat rendering and output parsing (server/chat_config.py)."""
    from server.chat_config import REASONING_PARSER_CHOICES
    from server.tools.parsers import TOOL_PARSER_CHOICES

    g = parser.add_argument_group("chat templates, tool calls and reasoning")
    g.add_argument(
        "--chat-template",
        type=_chat_template,
        default=None,
        metavar="PATH|TEXT",
        help="a Jinja chat template (a file, or the template text) replacing the model's",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=TOOL_PARSER_CHOICES,
        default="auto",
        help="how tool calls are read from the output: hermes (<tool_call>{...}</tool_call>), "
        "llama3_json (Llama 3.1 JSON calls), or auto: detected from the chat template "
        "(templates that ignore tools get the tools in the system turn, read as hermes)",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSER_CHOICES,
        default=None,
        help="split <think>...</think> reasoning into message.reasoning_content "
        "(Qwen3, DeepSeek-R1 distills)",
    )


def _chat_template(value: str) -> str:
    """The template text (read now, so a bad path fails before the engine starts)."""
    from server.chat_config import load_chat_template

    try:
        text = load_chat_template(value)
    except (ValueError, OSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    assert text is not None
    return text


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive(kind: type) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = kind(value)
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return number

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """Connection hygiene and browser safety (server/connections.py, server/security.py)."""
    g = parser.add_argument_group("connections and browser safety")
    g.add_argument(
        "--header-timeout",
        type=_positive(float),
        metavar="SECONDS",
        default=10.0,
        help="seconds a request head may take from its first byte to its last (then 408)",
    )
    g.add_argument(
        "--body-timeout",
        type=_positive(float),
        metavar="SECONDS",
        default=60.0,
        help="seconds a request body may take to arrive after its head (then 408)",
    )
    g.add_argument(
        "--keep-alive-timeout",
        "--timeout-keep-alive",
        type=_positive(float),
        metavar="SECONDS",
        default=5.0,
        help="seconds an idle keep-alive connection stays open (uvicorn's and vLLM's default "
        "is 5 too; behind a load balancer, set it above the balancer's idle timeout)",
    )
    g.add_argument(
        "--max-connections",
        type=_positive(int),
        metavar="N",
        default=1024,
        help="open connections at most; past it the longest-idle one is closed, or the new "
        "one gets 503",
    )
    g.add_argument(
        "--allowed-hosts",
        type=_names,
        action="extend",
        default=[],
        metavar="NAME[,NAME...]",
        help="Host names accepted besides loopback ones when bound to loopback (DNS "
        "rebinding protection; '*' turns the check off), e.g. behind a local reverse proxy",
    )
    g.add_argument(
        "--allowed-origins",
        type=_names,
        action="extend",
        default=[],
        metavar="ORIGIN[,ORIGIN...]",
        help="browser origins allowed to call the API (CORS; '*' for any); default: none, "
        "and requests carrying another Origin get 403",
    )
