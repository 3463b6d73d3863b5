"""Every message between the router process and a worker process, as msgspec structs.

Both sides import this module (and ``serving.errors``) and nothing of each other: the router builds
:class:`Run`/:class:`Cancel`/:class:`Ping` and reads :data:`Event`; the worker builds events and reads
:data:`RouterMessage`. Messages travel as JSON and are decoded *into these types on receipt*, so a
malformed message (a wrong type, a missing field, an unknown ``type``, a list past its limit) is refused
with a :class:`msgspec.ValidationError` naming the field, never a ``KeyError`` deep inside the router.

::

    worker                                   router
      | POST /internal/workers/register  --->  | RegisterRequest
      | <--- RegisterReply                     |
      | GET  /internal/workers/{id}/channel -> | NDJSON, one RouterMessage a line: Run | Cancel | Ping
      | POST /internal/workers/{id}/events --> | EventsRequest{session, events: [Tokens|Done|Error|Progress]},
      |   one per line of a chunked body that   |   each applied as it arrives (one EventsRequest as
      |   lasts the whole session               |   a plain body works too)
      | POST /internal/workers/{id}/heartbeat  | SessionRequest
      | POST /internal/workers/{id}/unregister | SessionRequest
    controller                               router
      | POST /internal/workers/{id}/drain  --> | <--- DrainReply

The JSON field names are the dict keys of earlier caserve versions; ``type`` tags the unions.
Every request also carries the router's worker token in the :data:`WORKER_TOKEN_HEADER` header (the
router checks it before decoding anything: ``caserve.serving.router.security``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct

# ---------------------------------------------------------------------------------------------- tasks

TASK_GENERATE = "generate"
TASK_EMBED = "embed"
TASK_CLASSIFY = "classify"

# Which model tasks (``LoadedModel.task``) can serve which job tasks.
MODEL_TASKS: dict[str, set[str]] = {
    "causal-lm": {TASK_GENERATE},
    "seq2seq": {TASK_GENERATE},
    "embedding": {TASK_EMBED},
    "classification": {TASK_CLASSIFY},
}

WORKER_KINDS = ("native", "assisted", "cpu")

WORKER_TOKEN_HEADER = "x-caserve-worker-token"  # on every request a worker (or the controller) sends

# ---------------------------------------------------------------------------------------------- limits

MAX_BATCH = 1024  # rows in one Run (a worker's max_batch)
MAX_EVENTS = 4096  # events in one EventsRequest (the worker splits longer backlogs)
MAX_IDS = 1 << 16  # token ids in one list (a prompt, a prefix, one tokens event)
MAX_TEXT = 1 << 22  # characters in one text field
MAX_INPUTS = 4096  # inputs of one embedding / classification row
MAX_VECTOR = 1 << 16  # floats in one embedding or score vector
MAX_ID = 200  # characters of a worker id, session, dispatch or job id
MAX_LOGPROBS = 20  # top alternatives per token
MAX_LOGIT_BIAS = 300  # biased tokens per request (OpenAI's limit)
MAX_STOP_IDS = 64  # stop token ids per request
GREEDY_BELOW = 1e-5  # a temperature under this means argmax

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID)]
TokenIds = Annotated[list[Annotated[int, Meta(ge=0, lt=1 << 31)]], Meta(max_length=MAX_IDS)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Seconds = Annotated[float, Meta(ge=0.0)]
Count = Annotated[int, Meta(ge=0)]

# ---------------------------------------------------------------------------------------------- registration


class RegisterRequest(Struct, forbid_unknown_fields=True):
    worker_id: Id
    kind: Literal["native", "assisted", "cpu"]
    model: Annotated[str, Meta(min_length=1, max_length=1000)]
    task: Annotated[str, Meta(max_length=100)]  # a key of MODEL_TASKS (checked by the router)
    max_batch: Annotated[int, Meta(ge=1, le=MAX_BATCH)]  # the worker's slots
    max_context: Annotated[int, Meta(ge=1)]
    # continuous: a row takes a free slot when it arrives; static: rows are admitted only when every slot
    # is free (one batch at a time, the baseline), so the router dispatches only to an idle worker.
    batching: Literal["continuous", "static"] = "continuous"


class RegisterReply(Struct):
    session: Id
    heartbeat_s: Annotated[float, Meta(gt=0.0)]


class SessionRequest(Struct, forbid_unknown_fields=True):
    session: Id


class DrainReply(Struct):
    worker_id: str
    draining: bool
    running: Count


class Ok(Struct):
    ok: bool = True


# ---------------------------------------------------------------------------------------------- router -> worker


class SamplingParams(Struct, forbid_unknown_fields=True):
    """How one request samples and stops (``worker.sampling``). Neutral values turn a processor off."""

    max_tokens: Annotated[int, Meta(ge=0)] = 16  # 0: only score the prompt (echo)
    temperature: Annotated[float, Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0  # 0: off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0)] = 1.0  # > 1 discourages prompt and output tokens
    presence_penalty: float = 0.0  # subtracted once from a token the output already has
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: Annotated[dict[int, float], Meta(max_length=MAX_LOGIT_BIAS)] = {}
    seed: Optional[int] = None
    min_tokens: Count = 0  # EOS and stop_token_ids are banned before this many tokens
    stop: Annotated[list[Text], Meta(max_length=16)] = []
    stop_token_ids: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=MAX_STOP_IDS)] = []
    ignore_eos: bool = False
    logprobs: Optional[Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]] = None  # alternatives per generated token
    prompt_logprobs: Optional[Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]] = None  # the same for the prompt
    fit_context: bool = True  # False: max_tokens was asked for and must fit the context (else an error)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Nothing but an argmax of the model's logits."""
        return self.greedy and not self.penalized and not self.logit_bias and not self.min_tokens \
            and self.logprobs is None


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: str
    content: Text


