"""Speech to text: an encoder over log-mel features and a text decoder that cross-attends to it
(Whisper's architecture), built from this package's layers.

    model = multimodal_models.load("openai/whisper-tiny")     # a Whisper checkpoint (pretrained/whisper.py)
    model.transcribe("question.wav")                            # -> "What colour is the circle?"
    model.transcribe(["a.flac", "b.mp3"], language="en")        # a batch

The encoder: two 1-D convolutions (the second of stride 2) with GELU over the mel frames, a fixed
position table added, pre-norm transformer blocks, a final LayerNorm. The decoder: token and learned
position embeddings, pre-norm blocks of causal self-attention (KV cache), cross-attention to the
encoder's states (their keys and values computed once per utterance) and the MLP, a final LayerNorm,
and the output projection (tied to the token embedding unless the checkpoint stores its own).

Transcription is greedy and without timestamps, as Whisper's `generate` does it for one window of up
to `chunk_length` seconds: the prompt is the start token, the language token (given, from the
checkpoint's forced decoder ids, or detected from the first step's logits over the language tokens),
the task token and <|notimestamps|>; `suppress_tokens` are never produced, `begin_suppress_tokens`
not as the first token; decoding stops at the end token or after `max_length` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.audio import LogMelFeatures, load_audio
from ..data.hf_tokenizer import HFTokenizer
from .layers import KVCache, TransformerBlock
from .pretrained import PretrainedModel


@dataclass
class SpeechToTextConfig:
    n_mels: int = 80
    width: int = 384
    encoder_depth: int = 4
    encoder_heads: int = 6
    encoder_mlp: int = 1536
    decoder_depth: int = 4
    decoder_heads: int = 6
    decoder_mlp: int = 1536
    vocab_size: int = 51865
    max_source_positions: int = 1500  # encoder states: the mel frames of one window / 2
    max_target_positions: int = 448  # decoder positions (prompt and output together)
    act: str = "gelu"
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # the log-mel features (Whisper's feature extractor settings)
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds in one window
    # generation (generation_config.json's, as Whisper's generate reads them)
    decoder_start_token_id: int = 50258
    eos_token_id: int = 50257
    pad_token_id: int = 50257
    no_timestamps_token_id: int | None = None
    language_tokens: dict[str, int] = field(default_factory=dict)  # "<|en|>" -> id (lang_to_id)
    task_tokens: dict[str, int] = field(default_factory=dict)  # "transcribe" / "translate" -> id (task_to_id)
    is_multilingual: bool | None = None
    forced_decoder_ids: list[list[int | None]] = field(default_factory=list)  # [position, id or None] pairs
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    max_length: int = 448  # new tokens at most (prompt excluded), as generation_config.max_length


class SpeechOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    encoder_states: torch.Tensor  # (B, S, width)


def _whisper_block(width: int, heads: int, mlp: int, act: str, eps: float, cross: bool) -> TransformerBlock:
    block = TransformerBlock(width, heads, mlp, norm="layernorm", norm_eps=eps, act=act,
                             context_dim=width if cross else None)
    block.attn.k = nn.Linear(width, width, bias=False)  # Whisper's key projections have no bias
    if cross:
        block.cross_attn.k = nn.Linear(width, width, bias=False)
    return block


class SpeechEncoder(nn.Module):
    def __init__(self, config: SpeechToTextConfig):
        super().__init__()
        c = config
        self.conv1 = nn.Conv1d(c.n_mels, c.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.width, c.width, kernel_size=3, stride=2, padding=1)
        self.positions = nn.Parameter(torch.zeros(c.max_source_positions, c.width), requires_grad=False)
        self.blocks = nn.ModuleList(_whisper_block(c.width, c.encoder_heads, c.encoder_mlp, c.act, c.norm_eps, False)
                                    for _ in range(c.encoder_depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.frames = 2 * c.max_source_positions

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, n_mels, 2 * max_source_positions) -> states (B, max_source_positions, width)."""
        if features.shape[-1] != self.frames:
            raise ValueError(f"the encoder reads {self.frames} mel frames (one window); got {features.shape[-1]}")
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positions.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SpeechDecoder(nn.Module):
    def __init__(self, config: SpeechToTextConfig):
        super().__init__()
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.positions = nn.Parameter(torch.zeros(c.max_target_positions, c.width))
        self.blocks = nn.ModuleList(_whisper_block(c.width, c.decoder_heads, c.decoder_mlp, c.act, c.norm_eps, True)
                                    for _ in range(c.decoder_depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def cross_keys_values(self, states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's cross-attention keys and values (B, H, S, D) for the encoder's states, computed once."""
        B, S, _ = states.shape
        kv = []
        for block in self.blocks:
            attn = block.cross_attn
            k = attn.k(states).view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v(states).view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
            kv.append((k, v))
        return kv

    def forward(self, ids: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]],
                cache: KVCache | None = None) -> torch.Tensor:
        """ids (B, T) after the `cache.length` cached positions -> logits (B, T, vocab)."""
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.positions.shape[0]:
            raise ValueError(f"the decoder has {self.positions.shape[0]} positions; {start + ids.shape[1]} were needed")
        x = self.embed(ids) + self.positions[start:start + ids.shape[1]].to(self.embed.weight.dtype)
        for i, block in enumerate(self.blocks):
            x = x + block.attn(block.norm1(x), causal=True, cache=cache, layer=i)
            x = x + _cross_attend(block.cross_attn, block.cross_norm(x), *cross[i])
            x = x + block.mlp(block.norm2(x))
        if cache is not None:
            cache.advance(ids.shape[1])
        return self.lm_head(self.norm(x))


def _cross_attend(attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q = attn.q(x).view(B, T, attn.heads, attn.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v)
    return attn.out(y.transpose(1, 2).reshape(B, T, attn.heads * attn.head_dim))


class SpeechToText(PretrainedModel):
    """Whisper-style speech recognition; `transcribe(audio)` gives the text."""

    model_type = "speech_to_text"
    config_class = SpeechToTextConfig

    def __init__(self, config: SpeechToTextConfig):
        super().__init__(config)
        if config.width % config.encoder_heads or config.width % config.decoder_heads:
            raise ValueError(f"width {config.width} must divide into the encoder's {config.encoder_heads} and the "
                             f"decoder's {config.decoder_heads} heads")
        self.encoder = SpeechEncoder(config)
        self.decoder = SpeechDecoder(config)
        self.features = LogMelFeatures(config.n_mels, config.sampling_rate, config.n_fft, config.hop_length,
                                       config.chunk_length)
        if self.features.frames != 2 * config.max_source_positions:
            raise ValueError(f"{config.chunk_length} s of audio make {self.features.frames} mel frames, but the encoder "
                             f"reads {2 * config.max_source_positions} (2 x max_source_positions)")

    # -- the network ------------------------------------------------------------------------------

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features.to(self.device, self.decoder.embed.weight.dtype))

    def forward(self, features: torch.Tensor, decoder_ids: torch.Tensor) -> SpeechOutput:
        """Teacher-forced logits of `decoder_ids` (B, T) given features (B, n_mels, frames)."""
        states = self.encode(features)
        return SpeechOutput(self.decoder(decoder_ids.to(self.device), self.decoder.cross_keys_values(states)), states)

    # -- transcription ----------------------------------------------------------------------------

    def audio_features(self, audio, *, source_rate: int | None = None) -> torch.Tensor:
        """Log-mel features (B, n_mels, frames) of audio files, bytes or arrays (at `source_rate`)."""
        items = audio if isinstance(audio, (list, tuple)) else [audio]
        samples = [load_audio(item, rate=self.config.sampling_rate, source_rate=source_rate,
                              max_seconds=self.config.chunk_length) for item in items]
        return self.features(samples, device=self.device)

    def prompt_ids(self, *, language: str | None = None, task: str | None = None) -> list[int | None]:
        """The decoder's first tokens: start, language (None: to be detected), task, <|notimestamps|>;
        as Whisper's generate builds them from the arguments and generation_config.json."""
        c = self.config
        if c.is_multilingual is False and (language is not None or task is not None):
            raise ValueError("this model is English-only: it takes no language or task")
        prompt: list[int | None] = [c.decoder_start_token_id]
        if language is None and task is None:  # the checkpoint's forced ids, positions 1, 2, ... in order
            for position, token in sorted(c.forced_decoder_ids, key=lambda pair: pair[0]):
                if position != len(prompt):
                    break
                prompt.append(token)
        if language is not None:
            token = self.language_token(language)
            prompt[1:2] = [token]
        elif c.language_tokens and (len(prompt) == 1 or prompt[1] is None):
            prompt[1:2] = [None]  # detected per utterance
        if task is not None:
            if task not in c.task_tokens:
                raise ValueError(f"unknown task {task!r}; this model does {', '.join(sorted(c.task_tokens)) or 'none'}")
            prompt.append(c.task_tokens[task])
        elif language is not None and c.task_tokens and not set(c.task_tokens.values()) & set(prompt):
            prompt.append(c.task_tokens["transcribe"])
        if c.no_timestamps_token_id is not None and prompt[-1] != c.no_timestamps_token_id:
            prompt.append(c.no_timestamps_token_id)
        return prompt

    def language_token(self, language: str) -> int:
        tokens = self.config.language_tokens
        text = language.strip().lower()
        for key in (text, f"<|{text}|>"):
            if key in tokens:
                return tokens[key]
        codes = sorted(t.strip("<|>") for t in tokens)
        raise ValueError(f"unknown language {language!r}; this model knows "
                         + (", ".join(codes) if codes else "none (it is English-only)"))

    @torch.no_grad()
    def generate_ids(self, features: torch.Tensor, *, language: str | None = None, task: str | None = None,
                     max_new_tokens: int | None = None, with_prompts: bool = False):
        """Greedy token ids after the prompt (the end token and padding left off), one list per row;
        with_prompts: (ids, prompts), each row's prompt with its language token filled in."""
        c = self.config
        states = self.encode(features)
        cross = self.decoder.cross_keys_values(states)
        batch = states.shape[0]
        template = self.prompt_ids(language=language, task=task)
        rows = [list(template) for _ in range(batch)]
        if None in template:  # the language of each utterance: the likeliest language token after the start token
            logits = self.decoder(torch.full((batch, 1), c.decoder_start_token_id, device=self.device), cross)[:, -1]
            allowed = torch.full_like(logits, float("-inf"))
            languages = torch.tensor(sorted(c.language_tokens.values()), device=self.device)
            allowed[:, languages] = logits[:, languages]
            detected = allowed.argmax(-1).tolist()
            rows = [[detected[b] if token is None else token for token in row] for b, row in enumerate(rows)]
        prompt = torch.tensor(rows, device=self.device)
        if max_new_tokens is None:  # generation_config.max_length counts the new tokens, the prompt's length added
            total = min(c.max_length + min(c.max_target_positions // 2 - 1, prompt.shape[1]), c.max_target_positions)
            max_new_tokens = max(0, total - prompt.shape[1])
        if prompt.shape[1] + max_new_tokens > c.max_target_positions:
            raise ValueError(f"{prompt.shape[1]} prompt tokens and max_new_tokens {max_new_tokens} exceed the "
                             f"decoder's {c.max_target_positions} positions")
        dtype = self.decoder.embed.weight.dtype
        block = self.decoder.blocks[0].attn
        cache = KVCache(c.decoder_depth, batch, block.kv_heads, block.head_dim, prompt.shape[1] + max_new_tokens,
                        dtype, self.device)
        suppress = torch.tensor(sorted(set(c.suppress_tokens)), dtype=torch.long, device=self.device)
        begin = torch.tensor(sorted(set(c.begin_suppress_tokens)), dtype=torch.long, device=self.device)
        out = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        step_ids = prompt
        for step in range(max_new_tokens):
            logits = self.decoder(step_ids, cross, cache)[:, -1].float()
            if suppress.numel():
                logits[:, suppress] = float("-inf")
            if step == 0 and begin.numel():
                logits[:, begin] = float("-inf")
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, c.pad_token_id), token)
            for b, t in enumerate(token.tolist()):
                if not done[b] and t != c.eos_token_id:
                    out[b].append(t)
            done |= token == c.eos_token_id
            if bool(done.all()):
                break
            step_ids = token[:, None]
        return (out, rows) if with_prompts else out

    def transcribe(self, audio, *, source_rate: int | None = None, language: str | None = None,
                   task: str | None = None, max_new_tokens: int | None = None) -> str | list[str]:
        """The text of one audio (a path, bytes, a file object or an array at `source_rate`), or of each
        in a list. language: a code ("en") or token ("<|en|>"), else the checkpoint's or the detected one;
        task: "transcribe" (default) or "translate" (into English)."""
        results = self.transcribe_with_language(audio, source_rate=source_rate, language=language, task=task,
                                                max_new_tokens=max_new_tokens)
        texts = [text for text, _ in results]
        return texts if isinstance(audio, (list, tuple)) else texts[0]

    def transcribe_with_language(self, audio, *, source_rate: int | None = None, language: str | None = None,
                                 task: str | None = None, max_new_tokens: int | None = None) -> list[tuple[str, str | None]]:
        """(text, language code or None) of each audio (one or a list): the language given or detected."""
        if self.tokenizer is None:
            raise ValueError("the model has no tokenizer (tokenizer.json) to turn tokens into text")
        features = self.audio_features(audio, source_rate=source_rate)
        ids, prompts = self.generate_ids(features, language=language, task=task, max_new_tokens=max_new_tokens,
                                         with_prompts=True)
        codes = {token: name.strip("<|>") for name, token in self.config.language_tokens.items()}
        return [(self.tokenizer.decode(row, skip_special_tokens=True),
                 next((codes[t] for t in prompt if t in codes), None)) for row, prompt in zip(ids, prompts)]

    # -- files ------------------------------------------------------------------------------------

    def attach_preprocessing(self, directory: Path) -> None:
        if HFTokenizer.saved_in(directory):
            self.tokenizer = HFTokenizer.from_folder(directory)
        else:
            super().attach_preprocessing(directory)


def positions_table(length: int, width: int) -> torch.Tensor:
    """Whisper's fixed encoder positions: sin of `width // 2` log-spaced timescales (1 to 10000), then cos."""
    step = math.log(10000) / (width // 2 - 1)
    inverse = torch.exp(-step * torch.arange(width // 2))
    angles = torch.arange(length)[:, None] * inverse[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def random_speech_model(config: SpeechToTextConfig, seed: int = 0) -> SpeechToText:
    """A model of `config` with random weights (std 0.02) and Whisper's encoder position table."""
    torch.manual_seed(seed)
    model = SpeechToText(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
        model.encoder.positions.copy_(positions_table(config.max_source_positions, config.width))
    return model.eval()


__all__ = ["SpeechEncoder", "SpeechDecoder", "SpeechOutput", "SpeechToText", "SpeechToTextConfig", "positions_table",
           "random_speech_model"]
