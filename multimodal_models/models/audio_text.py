"""An audio-text dual encoder (CLAP): sound clips and texts in one embedding space.

    model = multimodal_models.load("laion/clap-htsat-unfused")   # or a folder in that layout
    model.embed_audios(["dog.wav", "rain.flac"])                  # (2, E) unit vectors
    model.embed_texts(["a dog barking", "rain on a roof"])        # (2, E) unit vectors
    model.classify("dog.wav", ["dog", "cat", "rain"])             # zero-shot, "This is a sound of {}."

Three parts, each computing what transformers' ClapFeatureExtractor / ClapModel compute:

- `AudioFeatureExtractor`: waveform -> log-mel frames (B, C, T, mel_bins) and which clips were
  longer than the window (`is_longer`). Clips shorter than `max_length_s` are repeated and/or
  zero-padded ("repeatpad", "repeat", "pad"); longer ones are cut ("rand_trunc": one random window,
  Slaney mel filters) or, with "fusion" (HTK mel filters), turned into 4 spectrograms: the whole
  clip shrunk to the window, and one random window from each third of it (a short clip: 4 copies).
- the audio tower: HTSAT (`htsat.py`), a Swin Transformer over the folded spectrogram;
- the text tower: RoBERTa (`RobertaEncoder`: post-norm blocks, positions counted from the pad
  id, the first token through a tanh "pooler");

each tower followed by a projection (linear, ReLU, linear) and L2-normalised. Logits are
exp(logit_scale_audio) * cosine.

Random choices: where transformers draws with NumPy's global generator, `AudioFeatureExtractor`
draws from the `rng` it is given (default: a fixed seed, so that a clip's embedding is the same on
every call). The feature extractor of transformers also marks one clip of a batch as "longer" at
random when none is (an artefact of training LAION's fused model), which makes an embedding depend
on the other clips of the batch; ours marks only clips that are longer, unless asked to
(`mark_random_longer=True`, which with `rng=np.random.RandomState(seed)` reproduces transformers'
features after `np.random.seed(seed)`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.audio import load_audio
from ..data.hf_tokenizer import checkpoint_tokenizer
from ..errors import DataFormatError
from .htsat import HTSAT, HTSATConfig
from .inputs import embed_texts, evaluating
from .layers import MLP, Attention, activation
from .pretrained import PretrainedModel

AUDIO_CONFIG_NAME = "preprocessor_config.json"
TRUNCATIONS = ("fusion", "rand_trunc")
PADDINGS = ("repeatpad", "repeat", "pad")
DEFAULT_TEMPLATES = ("This is a sound of {}.",)  # LAION-CLAP's zero-shot prompt
MEL_FLOOR = 1e-10  # power below this is taken as this before the log (-100 dB)


# --- features ------------------------------------------------------------------------------


def hertz_to_mel(freq, scale: str):
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0  # Slaney: linear below 1 kHz, logarithmic above
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * 27.0 / np.log(6.4), mels)


def mel_to_hertz(mels, scale: str):
    mels = np.asarray(mels, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (np.power(10, mels / 2595.0) - 1.0)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filters(n_fft: int, n_mels: int, f_min: float, f_max: float, rate: int, kind: str) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters. kind "htk": HTK mel scale, peak 1 (torchaudio's
    default); "slaney": Slaney's mel scale, each filter scaled to unit area (librosa's default)."""
    points = mel_to_hertz(np.linspace(hertz_to_mel(f_min, kind), hertz_to_mel(f_max, kind), n_mels + 2), kind)
    bins = np.linspace(0, rate // 2, n_fft // 2 + 1)
    slopes = points[None, :] - bins[:, None]
    gaps = np.diff(points)
    filters = np.maximum(0.0, np.minimum(-slopes[:, :-2] / gaps[:-1], slopes[:, 2:] / gaps[1:]))
    if kind == "slaney":
        filters *= (2.0 / (points[2 : n_mels + 2] - points[:n_mels]))[None, :]
    return filters


@dataclass
class AudioFeatureExtractor:
    """The fields of a ClapFeatureExtractor's preprocessor_config.json that change the features."""

    feature_size: int = 64  # mel bins
    sampling_rate: int = 48_000
    hop_length: int = 480
    max_length_s: int = 10  # the window the model reads; longer clips are cut or fused
    fft_window_size: int = 1024
    frequency_min: float = 0.0
    frequency_max: float = 14_000.0
    truncation: str = "fusion"  # "fusion" | "rand_trunc"
    padding: str = "repeatpad"  # "repeatpad" | "repeat" | "pad"
    extra: dict[str, Any] = field(default_factory=dict)  # the file's other keys, written back unchanged

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {self.truncation!r}; expected one of {TRUNCATIONS}")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; expected one of {PADDINGS}")
        if self.frequency_max > self.sampling_rate / 2:
            raise ValueError(f"frequency_max {self.frequency_max} is above the Nyquist frequency of "
                             f"{self.sampling_rate} Hz audio")
        kind = "htk" if self.truncation == "fusion" else "slaney"
        self._filters = mel_filters(self.fft_window_size, self.feature_size, self.frequency_min, self.frequency_max,
                                    self.sampling_rate, kind)
        n = self.fft_window_size
        self._window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic Hann

    @property
    def max_samples(self) -> int:
        return int(self.max_length_s * self.sampling_rate)

    @property
    def frames(self) -> int:
        """Frames of one window: what the model reads along time."""
        return self.max_samples // self.hop_length + 1

    @property
    def channels(self) -> int:
        return 4 if self.truncation == "fusion" else 1

    # -- files ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config: dict, source: str | os.PathLike = "preprocessor_config.json") -> AudioFeatureExtractor:
        kind = config.get("feature_extractor_type", "ClapFeatureExtractor")
        if kind != "ClapFeatureExtractor":
            raise DataFormatError(source, f"a {kind}, not a ClapFeatureExtractor", field="feature_extractor_type")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {name: config[name] for name in names if name in config}
        extra = {key: value for key, value in config.items() if key not in names}
        try:
            return cls(**values, extra=extra)
        except (ValueError, TypeError) as exc:
            raise DataFormatError(source, str(exc)) from None

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        derived = {"feature_extractor_type": "ClapFeatureExtractor", "nb_max_samples": self.max_samples,
                   "nb_frequency_bins": self.fft_window_size // 2 + 1}
        return {**self.extra, **derived, **values}

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / AUDIO_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    # -- features ------------------------------------------------------------------------

    def log_mel(self, waveform: np.ndarray, filters: np.ndarray | None = None) -> np.ndarray:
        """(samples,) -> (frames, mel_bins) float32 power in dB: centred frames (reflect-padded by
        half a window), periodic Hann window, |rfft|^2, mel filters, 10 log10(max(1e-10, .))."""
        filters = self._filters if filters is None else filters
        n, hop = self.fft_window_size, self.hop_length
        padded = np.pad(np.asarray(waveform, dtype=np.float64), (n // 2, n // 2), mode="reflect")
        count = 1 + (len(padded) - n) // hop
        frames = np.lib.stride_tricks.as_strided(padded, (count, n), (padded.strides[0] * hop, padded.strides[0]))
        spectrum = np.fft.rfft(frames * self._window, axis=1).astype(np.complex64)  # as transformers keeps it
        power = np.abs(spectrum, dtype=np.float64) ** 2
        mel = np.maximum(MEL_FLOOR, power @ filters)
        return (10.0 * np.log10(mel)).astype(np.float32)

    def clip_features(self, waveform: np.ndarray, rng) -> tuple[np.ndarray, bool]:
        """One mono clip -> (C, frames, mel_bins) and whether it was longer than the window."""
        waveform = np.asarray(waveform, dtype=np.float64)
        if waveform.ndim != 1:
            raise ValueError(f"expected a mono waveform (samples,), got shape {waveform.shape}")
        if waveform.size == 0:
            raise ValueError("empty waveform (no samples)")
        limit = self.max_samples
        if len(waveform) > limit:
            if self.truncation == "rand_trunc":
                start = _randint(rng, 0, len(waveform) - limit + 1)
                return self.log_mel(waveform[start : start + limit])[None], True
            mel = self.log_mel(waveform)
            chunk, total = self.frames, mel.shape[0]
            if chunk == total:  # longer by less than a hop: the whole clip is one window
                return np.stack([mel] * 4), False
            return self._fused(mel, total, chunk, rng), True
        if len(waveform) < limit:
            if self.padding == "repeat":
                waveform = np.tile(waveform, limit // len(waveform) + 1)[:limit]
            elif self.padding == "repeatpad":
                waveform = np.tile(waveform, limit // len(waveform))
            waveform = np.pad(waveform, (0, limit - len(waveform)))
        mel = self.log_mel(waveform)
        return (np.stack([mel] * 4) if self.truncation == "fusion" else mel[None]), False

    def _fused(self, mel: np.ndarray, total: int, chunk: int, rng) -> np.ndarray:
        """The whole clip shrunk to `chunk` frames (bilinear), then a random window from each third."""
        thirds = np.array_split(np.arange(total - chunk + 1), 3)
        thirds = [third if len(third) else [0] for third in thirds]
        starts = [rng.choice(third) for third in thirds]
        shrunk = F.interpolate(torch.from_numpy(mel)[None, None], size=[chunk, mel.shape[1]], mode="bilinear",
                               align_corners=False)[0, 0].numpy()
        return np.stack([shrunk, *(mel[start : start + chunk] for start in starts)])

    def __call__(self, waveforms: Sequence[np.ndarray], *, rng=None,
                 mark_random_longer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono waveforms at `sampling_rate` -> features (B, C, frames, mel_bins) float32 and
        is_longer (B,) bool. rng: a numpy Generator or RandomState for the random windows of long
        clips (default: seeded, deterministic). mark_random_longer: as transformers, mark one clip
        at random as longer when none is (fusion only)."""
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        rng = np.random.default_rng(0) if rng is None else rng
        clips = [self.clip_features(w, rng) for w in waveforms]
        if not clips:
            raise ValueError("no audio given (empty list)")
        longer = [is_longer for _, is_longer in clips]
        if mark_random_longer and self.truncation == "fusion" and not any(longer):
            longer[_randint(rng, 0, len(longer))] = True
        features = torch.from_numpy(np.stack([mel for mel, _ in clips]).astype(np.float32))
        return features, torch.tensor(longer)


def _randint(rng, low: int, high: int) -> int:
    """An integer in [low, high) from a Generator (integers) or a RandomState / np.random (randint)."""
    return int(rng.integers(low, high) if hasattr(rng, "integers") else rng.randint(low, high))


def as_waveform(audio, sampling_rate: int, given_rate: int | None = None) -> np.ndarray:
    """An audio file (path, bytes or binary file object: WAV, FLAC, MP3, OGG) or an array of samples
    (at `given_rate`, default the model's) -> float32 mono samples at `sampling_rate` (data/audio.py:
    channels mixed down, resampled with soxr, broken or over-long sources refused by name)."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return load_audio(audio, rate=sampling_rate, source_rate=given_rate or sampling_rate)
    return load_audio(audio, rate=sampling_rate, source_rate=given_rate)


# --- the text tower: RoBERTa ---------------------------------------------------------------


@dataclass
class RobertaConfig:
    vocab_size: int = 50265
    max_positions: int = 514  # rows of the position table (positions start after the pad id)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    act: str = "gelu"
    norm_eps: float = 1e-12
    pad_token_id: int = 1
    type_vocab_size: int = 1

    @property
    def max_length(self) -> int:
        """The longest text in tokens (special tokens included)."""
        return self.max_positions - self.pad_token_id - 1


class PostNormBlock(nn.Module):
    """BERT's block: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.attn = Attention(config.width, config.heads)
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config.width, config.mlp_hidden, config.act)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask=mask))
        return self.norm2(x + self.mlp(x))


class TextTowerOutput(NamedTuple):
    tokens: torch.Tensor  # (B, T, C)
    pooled: torch.Tensor  # (B, C): tanh(dense(first token))


class RobertaEncoder(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        self.type_embedding = nn.Embedding(config.type_vocab_size, config.width)
        self.embed_norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.blocks = nn.ModuleList(PostNormBlock(config) for _ in range(config.depth))
        self.pooler = nn.Linear(config.width, config.width)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """RoBERTa's position ids: pad_id + 1, pad_id + 2, ... on real tokens, pad_id on pads."""
        real = ids.ne(self.config.pad_token_id).long()
        return torch.cumsum(real, dim=1) * real + self.config.pad_token_id

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextTowerOutput:
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than the encoder's {self.config.max_length}")
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        x = self.token_embedding(ids) + self.type_embedding.weight[0] + self.position_embedding(self.positions(ids))
        x = self.embed_norm(x)
        keys = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, keys)
        return TextTowerOutput(x, torch.tanh(self.pooler(x[:, 0])))


# --- the model -----------------------------------------------------------------------------


@dataclass
class AudioTextConfig:
    audio: HTSATConfig = field(default_factory=HTSATConfig)
    text: RobertaConfig = field(default_factory=RobertaConfig)
    embed_dim: int = 512
    projection_act: str = "relu"  # between the two linear layers of each projection
    logit_scale_init: float = math.log(1 / 0.07)


class AudioTextOutput(NamedTuple):
    audio_embeds: torch.Tensor  # (B, E), L2-normalised
    text_embeds: torch.Tensor  # (B, E), L2-normalised
    logits_per_audio: torch.Tensor  # (B_audio, B_text): exp(logit_scale_audio) * cosine


class Projection(nn.Module):
    def __init__(self, width: int, dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AudioTextEncoder(PretrainedModel):
    """CLAP: HTSAT audio tower + RoBERTa text tower, each projected into a shared space.
    Its preprocessing travels with it: `tokenizer` and `audio_processor` (AudioFeatureExtractor)."""

    model_type = "audio_text"
    config_class = AudioTextConfig

    def __init__(self, config: AudioTextConfig):
        super().__init__(config)
        self.audio = HTSAT(config.audio)
        self.text = RobertaEncoder(config.text)
        self.audio_projection = Projection(config.audio.out_width, config.embed_dim, config.projection_act)
        self.text_projection = Projection(config.text.width, config.embed_dim, config.projection_act)
        self.logit_scale_audio = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_scale_text = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.audio_processor: AudioFeatureExtractor | None = None

    # -- tensors in, tensors out ---------------------------------------------------------

    def encode_audio(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, C, T, mel_bins), is_longer (B,) -> (B, E) unit vectors."""
        return F.normalize(self.audio_projection(self.audio(features, is_longer).pooled), dim=-1)

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T), attention_mask (B, T) -> (B, E) unit vectors."""
        return F.normalize(self.text_projection(self.text(ids, attention_mask).pooled), dim=-1)

    def logits(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale_audio.exp() * audio_embeds @ text_embeds.t()

    def forward(self, features: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_longer: torch.Tensor | None = None) -> AudioTextOutput:
        audio_embeds = self.encode_audio(features, is_longer)
        text_embeds = self.encode_text(ids, attention_mask)
        return AudioTextOutput(audio_embeds, text_embeds, self.logits(audio_embeds, text_embeds))

    # -- user-level helpers --------------------------------------------------------------

    def audio_features(self, audios: Sequence, *, sampling_rate: int | None = None, rng=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio files or mono arrays (at `sampling_rate`, default the model's) -> (features, is_longer).
        The truncation is the one the model reads whatever the settings say: "fusion" for a fused
        model, "rand_trunc" for an unfused one (as transformers' own tests call laion/clap-htsat-fused)."""
        if self.audio_processor is None:
            raise RuntimeError(f"this {type(self).__name__} has no audio_processor attached; load it from a folder "
                               "with a preprocessor_config.json, or set model.audio_processor")
        extractor = self.audio_processor
        if (extractor.truncation == "fusion") != self.config.audio.fusion:
            # what this model reads: 4 spectrograms (fused) or one; transformers' processor would follow the
            # file and hand a fused model one channel, or an unfused one four (which it cannot run)
            extractor = dataclasses.replace(extractor, truncation="fusion" if self.config.audio.fusion else "rand_trunc")
        waveforms = [as_waveform(a, extractor.sampling_rate, sampling_rate) for a in _audio_list(audios)]
        return extractor(waveforms, rng=rng)

    def embed_audios(self, audios: Sequence, *, sampling_rate: int | None = None, batch_size: int = 16,
                     rng=None) -> torch.Tensor:
        """Audio files (paths or bytes: WAV, FLAC, OGG, MP3; any rate and channel count) or arrays of
        samples (at `sampling_rate`, default the model's) -> (N, E) unit vectors on the CPU.
        A single file or array is taken as a list of one."""
        audios = _audio_list(audios)
        if not audios:
            raise ValueError("no audio given (empty list)")
        rng = np.random.default_rng(0) if rng is None else rng
        out = []
        with evaluating(self):
            for start in range(0, len(audios), batch_size):
                features, longer = self.audio_features(audios[start : start + batch_size], sampling_rate=sampling_rate,
                                                       rng=rng)
                ref = self.logit_scale_audio
                out.append(self.encode_audio(features.to(ref), longer.to(ref.device)).float().cpu())
        return torch.cat(out)

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, E) unit vectors on the CPU."""
        return embed_texts(self, texts, batch_size=batch_size)

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """One classifier vector per label (L, E): the mean of its normalised prompt embeddings, renormalised."""
        if isinstance(labels, str) or not labels:
            raise ValueError("labels must be a non-empty list of label names")
        templates = DEFAULT_TEMPLATES if templates is None else tuple(templates)
        if isinstance(templates, str) or not templates:
            raise ValueError("templates must be a non-empty list such as ['This is a sound of {}.']")
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
        prompts = [template.format(label) for label in labels for template in templates]
        embeds = self.embed_texts(prompts).view(len(labels), len(templates), -1)
        return F.normalize(embeds.mean(dim=1), dim=-1)

    def classify(self, audio, labels: Sequence[str], templates: Sequence[str] | None = None, *,
                 sampling_rate: int | None = None) -> list[tuple[str, float]]:
        """Zero-shot classification of one clip: [(label, probability)] in the order of `labels`, a
        softmax over exp(logit_scale_audio) * cosine (LAION-CLAP's prompt "This is a sound of {}." by default)."""
        classes = self.label_embeddings(labels, templates)
        audio_embed = self.embed_audios([audio], sampling_rate=sampling_rate)
        with evaluating(self):
            ref = self.logit_scale_audio
            logits = self.logits(audio_embed.to(ref), classes.to(ref))[0].float().cpu()
        return [(label, float(p)) for label, p in zip(labels, logits.softmax(dim=-1))]

    # -- our own folder layout -----------------------------------------------------------

    def write_files(self, directory: Path, *, dtype: torch.dtype | None = None) -> None:
        super().write_files(directory, dtype=dtype)
        if self.audio_processor is not None:
            self.audio_processor.save(directory)

    def attach_preprocessing(self, directory: Path) -> None:
        self.tokenizer = checkpoint_tokenizer(directory)
        config = directory / AUDIO_CONFIG_NAME
        if config.is_file():
            self.audio_processor = AudioFeatureExtractor.from_dict(json.loads(config.read_text(encoding="utf-8")),
                                                                   config)


def _audio_list(audios) -> list:
    """One clip (path, bytes, file object, 1-D array or tensor) or a sequence of them -> a list."""
    if isinstance(audios, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(audios, "read"):
        return [audios]
    if isinstance(audios, (np.ndarray, torch.Tensor)) and audios.ndim == 1:
        return [audios]
    return list(audios)
