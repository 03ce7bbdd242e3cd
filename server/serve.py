"""Runs the server: load the engine, listen, and drain on SIGTERM.

Entry point: `run_server(ns, engine_args)`: the server's flags (server/args.py) as parsed by
`jaxserve serve` (jaxserve/cli.py), and the EngineArgs the CLI built from the engine's flags.

NOTE on shutdown: the first SIGTERM (or Ctrl-C) sets draining (readyz answers 503, so a load
balancer stops sending traffic; new generation requests get 503), then waits up to
--shutdown-timeout seconds for in-flight requests to finish, closes the listener (aiohttp
cancels what is left, which aborts those requests in the engine), shuts the engine down and
exits 0. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from jaxserve.config import EngineArgs
from jaxserve.engine.client import EngineClient
from jaxserve.engine.gc_heap import freeze_startup_heap
from server.app import make_app
from server.connections import ConnectionLimits, ensure_fd_limit, start_http
from server.lora import LoRAModule, check_lora_modules
from server.state import STATE_KEY

logger = logging.getLogger("jaxserve.serve")
# seconds the engine gets to stop after the listener closed
_ENGINE_SHUTDOWN_TIMEOUT_S = 10.0
# seconds handlers still running after the drain get before they are cancelled
_CLOSE_GRACE_S = 0.5


async def create_engine(ns: argparse.Namespace, engine_args: EngineArgs) -> EngineClient:
    # Imported here: the engine pulls in jax, which the server's own tests never need.
    from jaxserve.engine.async_llm import AsyncLLM

    return await AsyncLLM.create(
        engine_args,
        max_waiting_requests=ns.max_waiting_requests,
        served_model_name=ns.served_model_name,
        max_core_restarts=ns.max_core_restarts,
    )


def connection_limits_from(ns: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=ns.header_timeout,
        body_timeout_s=ns.body_timeout,
        keep_alive_timeout_s=ns.keep_alive_timeout,
        max_connections=ns.max_connections,
    )


async def serve(
    ns: argparse.Namespace,
    engine: EngineClient | None = None,
    engine_args: EngineArgs | None = None,
) -> int:
    """Serves until a signal (or the engine gives up); `engine`, or one made from
    `engine_args`."""
    limits = connection_limits_from(ns)  # bad flags fail before minutes of engine start-up
    ensure_fd_limit(limits.max_connections)
    lora_modules = getattr(ns, "lora_modules", [])
    if engine is None:
        if engine_args is None:
            raise ValueError("serve() needs an engine or the EngineArgs to make one")
        check_lora_modules(
            lora_modules,
            enable_lora=engine_args.enable_lora,
            # the engine's name when --served-model-name is absent (AsyncLLM.model_name)
            base_name=ns.served_model_name or engine_args.model,
        )
        engine = await create_engine(ns, engine_args)
    try:
        return await _serve_app(ns, engine, limits, lora_modules)
    finally:
        try:
            await asyncio.wait_for(engine.shutdown(), _ENGINE_SHUTDOWN_TIMEOUT_S)
        except Exception:
            logger.exception("engine shutdown failed")


async def _serve_app(
    ns: argparse.Namespace,
    engine: EngineClient,
    limits: ConnectionLimits,
    lora_modules: list[LoRAModule],
) -> int:
    """serve() once the engine is up; a startup failure (a bad --lora-modules adapter)
    raises, and serve() still shuts the engine down."""
    app = make_app(
        engine,
        api_key=ns.api_key,
        served_model_name=ns.served_model_name,
        max_n=ns.max_n,
        max_body_bytes=ns.max_body_bytes,
        bind_host=ns.host,
        allowed_hosts=ns.allowed_hosts,
        allowed_origins=ns.allowed_origins,
        allow_special_tokens_in_content=ns.allow_special_tokens_in_content,
        # --chat-template's text (server/args.py read the file)
        chat_template=getattr(ns, "chat_template", None),
        tool_call_parser=getattr(ns, "tool_call_parser", "auto"),
        reasoning_parser=getattr(ns, "reasoning_parser", None),
        lora_modules=lora_modules,
        runtime_lora_updating=getattr(ns, "runtime_lora_updating", True),
    )
    state = app[STATE_KEY]
    # shutdown_timeout: the drain below already waited; what is left is cancelled (aborted)
    runner, site = await start_http(
        app, ns.host, ns.port, limits, shutdown_timeout_s=_CLOSE_GRACE_S
    )
    logger.info("serving %s on %s", state.model_name, site.name)
    freeze_startup_heap()  # the app and its engine client are up: their heap stays

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second signal: stopping without waiting for requests")
            force.set()
        else:
            logger.info("signal: draining (%d requests in flight)", state.num_in_flight)
            state.draining = True
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    rc = 0
    try:
        # an engine that cannot heal its core any more ends the server (exit 1, for the
        # supervisor); its in-flight requests already got their 503s
        dead = asyncio.ensure_future(engine.wait_dead())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({dead, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if dead.done():
            logger.error("exiting: the engine is dead (%s)", dead.result())
            state.draining = True
            stop.set()
            rc = 1
        dead.cancel()
        idle = asyncio.ensure_future(state.idle.wait())
        forced = asyncio.ensure_future(force.wait())
        _, pending = await asyncio.wait(
            {idle, forced}, timeout=ns.shutdown_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if state.num_in_flight:
            logger.warning("closing with %d requests still in flight", state.num_in_flight)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return rc


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    """`jaxserve serve`: blocks until SIGTERM/SIGINT, then drains and returns 0."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(ns, engine_args=engine_args))
