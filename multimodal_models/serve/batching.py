"""The server's generation engine: continuous batching, as vLLM and TGI do it.

A request first takes a slot in the decode batch (`Admission`: at most `max_batch_size`
sequences decode at once; more wait in a queue of at most `max_queue`, and only a request that
finds the queue full gets 429). A worker thread reads its images and prompt (`GenerationJob.start`);
then the engine's prefill thread runs its prompt, together with any others waiting to be run
(`VisionLanguageModel.prefill_batch`: each prompt as alone), picks its first token, and hands the
sequence to the decode thread, where it joins the batch at the next step boundary. The decode
thread decodes every sequence of the batch in one forward pass per step
(`VisionLanguageModel.decode_step` over a `BatchedKVCache`, each row at its own length and
position); a sequence that ends leaves the batch. Prefill and decoding run side by side on two
threads (two cores). Each sequence picks its tokens with its
own generator (`Sequence.accept`), so that its answer is the one it gets alone. Tokens go to the
request through a `TokenFeed`; the request turns them into text (stop strings, the output filter)
and may end the sequence (a stop string, a client gone), which leaves the batch at the next step.

A model type that cannot be decoded in a batch (`can_decode_in_batches()` False: a block hook with
state the batch cannot pad) is decoded in the same engine one sequence at a time, each its own
forward pass per step (its prompt run alone in the worker thread); /health and the log say so. Beam search (captions) runs whole in the
worker thread, with its own batch of beams.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.generation import GenerationConfig, pick_token
from ..models.layers import KVCache
from ..models.vlm import VLMSession
from .errors import APIError

log = logging.getLogger("multimodal_models.serve")


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TokenFeed:
    """One sequence's tokens, handed from the engine thread to its request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._tokens: deque[int] = deque()
        self._waiter: asyncio.Future | None = None
        self.reason: str | None = None  # why generation ended: "stop" | "length" | "timeout" | "cancelled" | "error"

    def put(self, token: int) -> None:
        with self._lock:
            self._tokens.append(token)
            self._wake()

    def end(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self._wake()

    def take(self) -> int | None:
        """The next token, or None when there is none yet (or any more: see `reason`)."""
        with self._lock:
            return self._tokens.popleft() if self._tokens else None

    async def wait(self, timeout: float) -> None:
        """Until there is a token or an end (or `timeout` seconds pass)."""
        with self._lock:
            if self._tokens or self.reason is not None:
                return
            future = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(max(timeout, 0), _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            with self._lock:
                if self._waiter is future:
                    self._waiter = None

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # the request's event loop is closed: nobody is waiting any more
                pass


class Slot:
    """A place in the decode batch, given back once (`release`, from any thread)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._held = True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._admission._give_back()


class Admission:
    """At most `slots` generations at once; up to `queue` more wait for a slot, first come first served."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self._free = slots
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_use(self) -> int:
        return self.slots - self._free

    async def acquire(self, timeout: float) -> Slot:
        """A slot; 429 when the queue is full, 504 when none comes free within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return Slot(self)
            if len(self._waiting) >= self.queue:
                raise APIError(429, f"the server is busy ({self.slots} generations running, the most it runs at once, "
                                    f"and {len(self._waiting)} waiting, the most it queues); retry in a moment",
                               code="server_busy", headers={"retry-after": "1"})
            entry = (loop, loop.create_future())
            self._waiting.append(entry)
        try:
            await asyncio.wait_for(entry[1], max(timeout, 0))
        except BaseException as exc:  # timed out or the client went away: leave the queue, or pass on a slot given
            with self._lock:
                granted = entry not in self._waiting
                if not granted:
                    self._waiting.remove(entry)
            if granted:
                self._give_back()
            if isinstance(exc, TimeoutError):
                raise APIError(504, "the request waited for a free generation slot past the server's time limit; "
                                    "retry later", code="timeout") from None
            raise
        return Slot(self)

    def _give_back(self) -> None:
        with self._lock:
            while self._waiting:  # hand the slot straight to the longest waiting request
                loop, future = self._waiting.popleft()
                try:
                    loop.call_soon_threadsafe(_resolve, future)
                    return
                except RuntimeError:  # its event loop is closed
                    continue
            self._free += 1


@dataclass
class Sequence:
    """One request's decoding state in the engine: its prompt (to run) or its session (a model decoded one
    sequence at a time), how it picks tokens, where they go."""

    prompt: list[int]
    pixels: torch.Tensor | None
    session: VLMSession | None  # its own prompt run and KV cache (a model decoded one sequence at a time)
    config: GenerationConfig
    stop_ids: set[int]
    generator: torch.Generator | None
    feed: TokenFeed
    deadline: float
    slot: Slot
    last: int = -1  # the token to feed next
    produced: int = 0
    cancelled: bool = False  # set by the request (it ended, or its client is gone): leaves at the next step
    ended: bool = field(default=False, repr=False)
    prefilled: tuple[KVCache, int] | None = field(default=None, repr=False)  # its prompt's cache and row there

    def accept(self, logits: torch.Tensor, greedy: int | None = None) -> bool:
        """Pick the next token from this sequence's logits (V,) (greedy: the argmax, already taken) and
        hand it on; False when the sequence has ended (a stop token, its budget)."""
        token = greedy if greedy is not None and not self.config.do_sample else pick_token(logits, self.config,
                                                                                            self.generator)
        if token in self.stop_ids:
            return self.end("stop")
        self.feed.put(token)
        self.produced += 1
        self.last = token
        if self.produced >= self.config.max_new_tokens:
            return self.end("length")
        return True

    def end(self, reason: str) -> bool:
        self.ended = True
        self.feed.end(reason)
        self.slot.release()
        return False


class BatchEngine:
    """The two threads of one model's generations (see the module): the prefill thread runs the prompts
    waiting, together; the decode thread decodes all running sequences, step by step."""

    def __init__(self, model, *, max_batch_size: int, max_queue: int,
                 observe_step: Callable[[int], None] | None = None):
        self.model = model
        self.batched = bool(model.can_decode_in_batches())
        self.admission = Admission(max_batch_size, max_queue)
        self.observe_step = observe_step
        self.rows: list[Sequence] = []  # the batch, in the cache's row order (decode thread only)
        self.solo: list[Sequence] = []  # sequences decoded one at a time (a model that cannot batch)
        self.cache = model.decoder.new_batched_cache() if self.batched else None
        self._joining: list[Sequence] = []  # sequences whose prompts have run, to join at the next step
        self._prompts: list[Sequence] = []  # sequences whose prompts wait to be run
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._prefill_thread: threading.Thread | None = None
        self._stopping = False
        if self.batched:
            log.info("generation: continuous batching, up to %d sequences per decoding step, %d more queued",
                     max_batch_size, max_queue)
        else:
            log.warning("generation: %s cannot decode sequences in a batch (its block_hook keeps state the batch "
                        "cannot pad); decoding one sequence at a time, up to %d at once, %d more queued",
                        type(model).__name__, max_batch_size, max_queue)

    @property
    def mode(self) -> str:
        return "batched" if self.batched else "one sequence at a time"

    @property
    def size(self) -> int:
        """Sequences decoding now."""
        return len(self.rows) + len(self.solo)

    def submit(self, sequence: Sequence) -> None:
        """Take a sequence (any thread): its prompt is run with the others waiting (or, decoded one at a
        time, was run already), then it joins the batch at the next step boundary."""
        with self._wake:
            if self._stopping:
                sequence.end("cancelled")
                return
            if sequence.session is None:
                self._prompts.append(sequence)
            else:
                self._joining.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="multimodal-decode", daemon=True)
                self._thread.start()
            if self._prefill_thread is None and self.batched:
                self._prefill_thread = threading.Thread(target=self._prefill, name="multimodal-prefill", daemon=True)
                self._prefill_thread.start()
            self._wake.notify_all()

    def close(self) -> None:
        """Stop the thread (the next sequence to join starts it again); sequences still decoding end as
        cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            threads = (self._thread, self._prefill_thread)
        for thread in threads:
            if thread is not None:
                thread.join(10)
        with self._wake:
            for sequence in self._prompts + self._joining + self.rows + self.solo:
                if not sequence.ended:
                    sequence.end("cancelled")
            self._prompts, self._joining, self.rows, self.solo = [], [], [], []
            if self.batched:
                self.cache = self.model.decoder.new_batched_cache()
            self._thread, self._prefill_thread, self._stopping = None, None, False

    # -- the prefill thread ----------------------------------------------------------------------

    def _prefill(self) -> None:
        """Run the prompts waiting, together (those whose images have the same pixel size), pick their first
        tokens, and hand them to the decode thread."""
        with torch.no_grad():
            while True:
                with self._wake:
                    while not (self._prompts or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        return
                    waiting, self._prompts = self._prompts, []
                groups: dict[tuple, list[Sequence]] = {}
                for sequence in waiting:
                    if sequence.cancelled:
                        sequence.end("cancelled")
                    else:
                        shape = () if sequence.pixels is None else tuple(sequence.pixels.shape[1:])
                        groups.setdefault(shape, []).append(sequence)
                for group in groups.values():
                    try:
                        self._prefill_group(group)
                    except Exception:
                        log.exception("running prompts failed; their generations end with an error")
                        for sequence in group:
                            if not sequence.ended:
                                sequence.end("error")

    def _prefill_group(self, group: list[Sequence]) -> None:
        room = max(s.config.max_new_tokens for s in group) + 1
        cache, first = self.model.prefill_batch([s.prompt for s in group], [s.pixels for s in group], room=room)
        joining = []
        for row, sequence in enumerate(group):
            sequence.pixels = None
            if sequence.accept(first[row]):  # else its first token ended it
                sequence.prefilled = (cache, row)
                joining.append(sequence)
        with self._wake:
            self._joining.extend(joining)
            self._wake.notify_all()

    # -- the decode thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not (self._joining or self.rows or self.solo or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        return
                    joining, self._joining = self._joining, []
                try:
                    self._step(joining)
                except Exception:
                    log.exception("a decoding step failed; its sequences end with an error")
                    for sequence in joining + self.rows + self.solo:
                        if not sequence.ended:
                            sequence.end("error")
                    self.rows, self.solo = [], []
                    self.cache = self.model.decoder.new_batched_cache() if self.batched else None

    def _step(self, joining: list[Sequence]) -> None:
        for sequence in joining:
            if sequence.cancelled:
                sequence.end("cancelled")
            elif self.batched:
                cache, row = sequence.prefilled
                self.cache.add(cache, row, len(sequence.prompt))
                sequence.prefilled = None  # its rows live in the batch now
                self.rows.append(sequence)
            else:
                self.solo.append(sequence)
        now = time.monotonic()
        for index in reversed(range(len(self.rows))):
            sequence = self.rows[index]
            if sequence.cancelled or now > sequence.deadline:
                sequence.end("cancelled" if sequence.cancelled else "timeout")
                self._remove(index)
        if self.rows:
            if self.observe_step is not None:
                self.observe_step(len(self.rows))
            tokens = torch.tensor([s.last for s in self.rows], device=self.model.device)
            logits = self.model.decode_step(tokens, self.cache)
            greedy = logits.argmax(-1).tolist()
            done = [i for i, s in enumerate(self.rows) if not s.accept(logits[i], greedy[i])]
            for index in reversed(done):
                self._remove(index)
        for sequence in list(self.solo):
            if sequence.cancelled or now > sequence.deadline:
                sequence.end("cancelled" if sequence.cancelled else "timeout")
            else:
                if self.observe_step is not None:
                    self.observe_step(1)
                logits = sequence.session.step(torch.tensor([sequence.last], device=self.model.device))
                if sequence.accept(logits[0]):
                    continue
            self.solo.remove(sequence)

    def _remove(self, index: int) -> None:
        """Row `index` leaves the batch (the last row moves into its place, in the cache as here)."""
        self.cache.remove(index)
        self.rows[index] = self.rows[-1]
        self.rows.pop()
