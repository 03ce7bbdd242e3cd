"""LoRA adapters on the server: the --lora-modules entries, and the registry that gives the
`model` field its meaning (the served model -> None, an adapter's name -> its LoRARequest).

NOTE on ids: each load takes the next lora_int_id (1, 2, ...) and no id is ever handed out
twice in a process, not even after an unload or a failed load: the engine keys its device
slots and its prefix cache on the id, so a reused id could meet KV blocks an older adapter of
that id computed.

NOTE on concurrency: a name is taken (`_loading`) before add_lora is awaited, so of two loads
of one name exactly one reaches the engine; the other is refused at once. An unload removes
the name first, so requests selecting it get 404 while the engine finishes its running ones.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from jaxserve.engine.client import EngineClient
from jaxserve.lora.request import LoRARequest
from server.errors import APIError, bad_request
from server.protocol import MAX_NAME_CHARS

logger = logging.getLogger(__name__)

# the fields of vLLM's JSON form of --lora-modules
_MODULE_FIELDS = ("name", "path", "base_model_name")


@dataclass(frozen=True)
class LoRAModule:
    """One --lora-modules entry."""

    # the name clients select the adapter by (the `model` field)
    name: str
    # the adapter's directory (PEFT format), as given
    path: str
    # the served model it applies to (vLLM's field); None: the served model
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModule:
    """An argparse `type`: `name=path`, or vLLM's JSON `{"name", "path", "base_model_name"}`.

    JSON is told apart by its leading "{" (vLLM guesses from "=" and ","; a path holding a
    comma then fails as bad JSON). name=path splits at the first "=", so paths may hold one.
    """
    text = value.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON {value!r}: {e}") from None
        if not isinstance(obj, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
        unknown = sorted(set(obj) - set(_MODULE_FIELDS))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown field(s) {', '.join(unknown)} in {value!r}; the fields are "
                f"{', '.join(_MODULE_FIELDS)}"
            )
        for key in _MODULE_FIELDS:
            required = key != "base_model_name"
            v = obj.get(key)
            if (required or v is not None) and (not isinstance(v, str) or not v):
                raise argparse.ArgumentTypeError(f"{key} must be a non-empty string in {value!r}")
        return LoRAModule(obj["name"], obj["path"], obj.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(
            f"expected name=path or a JSON object with name and path, got {value!r}"
        )
    return LoRAModule(name.strip(), path.strip())


def check_lora_modules(modules: Iterable[LoRAModule], *, enable_lora: bool, base_name: str) -> None:
    """The startup checks that need no engine (ValueError naming the flag and the module), so
    a typo fails before minutes of engine start-up."""
    modules = list(modules)
    if modules and not enable_lora:
        raise ValueError("--lora-modules needs --enable-lora (the engine serves no adapters)")
    seen: set[str] = set()
    for m in modules:
        what = f"--lora-modules {m.name}={m.path}"
        name_error = _name_error(m.name, base_name)
        if name_error is not None:
            raise ValueError(f"{what}: {name_error}")
        if m.name in seen:
            raise ValueError(f"{what}: the name {m.name!r} is given twice")
        if m.base_model_name not in (None, base_name):
            # vLLM silently falls back to its first served model; a typo here is an error
            raise ValueError(
                f"{what}: base_model_name {m.base_model_name!r} is not served here (this "
                f"server serves {base_name!r})"
            )
        seen.add(m.name)


def _name_error(name: str, base_name: str) -> str | None:
    """Why `name` cannot name an adapter, or None."""
    if not name:
        return "the adapter name must not be empty"
    if len(name) > MAX_NAME_CHARS:
        # the `model` field holds at most this much: such an adapter could never be selected
        return f"the adapter name has {len(name)} characters; at most {MAX_NAME_CHARS}"
    if name == base_name:
        return f"the adapter name {name!r} is the served model's name; pick another"
    return None


def model_not_found(model: str, base_name: str, num_adapters: int) -> APIError:
    served = repr(base_name)
    if num_adapters:
        s = "s" if num_adapters > 1 else ""
        served += f" and {num_adapters} LoRA adapter{s} (GET /v1/models lists them)"
    return APIError(
        404,
        f"the model {model!r} does not exist; this server serves {served}",
        param="model",
        code="model_not_found",
    )


class LoRARegistry:
    """The adapters this server serves, by name, in load order."""

    def __init__(self, base_name: str) -> None:
        # the served model's name: `model` naming it (or absent) selects no adapter
        self.base_name = base_name
        self._loaded: dict[str, LoRARequest] = {}
        # names whose add_lora is in flight: taken, but not selectable (nor listed) yet
        self._loading: set[str] = set()
        self._ids = itertools.count(1)

    def resolve(self, model: str | None) -> LoRARequest | None:
        """What a request's `model` selects: None (the base model) or an adapter; 404 for
        anything else."""
        if model is None or model == self.base_name:
            return None
        lora = self._loaded.get(model)
        if lora is None:
            raise self.model_not_found(model)
        return lora

    def model_not_found(self, model: str) -> APIError:
        return model_not_found(model, self.base_name, len(self._loaded))

    @property
    def adapters(self) -> list[LoRARequest]:
        """The loaded adapters, in load order."""
        return list(self._loaded.values())

    async def load(self, engine: EngineClient, name: str, path: str) -> LoRARequest:
        """Adds the adapter in the engine and makes `name` select it. 400 naming lora_name for
        a taken or invalid name, naming lora_path for what the engine refused."""
        error = _name_error(name, self.base_name)
        if error is not None:
            raise bad_request(f"lora_name: {error}", "lora_name")
        if name in self._loaded or name in self._loading:
            state = "has already been loaded" if name in self._loaded else "is being loaded"
            raise bad_request(f"the LoRA adapter {name!r} {state}", "lora_name")
        lora = LoRARequest(lora_name=name, lora_int_id=next(self._ids), lora_path=path)
        self._loading.add(name)
        # shielded: a client leaving mid-load must not leave the engine holding an adapter
        # the server does not know (the load completes and is registered either way)
        return await asyncio.shield(self._add(engine, lora))

    async def _add(self, engine: EngineClient, lora: LoRARequest) -> LoRARequest:
        try:
            await engine.add_lora(lora)
        except ValueError as e:
            # the engine names what is wrong with the adapter; lora_path is where it lives
            raise bad_request(str(e), "lora_path") from None
        finally:
            self._loading.discard(lora.lora_name)
        self._loaded[lora.lora_name] = lora
        logger.info(
            "loaded LoRA adapter %r (id %d) from %s",
            lora.lora_name,
            lora.lora_int_id,
            lora.lora_path,
        )
        return lora

    def find(self, name: str | None, lora_int_id: int | None) -> LoRARequest:
        """The loaded adapter named by name and/or id (404 naming the field; 400 when the
        two name different adapters)."""
        if name is None and lora_int_id is None:
            raise bad_request("give lora_name (or lora_int_id)", "lora_name")
        by_id = None
        if lora_int_id is not None:
            by_id = next((x for x in self._loaded.values() if x.lora_int_id == lora_int_id), None)
            if by_id is None:
                raise APIError(
                    404,
                    f"no loaded LoRA adapter has lora_int_id {lora_int_id}",
                    param="lora_int_id",
                    code="lora_adapter_not_found",
                )
        if name is None:
            assert by_id is not None
            return by_id
        lora = self._loaded.get(name)
        if lora is None:
            why = " (it is still being loaded)" if name in self._loading else ""
            raise APIError(
                404,
                f"the LoRA adapter {name!r} cannot be found{why}",
                param="lora_name",
                code="lora_adapter_not_found",
            )
        if by_id is not None and by_id is not lora:
            raise bad_request(
                f"lora_int_id {lora_int_id} is the adapter {by_id.lora_name!r}, not {name!r}",
                "lora_int_id",
            )
        return lora

    async def unload(self, engine: EngineClient, lora: LoRARequest) -> None:
        """Unselectable now; returns once the engine has finished the adapter's running
        requests and freed it."""
        del self._loaded[lora.lora_name]
        await asyncio.shield(self._remove(engine, lora))

    async def _remove(self, engine: EngineClient, lora: LoRARequest) -> None:
        try:
            await engine.remove_lora(lora.lora_int_id)
        except ValueError as e:
            # the engine does not hold it (e.g. a restarted core): gone, as the client asked
            logger.warning("unloading LoRA adapter %r: %s", lora.lora_name, e)
        except BaseException:
            # the unload did not happen (a dead engine): it stays selectable, unless a load
            # took the name meanwhile, so that the client's retry finds it
            if lora.lora_name not in self._loaded and lora.lora_name not in self._loading:
                self._loaded[lora.lora_name] = lora
            raise
        logger.info("unloaded LoRA adapter %r (id %d)", lora.lora_name, lora.lora_int_id)