class Row(Struct, forbid_unknown_fields=True):
    """One job of a batch. Exactly one of prompt/prompt_ids/messages (generate) or inputs (embed,
    classify) is set. A requeued job continues: ``prefix_ids`` were generated by an earlier attempt and
    its client already has ``prefix_chars_sent`` characters of their text. ``prompt_group`` marks the
    choices of one ``n`` > 1 request (only rows of one request share a prefill, never two clients')."""

    dispatch: Id
    job: Id
    task: Literal["generate", "embed", "classify"]
    prompt: Optional[Text] = None
    prompt_ids: Optional[TokenIds] = None
    messages: Optional[Annotated[list[ChatMessage], Meta(max_length=MAX_INPUTS)]] = None
    inputs: Optional[Annotated[list[Union[Text, TokenIds]], Meta(max_length=MAX_INPUTS)]] = None
    params: Optional[SamplingParams] = None
    prefix_ids: TokenIds = []
    prefix_chars_sent: Count = 0
    # The n choices of one request carry the same id: rows with equal ids and equal sequences (prompt and
    # prefix) that the worker admits together are prefilled once and share that prefill's KV columns.
    prompt_group: Optional[Id] = None


class Run(Struct, tag="run", tag_field="type"):
    """Rows to run. Each takes one of the worker's slots (the router sends at most its free slots); a
    row sent before a cancelled row's slot is freed waits at the worker for the next step."""

    rows: Annotated[list[Row], Meta(min_length=1, max_length=MAX_BATCH)]


class Cancel(Struct, tag="cancel", tag_field="type"):
    """The client of row ``dispatch`` went away: stop it, send it no ``done``."""

    dispatch: Id


class Ping(Struct, tag="ping", tag_field="type"):
    """Keep-alive on the channel."""


RouterMessage = Union[Run, Cancel, Ping]

# ---------------------------------------------------------------------------------------------- worker -> router


