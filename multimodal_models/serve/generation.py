"""One request's text generation: its prompt, its tokens turned into text, its end.

`GenerationJob.start` (in a worker thread) encodes the prompt and the images, runs the prompt into
the job's own KV cache and picks the first token; the rest of the tokens come from the batching
engine (`batching.py`), which decodes the job's `Sequence` side by side with the others and hands
its tokens over in a `TokenFeed`. The request turns them into text (`next_piece`, which never waits
for the model; `wait` does, without a thread) and stops the job between tokens: at a stop token or
string, at its token budget, at its deadline, when its client is gone, or when the output filter
refuses it. Nothing is shared between jobs but the model's read-only weights and the engine's batch,
in which each sequence has its own rows, so two streams never mix.

`OutputFilter` is the output hook: a blocklist of words or phrases (case-insensitive,
whole words) replaced or refusing the whole answer, then an optional callable. Streamed
text is held back while it could still become a blocked phrase, so a blocked word is
never sent, not even in part.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.generation import GenerationConfig, TextStream, beam_search, sampling_generator
from ..models.vlm import VLMSession
from .batching import Sequence, Slot, TokenFeed
from .errors import APIError
from .settings import Settings

REFUSAL = "the response was withheld by the server's output filter"


class OutputFilter:
    """Blocklist (+ hook) over generated text. `apply(text)` -> filtered text, or None to refuse."""

    def __init__(self, words: tuple[str, ...] = (), action: str = "replace", replacement: str = "***",
                 hook: Callable[[str], str | None] | None = None):
        self.words = tuple(w.lower() for w in words if w)
        self.action = action
        self.replacement = replacement
        self.hook = hook
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self.words else None

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputFilter:
        return cls(settings.blocklist, settings.blocklist_action, settings.blocklist_replacement,
                   settings.output_filter)

    @property
    def active(self) -> bool:
        return self.pattern is not None or self.hook is not None

    def apply(self, text: str) -> str | None:
        if self.pattern is not None:
            if self.action == "refuse":
                if self.pattern.search(text):
                    return None
            else:
                text = self.pattern.sub(self.replacement, text)
        if self.hook is not None:
            result = self.hook(text)
            return None if result is None else str(result)
        return text

    def held_back(self, text: str) -> int:
        """How many trailing characters could still turn into (part of) a blocked phrase."""
        match = re.search(r"\w+$", text)
        trailing_word = len(match.group()) if match else 0
        lower = text.lower()
        prefix = max((k for w in self.words for k in range(1, len(w)) if lower.endswith(w[:k])), default=0)
        return max(trailing_word, prefix)


class FilteredStream:
    """Apply an OutputFilter to text arriving in pieces; emit only what can no longer change."""

    def __init__(self, output_filter: OutputFilter):
        self.filter = output_filter
        self.text = ""
        self.emitted = ""
        self.refused = False

    def push(self, piece: str, *, final: bool = False) -> str:
        if self.refused:
            return ""
        self.text += piece
        if not self.filter.active:
            out, self.emitted = self.text[len(self.emitted):], self.text
            return out
        safe = self.text if final else self.text[: len(self.text) - self.filter.held_back(self.text)]
        filtered = self.filter.apply(safe)
        if filtered is None:
            self.refused = True
            return ""
        if not filtered.startswith(self.emitted):  # a hook rewrote earlier text: send only what is new
            common = 0
            while common < min(len(filtered), len(self.emitted)) and filtered[common] == self.emitted[common]:
                common += 1
            self.emitted = filtered[:common]
        out, self.emitted = filtered[len(self.emitted):], filtered
        return out


@dataclass
class GenerationOptions:
    max_tokens: int | None = None  # None: the server's default, cut to what the context leaves
    temperature: float | None = None  # None: the server's default; 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # None or 0: no top-k filter
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search when decoding greedily (captions: the model's caption_beams); not streamed
    param_prefix: str = ""  # how errors name the request's fields


@dataclass
class GenerationJob:
    model: Any
    settings: Settings
    prompt_tokens: int
    max_new_tokens: int
    feed: TokenFeed  # the tokens, as the engine makes them
    sequence: Sequence | None  # what the engine still decodes (None: it ended at its first token, or beams)
    text: TextStream
    filtered: FilteredStream
    deadline: float
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "content_filter" | "timeout" | "cancelled"
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False
    on_end: Callable[[GenerationJob], None] | None = None  # called once, when the job ends in any way

    @classmethod
    def start(cls, model, messages: list[dict], options: GenerationOptions, settings: Settings,
              deadline: float, *, feed: TokenFeed, slot: Slot, batched: bool = True,
              on_end: Callable[[GenerationJob], None] | None = None) -> GenerationJob:
        """Encode the prompt and read the images: call from a worker thread, holding `slot`. The returned
        job's `sequence`, if any, is for the engine (BatchEngine.submit), which runs its prompt with others
        (batched) and decodes it. Not batched, the prompt runs here, into the job's own KV cache, and
        beam search runs whole here. `messages` hold their images inline ({"type": "image", "image": PIL
        image})."""
        with torch.no_grad():
            template = model.chat_template()
            try:
                encoding = template.encode(messages, add_generation_prompt=True)
            except ValueError as exc:
                raise APIError(400, f"{options.param_prefix}messages: {exc}", param="messages",
                               code="invalid_value") from None
            prompt_tokens = len(encoding.ids)
            context = model.config.decoder.max_length
            room = context - prompt_tokens - 1
            if room < 1:
                raise APIError(400, f"the prompt is {prompt_tokens} tokens (images included); the model reads at most "
                                    f"{context} tokens, with room for the answer. Shorten the messages or send "
                                    "fewer images", param="messages", code="context_length_exceeded")
            max_new = options.max_tokens
            if max_new is None:
                max_new = min(settings.default_max_tokens, room)
            elif max_new > settings.max_tokens_limit:
                raise APIError(400, f"max_tokens is {max_new}; this server allows at most {settings.max_tokens_limit}",
                               param="max_tokens", code="invalid_value")
            elif max_new > room:
                raise APIError(400, f"max_tokens is {max_new}, but the prompt is {prompt_tokens} tokens and the model "
                                    f"reads at most {context}: at most {room} tokens can be generated",
                               param="max_tokens", code="context_length_exceeded")
            temperature = settings.default_temperature if options.temperature is None else options.temperature
            top_p = 1.0 if options.top_p is None else options.top_p
            sample = temperature > 0 and top_p > 0
            config = GenerationConfig(max_new_tokens=max_new, do_sample=sample, temperature=temperature if sample else 1.0,
                                      top_p=top_p if sample else 1.0, top_k=(options.top_k or 0) if sample else 0,
                                      stop=tuple(options.stop), seed=options.seed,
                                      num_beams=1 if sample else options.num_beams)
            config.validate()
            pixels = model._pixels(encoding.images)  # the model's own preprocessing (tiles for Idefics3)
            stop_ids = template.stop_ids()
            session = None
            if config.num_beams > 1 or not batched:  # this job's own KV cache
                session = VLMSession(model, torch.tensor([encoding.ids], device=model.device), pixels, config)
            sequence = None
            if config.num_beams > 1:  # beam search: found whole here, with its own batch of beams
                tokens = beam_search(session, config, stop_ids)
                for token in tokens:
                    feed.put(token)
                feed.end("length" if len(tokens) >= max_new else "stop")
                slot.release()
            else:
                generator = sampling_generator(config)
                if config.do_sample and generator is None:  # unseeded: its own generator all the same
                    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
                sequence = Sequence(encoding.ids, None if session else pixels, session, config, stop_ids, generator,
                                    feed, deadline, slot)
                if session is not None and not sequence.accept(session.prefill()[0]):  # its first token ended it
                    sequence = None
        return cls(model=model, settings=settings, prompt_tokens=prompt_tokens, max_new_tokens=max_new, feed=feed,
                   sequence=sequence, text=TextStream(model.tokenizer.decode, config.stop),
                   filtered=FilteredStream(OutputFilter.from_settings(settings)), deadline=deadline, on_end=on_end)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def wait(self) -> None:
        """Until the engine has made more tokens or ended (or the deadline passes)."""
        await self.feed.wait(self.deadline - time.monotonic())

    def next_piece(self) -> str:
        """Turn the tokens made so far into text to show: "" when there is none yet (then `wait`), or
        the job has ended. Never waits for the model."""
        with self.lock:
            while self.finish_reason is None:
                if self.cancelled:
                    return self._end("cancelled")
                if time.monotonic() > self.deadline:
                    return self._end("timeout")
                token = self.feed.take()
                if token is None:
                    reason = self.feed.reason
                    if reason is None:
                        return ""
                    if reason == "error":
                        self._end("cancelled")
                        raise RuntimeError("the model failed while generating (the server's log has the details)")
                    return self._end(reason, self.text.finish())
                self.completion_tokens += 1
                delta = self.text.push(token)
                if self.text.stopped:  # a stop string
                    return self._end("stop", delta)
                out = self.filtered.push(delta)
                if self.filtered.refused:
                    return self._end("content_filter")
                if out:
                    return out
            return ""

    def _end(self, reason: str, rest: str = "") -> str:
        out = ""
        if reason in ("stop", "length", "timeout"):
            out = self.filtered.push(rest, final=True)
            if self.filtered.refused:
                reason = "content_filter"
        self.finish_reason = reason
        self.cancel()
        self._ended()
        return out

    def _ended(self) -> None:
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)

    def cancel(self) -> None:
        """Tell the engine to stop decoding this job (any thread, never waits): its sequence leaves the
        batch at the next step and gives its slot back."""
        if self.sequence is not None:
            self.sequence.cancelled = True

    def close(self) -> None:
        """Stop the job (from any thread); a piece being turned into text finishes first."""
        self.cancelled = True
        self.cancel()
        with self.lock:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
                self._ended()
