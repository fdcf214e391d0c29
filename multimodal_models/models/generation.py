"""Text generation for any decoder: greedy, sampling (temperature, top-k, top-p), beam search,
a token iterator for streaming, stop tokens and stop strings, a token budget.

A model takes part through a `DecodingSession`: `prefill()` runs the prompt and returns the
next-token logits, `step(token)` feeds one token and returns the next logits, `reorder()`
keeps some rows of the batch (beam search). Sessions may use a KV cache or recompute the
whole sequence each step (to measure what the cache buys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy (or beam search when num_beams > 1)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    stop: tuple[str, ...] = ()  # stop strings: generation ends when the text contains one (it is cut off)
    seed: int | None = None  # for sampling; None draws from torch's global generator
    use_cache: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1 (1: no beam search), got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search and cannot be combined with do_sample")


class DecodingSession(Protocol):
    def prefill(self) -> torch.Tensor: ...  # (B, V) logits of the token after the prompt

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...  # tokens (B,) -> (B, V)

    def reorder(self, index: torch.Tensor) -> None: ...


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (always keeping the most likely token)."""
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sampling_generator(config: GenerationConfig) -> torch.Generator | None:
    """The random generator of one sequence's samples: seeded by config.seed, else None (torch's global one)."""
    if config.do_sample and config.seed is not None:
        return torch.Generator().manual_seed(config.seed)
    return None


def pick_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """The next token from one sequence's logits (V,): the most likely, or sampled (temperature, top-k,
    top-p) with `generator`. Every decoding loop picks with this, so that a sequence decoded in a batch
    (the server's) picks as it does alone."""
    if config.do_sample:
        probs = filter_logits(logits.float(), config).softmax(-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return int(logits.argmax())


def generate_tokens(session: DecodingSession, config: GenerationConfig, stop_ids: set[int]) -> Iterator[int]:
    """Yield new token ids one by one (batch of one): greedy or sampled, until a stop token or the budget."""
    config.validate()
    generator = sampling_generator(config)
    logits = session.prefill()
    for done in range(1, config.max_new_tokens + 1):
        token = pick_token(logits[0], config, generator)
        if token in stop_ids:
            return
        yield token
        if done < config.max_new_tokens:  # the budget's last token needs no forward pass after it
            logits = session.step(torch.tensor([token], device=logits.device))


def beam_search(session: DecodingSession, config: GenerationConfig, stop_ids: set[int]) -> list[int]:
    """The best sequence by total log-probability / length ** length_penalty (batch of one).

    Each step expands every live beam, keeps the `num_beams` best continuations that do
    not stop, and sets aside the ones that do. The search ends when the budget is spent or
    no live beam can still beat the best finished one (log-probabilities only fall).
    """
    return beam_search_batch(session, config, stop_ids, searches=1)[0]


@dataclass
class _Search:
    """One prompt's beam search: its live beams (the session's rows for it, in order) and what ended."""

    sequences: list[list[int]]
    scores: torch.Tensor  # (beams,) float32 total log-probabilities
    finished: list[tuple[float, list[int]]]
    alive: bool = True


def beam_search_batch(session: DecodingSession, config: GenerationConfig, stop_ids: set[int], *,
                      searches: int) -> list[list[int]]:
    """`beam_search` for `searches` prompts at once (the session's rows after prefill, one per prompt),
    each search exactly as it runs alone. Every step feeds all live beams of all searches as one
    batch; a search that ends gives up its rows."""
    config.validate()
    width = config.num_beams

    def normalised(score: float, length: int) -> float:
        return score / max(length, 1) ** config.length_penalty

    beams = [_Search([[]], torch.zeros(1), []) for _ in range(searches)]
    logits = session.prefill()
    if logits.shape[0] != searches:
        raise ValueError(f"the session has {logits.shape[0]} prompts; {searches} searches were asked for")
    for _step in range(config.max_new_tokens):
        log_probs = logits.float().log_softmax(-1)
        vocab = log_probs.shape[-1]
        kept_rows, next_tokens, end = [], [], 0
        for search in (s for s in beams if s.alive):
            first, end = end, end + len(search.sequences)  # this search's rows in the session
            candidates = search.scores[:, None].to(logits.device) + log_probs[first:end]  # (beams, V)
            top_scores, top_index = candidates.flatten().topk(min(2 * width, candidates.numel()))
            rows, tokens, kept = [], [], []
            for score, flat in zip(top_scores.tolist(), top_index.tolist()):
                row, token = divmod(flat, vocab)
                if token in stop_ids:
                    search.finished.append((normalised(score, len(search.sequences[row])), search.sequences[row]))
                elif len(rows) < width:
                    rows.append(row)
                    tokens.append(token)
                    kept.append(score)
            if not rows:
                search.alive = False
                continue
            search.sequences = [search.sequences[r] + [t] for r, t in zip(rows, tokens)]
            search.scores = torch.tensor(kept)
            best_alive = max(normalised(s, len(q)) for s, q in zip(kept, search.sequences))
            if len(search.finished) >= width and max(f for f, _ in search.finished) >= best_alive:
                search.alive = False
            else:
                kept_rows += [first + r for r in rows]
                next_tokens += tokens
        if not kept_rows:
            break
        session.reorder(torch.tensor(kept_rows, device=logits.device))
        logits = session.step(torch.tensor(next_tokens, device=logits.device))
    best = []
    for search in beams:
        search.finished.extend((normalised(float(s), len(q)), q) for s, q in zip(search.scores, search.sequences))
        best.append(max(search.finished, key=lambda item: item[0])[1])
    return best


def decode_tokens(session: DecodingSession, config: GenerationConfig, stop_ids: set[int]) -> Iterator[int]:
    """The new token ids as `config` decodes them: one by one (greedy or sampled), or, with
    num_beams > 1, the best beam, found in full when the first token is asked for."""
    if config.num_beams > 1:
        yield from beam_search(session, config, stop_ids)
    else:
        yield from generate_tokens(session, config, stop_ids)


class TextStream:
    """Turn a token iterator into text deltas, honouring stop strings.

    Text that could be the start of a stop string is held back until it is known not to
    be one, so the caller never sees any part of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (may be empty)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[: len(text) - hold])

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return "" if self.stopped else self._emit(self.decode(self.ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):  # detokenisation rewrote earlier text; show only what is new
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            self.emitted = text[:common]
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


def stream_text(tokens: Iterator[int], decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Text pieces as tokens are generated; ends at a stop string."""
    stream = TextStream(decode, stop)
    for token in tokens:
        delta = stream.push(token)
        if delta:
            yield delta
        if stream.stopped:
            return
    rest = stream.finish()
    if rest:
        yield rest