class Tokens(Struct, tag="tokens", tag_field="type", forbid_unknown_fields=True):
    """Tokens sampled for row ``dispatch`` and the text they complete (may be empty, or text without ids
    when a stop string or the end flushes held-back text). An echo row's first event (this or its
    ``Done``) also carries the prompt's logprobs and text, so that a stream can send the prompt first."""

    dispatch: Id
    ids: TokenIds = []
    text: Text = ""
    logprobs: Optional[Annotated[list["TokenLogprob"], Meta(max_length=MAX_IDS)]] = None  # one per id, if asked
    prompt_logprobs: Optional[Annotated[list["TokenLogprob"], Meta(max_length=MAX_IDS)]] = None  # echo
    prompt_text: Optional[Text] = None  # echo: the prompt as the worker decoded it


class TopLogprob(Struct, forbid_unknown_fields=True):
    """A token as the worker names it (the router has no tokenizer): id, text, UTF-8 bytes, logprob."""

    id: Annotated[int, Meta(ge=0)]
    token: Annotated[str, Meta(max_length=1000)]
    logprob: Optional[float]  # None: the first prompt token (nothing predicts it)
    bytes: Annotated[list[Annotated[int, Meta(ge=0, le=255)]], Meta(max_length=4000)] = []


class TokenLogprob(TopLogprob, forbid_unknown_fields=True):
    """A sampled (or prompt) token's logprob and the most likely alternatives at its position."""

    top: Annotated[list[TopLogprob], Meta(max_length=MAX_LOGPROBS)] = []


class ClassScore(Struct, forbid_unknown_fields=True):
    label: Annotated[str, Meta(max_length=1000)]
    score: float
    scores: Annotated[list[float], Meta(max_length=MAX_VECTOR)]


class Done(Struct, tag="done", tag_field="type", forbid_unknown_fields=True):
    """Row ``dispatch`` finished. Encoders carry ``embeddings`` or ``classes``, one per input."""

    dispatch: Id
    finish_reason: Literal["stop", "length"] = "stop"
    prompt_tokens: Count = 0
    durations: Annotated[dict[str, Seconds], Meta(max_length=16)] = {}
    embeddings: Optional[Annotated[list[Annotated[list[float], Meta(max_length=MAX_VECTOR)]],
                                   Meta(max_length=MAX_INPUTS)]] = None
    classes: Optional[Annotated[list[ClassScore], Meta(max_length=MAX_INPUTS)]] = None
    prompt_logprobs: Optional[Annotated[list[TokenLogprob], Meta(max_length=MAX_IDS)]] = None  # echo
    prompt_text: Optional[Text] = None  # echo: the prompt as the worker decoded it


class Error(Struct, tag="error", tag_field="type", forbid_unknown_fields=True):
    """Row ``dispatch`` failed; ``error_type`` is a key of ``serving.errors.WORKER_ERROR_TYPES``."""

    dispatch: Id
    error_type: Annotated[str, Meta(max_length=100)]
    message: Text = "worker error"


class Progress(Struct, tag="progress", tag_field="type", forbid_unknown_fields=True):
    """What the worker's engine did since its last report (sent about twice a second while busy and once
    when it becomes idle), for the router's service model and ``/health``. Durations are the worker's
    own clock; ``occupancy`` sums, over the decode steps, the slots each one ran."""

    prefill_s: Seconds = 0.0
    decode_s: Seconds = 0.0
    steps: Count = 0
    generated_tokens: Count = 0
    prefill_tokens: Count = 0
    occupancy: Count = 0
    active: Count = 0  # slots in use at the report
    free_slots: Count = 0


Event = Union[Tokens, Done, Error, Progress]


class EventsRequest(Struct, forbid_unknown_fields=True):
    session: Id
    events: Annotated[list[Event], Meta(max_length=MAX_EVENTS)]


# ---------------------------------------------------------------------------------------------- codecs

encode = msgspec.json.Encoder().encode
router_message_decoder = msgspec.json.Decoder(RouterMessage)
events_decoder = msgspec.json.Decoder(EventsRequest)


def encode_line(message: RouterMessage) -> bytes:
    """One channel line (NDJSON)."""
    return encode(message) + b"\n"
