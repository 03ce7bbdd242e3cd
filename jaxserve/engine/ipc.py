"""The messages between the API process (AsyncLLM) and the engine-core process, and their wire.

Every message is a msgspec Struct in one of two tagged unions (ToCore, FromCore), encoded as
msgpack with a schema and decoded with a typed decoder: a message that does not match the
schema raises `msgspec.ValidationError` instead of turning into an arbitrary object. Nothing on
this wire is ever pickled (a pickle from a socket is code execution; a schema is a contract).

A request is the core's own message, `EngineCoreRequest` (core/admission.py), sent as the API
side made it. The dataclasses that already cross the scheduler boundary (SamplingParams,
EngineCoreOutput, TokenLogprobs, SchedulerStats) travel as they are: msgspec encodes
dataclasses field by field and decoding rebuilds them through `__init__`/`__post_init__`, so
SamplingParams validates again on the core side. The transport is one pyzmq PUSH/PULL pair per
direction over `ipc://` unix sockets in a private temp dir (see `IpcPaths`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass

import msgspec

from jaxserve.core.admission import EngineCoreRequest, RequestLimits
from jaxserve.core.outputs import EngineCoreOutput, SchedulerStats
from jaxserve.lora.request import LoRARequest

# ---- API process -> engine core ----------------------------------------------------------


class Abort(msgspec.Struct, tag=True):
    """Ends these core requests and frees their blocks (unknown ids are ignored)."""

    request_ids: list[str]


class Finish(msgspec.Struct, tag=True):
    """The API process's detokenizer found a stop string: finish_reason "stop", not "abort"."""

    request_id: str
    stop_reason: str


class HealthProbe(msgspec.Struct, tag=True):
    """Asks for one real one-token generation ahead of user traffic; answered by ProbeResult."""

    probe_id: str


class Embed(msgspec.Struct, tag=True):
    """Asks for the pooled, L2-normalized final hidden state of `token_ids` (EmbedResult)."""

    req_id: str
    token_ids: list[int]


class LoRAControl(msgspec.Struct, tag=True):
    """Adds ("add": read and check), removes ("remove") or lists ("list") LoRA adapters;
    answered by LoRAResult, or an Error naming what is wrong."""

    req_id: str
    # "add" | "remove" | "list"
    op: str
    # the adapter to add
    lora_request: LoRARequest | None = None
    # the adapter to remove
    lora_int_id: int = 0


class Shutdown(msgspec.Struct, tag=True):
    """Stop the loop and exit 0."""


ToCore = EngineCoreRequest | Abort | Finish | HealthProbe | Embed | LoRAControl | Shutdown

# ---- engine core -> API process ----------------------------------------------------------


class Ready(msgspec.Struct, tag=True):
    """Sent once, after the weights are loaded and warmup is done."""

    # what the API process checks requests against before sending them (the core again)
    limits: RequestLimits
    eos_token_id: int | None
    startup_seconds: float
    warmup_seconds: float


class Outputs(msgspec.Struct, tag=True):
    """The user-request outputs of one engine step (probe outputs are filtered out)."""

    outputs: list[EngineCoreOutput]
    scheduler_stats: SchedulerStats | None = None


class Heartbeat(msgspec.Struct, tag=True):
    """Sent at least every HEARTBEAT_INTERVAL_S while the loop turns, busy or idle."""

    # time.time() in the core process (monotonic clocks are per process)
    time: float
    num_running: int
    num_waiting: int
    # fresh stats even when no step runs (e.g. KV usage back to 0 after an abort)
    stats: SchedulerStats


class ProbeResult(msgspec.Struct, tag=True):
    probe_id: str
    # the token the probe generated
    token_id: int
    # seconds from the probe's arrival in the core to its token
    latency_s: float


class EmbedResult(msgspec.Struct, tag=True):
    req_id: str
    # unit-L2-norm vector of hidden_size floats
    embedding: list[float]


class LoRAResult(msgspec.Struct, tag=True):
    req_id: str
    # the adapters the core holds after the operation
    loras: list[LoRARequest]


class Error(msgspec.Struct, tag=True):
    """A failure: of one request (request_id set) or of the whole core (fatal)."""

    # short, and safe to show a client: no traceback, no file path
    message: str
    # the core request id, embed req_id or probe_id the error belongs to; None: not one request's
    request_id: str | None = None
    # True: the core is exiting (start-up failed, or a step raised)
    fatal: bool = False
    # True: the request itself was bad (the API process raises ValueError, not RuntimeError)
    is_invalid_request: bool = False
    # the core's traceback, for the API process's log only (never in a response or /health)
    traceback: str | None = None


FromCore = Ready | Outputs | Heartbeat | ProbeResult | EmbedResult | LoRAResult | Error

# The core sends a Heartbeat at least this often; the API side reads its age.
HEARTBEAT_INTERVAL_S = 0.25


class Codec:
    """One msgpack encoder and a typed decoder for one direction (reusable, not thread-safe)."""

    def __init__(self, decode_type: type) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(decode_type)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> msgspec.Struct:
        """Raises msgspec.ValidationError / DecodeError on anything outside the schema."""
        return self._decoder.decode(data)


def encode_request(codec: Codec, message: EngineCoreRequest) -> bytes:
    """The request's bytes; ValueError naming the field the wire cannot carry (a lone
    surrogate, an int past 64 bits), so it fails before anything is registered."""
    try:
        return codec.encode(message)
    except (msgspec.EncodeError, OverflowError, UnicodeEncodeError, TypeError) as e:
        name = _unencodable_field(message)
        if isinstance(e, UnicodeEncodeError):
            why = "must be valid unicode text (no lone surrogates)"
        else:
            why = f"cannot be sent to the engine ({e})"
        raise ValueError(f"{name} {why}") from None


def _unencodable_field(message: EngineCoreRequest) -> str:
    """The name (as a client sends it) of the first field msgpack cannot encode."""
    encoder = msgspec.msgpack.Encoder()
    for name in message.__struct_fields__:
        value = getattr(message, name)
        try:
            encoder.encode(value)
            continue
        except Exception:  # noqa: BLE001 - any failure names this field
            pass
        if name != "sampling_params":
            return name
        for f in dataclasses.fields(value):
            try:
                encoder.encode(getattr(value, f.name))
            except Exception:  # noqa: BLE001
                return f.name
        return "sampling_params"
    return "request"


def core_codec() -> Codec:
    """The engine core's side: decodes ToCore."""
    return Codec(ToCore)


def client_codec() -> Codec:
    """The API process's side: decodes FromCore."""
    return Codec(FromCore)


@dataclass
class IpcPaths:
    """A private temp dir (mode 0700) holding the two unix sockets; removed by cleanup()."""

    # the directory; only this user can reach the sockets inside it
    dir: str
    # API process -> core (API binds PUSH, core connects PULL)
    to_core: str
    # core -> API process (API binds PULL, core connects PUSH)
    from_core: str

    @classmethod
    def make(cls) -> IpcPaths:
        # unix socket paths are limited to ~107 bytes, so keep the dir short (mkdtemp is 0700)
        base = "/tmp" if os.path.isdir("/tmp") else None
        d = tempfile.mkdtemp(prefix="jaxserve-", dir=base)
        return cls(dir=d, to_core=f"ipc://{d}/in", from_core=f"ipc://{d}/out")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
