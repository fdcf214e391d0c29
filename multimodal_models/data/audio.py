"""One safe way to turn an audio reference into mono samples at the rate a model expects.

`load_audio` accepts a path, the encoded bytes of a file, a binary file object, or a NumPy array
of samples with its `source_rate`, and returns float32 mono samples in -1..1 at `rate` Hz:

- files in WAV (RIFF, RF64, WAVE_FORMAT_EXTENSIBLE), FLAC, MP3 and OGG (Vorbis, Opus) are decoded
  by libsndfile through `soundfile` (libsndfile >= 1.1 reads MP3); any other container is refused,
  naming the four;
- any channel count is mixed down to mono (the mean of the channels), any sample rate resampled
  with soxr (band-limited, high quality: a tone keeps its frequency, the length is the duration
  times `rate`);
- limits are checked before decoding the whole file: at most `max_bytes` are read from a file or a
  stream (a pipe, a device or a file object that never ends is refused there, never read to its
  end), the duration in the header must be at most `max_seconds`, and decoding stops at
  `max_seconds` however long the header said the file was.

Every failure (missing file, not a regular file, empty, not audio, an unsupported container,
truncated, too long, too large, non-finite samples) is an `AudioLoadError` (a DataFormatError)
naming the source and, for a limit, the limit and the argument that sets it.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from ..errors import DataFormatError

# 30 minutes: a long voice message or a lecture's chapter; about 115 MB as float32 mono at 16 kHz.
DEFAULT_MAX_SECONDS = 30 * 60.0
# 256 MiB of encoded audio: 25 minutes of 48 kHz 24-bit stereo WAV.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# libsndfile's names of the containers we decode (soundfile.info(...).format)
SUPPORTED_FORMATS = {"WAV": "WAV", "WAVEX": "WAV", "RF64": "WAV", "FLAC": "FLAC", "MP3": "MP3", "OGG": "OGG"}
_BLOCK = 65536  # frames decoded at a time

AudioInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray]


class AudioLoadError(DataFormatError):
    """An audio source could not be read safely (missing, not audio, empty, too long, ...)."""


def load_audio(source: AudioInput, *, rate: int = 16000, source_rate: int | None = None,
               max_seconds: float = DEFAULT_MAX_SECONDS, max_bytes: int = DEFAULT_MAX_BYTES,
               name: str | None = None) -> np.ndarray:
    """Decode `source` into float32 mono samples at `rate` Hz (a 1-D array).

    Args:
        source: a path, the encoded bytes of a file, a binary file object (read from where it
            stands, not closed), or an array of samples: (frames,) or (frames, channels), float in
            -1..1 or integer PCM (scaled by its type's range), with `source_rate`.
        rate: the sample rate the result has (a Whisper model's is 16000).
        source_rate: the sample rate of an array `source`; for files it is read from the file, and
            passing one that differs is an error.
        max_seconds: the longest duration accepted.
        max_bytes: the largest encoded file or stream accepted (read no further than this).
        name: how errors refer to the source (default: the path, or a description).
    """
    label = name or _describe(source)
    if rate <= 0:
        raise ValueError(f"rate must be a positive number of samples per second, got {rate}")
    if isinstance(source, np.ndarray) or _is_tensor(source):
        if source_rate is None:
            raise AudioLoadError(label, "an array of samples needs its sample rate (source_rate=...)")
        samples = _array_samples(np.asarray(source.detach().cpu() if _is_tensor(source) else source), label)
        _check_duration(samples.shape[0], source_rate, max_seconds, label)
        frames, file_rate = samples, int(source_rate)
    else:
        frames, file_rate = read_audio(source, max_seconds=max_seconds, max_bytes=max_bytes, name=label)
        if source_rate is not None and int(source_rate) != file_rate:
            raise AudioLoadError(label, f"the file's sample rate is {file_rate} Hz, not the {source_rate} Hz given")
    return to_mono_rate(frames, file_rate, rate, name=label)


def read_audio(source, *, max_seconds: float = DEFAULT_MAX_SECONDS, max_bytes: int = DEFAULT_MAX_BYTES,
               name: str | None = None) -> tuple[np.ndarray, int]:
    """The samples of an encoded audio file as they are stored: float32 (frames, channels) and the
    file's sample rate. Limits and errors as `load_audio`."""
    import soundfile

    label = name or _describe(source)
    data = _read_bytes(source, max_bytes, label)
    if not data:
        raise AudioLoadError(label, "is empty (0 bytes)")
    try:
        file = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioLoadError(label, f"is not a readable audio file (WAV, FLAC, MP3 or OGG): {_reason(exc)}") from None
    with file:
        kind = SUPPORTED_FORMATS.get(file.format)
        if kind is None:
            raise AudioLoadError(label, f"is {file.format_info or file.format} audio; the formats read are WAV, "
                                        "FLAC, MP3 and OGG")
        if file.samplerate <= 0 or file.channels <= 0:
            raise AudioLoadError(label, f"has a header with {file.samplerate} Hz and {file.channels} channels")
        stated = file.frames
        if stated <= 0 or stated >= 2**62:
            # libsndfile counts a file's frames from its header and size; none means a stream without a length
            if stated <= 0:
                raise AudioLoadError(label, "holds no audio (0 samples)")
            raise AudioLoadError(label, "has no length in its header (an endless stream); the files read have one")
        _check_duration(stated, file.samplerate, max_seconds, label)
        limit = int(max_seconds * file.samplerate)  # the header may lie: decoding stops at the limit anyway
        blocks, total = [], 0
        try:
            while True:
                block = file.read(min(_BLOCK, limit + 1 - total), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                blocks.append(block)
                total += block.shape[0]
                if total > limit:
                    _check_duration(total, file.samplerate, max_seconds, label)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioLoadError(label, f"is truncated or corrupt {kind} audio: {_reason(exc)}") from None
        if total == 0:
            raise AudioLoadError(label, f"holds no audio (its header promises {stated} samples, none could be decoded)")
        # a cut-off file decodes to less than its header promises (MP3's count is its Xing/VBR header's
        # or an estimate from the bitrate, hence the 1% allowance)
        short = _wav_missing_bytes(data) if kind == "WAV" else stated - total
        if short > (0.01 * stated if kind == "MP3" else 0):
            raise AudioLoadError(label, f"is truncated {kind} audio: its header promises "
                                        + (f"{short} more bytes of samples than the file holds" if kind == "WAV"
                                           else f"{stated} samples, only {total} could be decoded"))
        samples = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        if not np.isfinite(samples).all():
            raise AudioLoadError(label, "holds samples that are not finite numbers (NaN or infinity)")
        return samples, int(file.samplerate)


def to_mono_rate(samples: np.ndarray, source_rate: int, rate: int, *, name: str = "<audio>") -> np.ndarray:
    """(frames,) or (frames, channels) samples at `source_rate` -> float32 mono at `rate` (soxr, high quality)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float64).astype(np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate <= 0:
        raise AudioLoadError(name, f"sample rate must be positive, got {source_rate}")
    if int(source_rate) != int(rate):
        import soxr

        samples = soxr.resample(samples, int(source_rate), int(rate), quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(samples)


def duration_seconds(samples: np.ndarray, rate: int) -> float:
    return float(np.asarray(samples).shape[0]) / rate


# -- inside -----------------------------------------------------------------------------------


def _is_tensor(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _array_samples(array: np.ndarray, label: str) -> np.ndarray:
    if array.ndim not in (1, 2) or array.ndim == 2 and array.shape[1] == 0:
        raise AudioLoadError(label, f"an array of samples must be (frames,) or (frames, channels), got shape "
                                    f"{tuple(array.shape)}")
    if array.shape[0] == 0:
        raise AudioLoadError(label, "holds no audio (0 samples)")
    if array.dtype.kind == "f":
        samples = array.astype(np.float32)
        if not np.isfinite(samples).all():
            raise AudioLoadError(label, "holds samples that are not finite numbers (NaN or infinity)")
        return samples
    if array.dtype.kind == "i":
        return (array.astype(np.float64) / float(-np.iinfo(array.dtype).min)).astype(np.float32)
    if array.dtype.kind == "u":
        middle = (np.iinfo(array.dtype).max + 1) / 2
        return ((array.astype(np.float64) - middle) / middle).astype(np.float32)
    raise AudioLoadError(label, f"an array of samples must hold numbers, not {array.dtype}")


def _check_duration(frames: int, rate: int, max_seconds: float, label: str) -> None:
    if frames > max_seconds * rate:
        raise AudioLoadError(label, f"is {frames / rate:.1f} s long; the limit is {max_seconds:g} s (max_seconds)")


def _read_bytes(source, max_bytes: int, label: str) -> bytes:
    """At most max_bytes of the source; one byte more is an error (so an endless stream stops there)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise AudioLoadError(label, f"is {len(data)} bytes; the limit is {max_bytes} bytes (max_bytes)")
        return data
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise AudioLoadError(label, "no such file") from None
        except OSError as exc:
            raise AudioLoadError(label, f"cannot be read: {exc.strerror or exc}") from None
        if stat.S_ISDIR(info.st_mode):
            raise AudioLoadError(label, "is a folder, not an audio file")
        if not stat.S_ISREG(info.st_mode):
            raise AudioLoadError(label, "is not a regular file (a pipe or a device, which may never end); "
                                        "save the audio to a file first")
        if info.st_size > max_bytes:
            raise AudioLoadError(label, f"is {info.st_size} bytes; the limit is {max_bytes} bytes (max_bytes)")
        try:
            with open(path, "rb") as file:
                return _read_limited(file, max_bytes, label)
        except OSError as exc:
            raise AudioLoadError(label, f"cannot be read: {exc.strerror or exc}") from None
    if hasattr(source, "read"):
        return _read_limited(source, max_bytes, label)
    raise TypeError(f"expected a path, bytes, a binary file object or an array of samples, got {type(source).__name__}")


def _read_limited(file: BinaryIO, max_bytes: int, label: str) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = file.read(min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError(f"{label}: a file object opened in binary mode is needed (it returned "
                            f"{type(chunk).__name__})")
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise AudioLoadError(label, f"is more than {max_bytes} bytes (max_bytes); a stream is read no further")
    return b"".join(chunks)


def _wav_missing_bytes(data: bytes) -> int:
    """How many bytes of samples a RIFF/WAVE file's "data" chunk declares beyond the end of the file
    (0 for a streaming header, which declares 0 or 0xFFFFFFFF bytes, and for RF64)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if chunk == b"data":
            return 0 if size in (0, 0xFFFFFFFF) else max(0, size - (len(data) - offset - 8))
        offset += 8 + size + (size & 1)
    return 0


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of audio>"
    if isinstance(source, np.ndarray) or _is_tensor(source):
        return f"<array of samples {tuple(source.shape)}>"
    return getattr(source, "name", None) if isinstance(getattr(source, "name", None), str) else "<audio stream>"


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    text = text.split(": ", 1)[-1] if text.startswith("Error opening") else text
    if "does not exist or is not a regular file" in text:  # libsndfile's words for data it cannot place
        return "unrecognised or cut-off data"
    return text


# -- log-mel features (Whisper's) ----------------------------------------------------------------


def _hertz_to_mel(frequency: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False)."""
    frequency = np.asarray(frequency, dtype=np.float64)
    mels = 3.0 * frequency / 200.0
    above = frequency >= 1000.0
    mels = np.where(above, 15.0 + np.log(np.maximum(frequency, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mels)
    return mels


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    frequency = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), frequency)


def mel_filters(n_fft: int, n_mels: int, sampling_rate: int, *, min_frequency: float = 0.0,
                max_frequency: float = 8000.0) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters on Slaney's mel scale with Slaney's area
    normalisation, in float64: the bank Whisper's feature extractor uses (librosa.filters.mel with
    norm="slaney", the same as transformers' mel_filter_bank(norm="slaney", mel_scale="slaney"))."""
    bins = n_fft // 2 + 1
    edges = _mel_to_hertz(np.linspace(_hertz_to_mel(min_frequency), _hertz_to_mel(max_frequency), n_mels + 2))
    fft_frequencies = np.linspace(0, sampling_rate // 2, bins)
    slopes = edges[None, :] - fft_frequencies[:, None]  # (bins, n_mels + 2)
    gaps = np.diff(edges)
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[None, :]


class LogMelFeatures:
    """Whisper's input: audio padded with silence (or cut) to `chunk_length` seconds, a centred STFT
    (periodic Hann window of n_fft, reflect padding, the last frame dropped), power through the mel
    filters, log10 floored at 1e-10, then clipped to 8 below each example's maximum and scaled by
    (x + 4) / 4. Computed with torch.stft in float32, as transformers' WhisperFeatureExtractor does
    when torch is installed. Returns (B, n_mels, chunk_length * sampling_rate // hop_length)."""

    def __init__(self, n_mels: int = 80, sampling_rate: int = 16000, n_fft: int = 400, hop_length: int = 160,
                 chunk_length: int = 30):
        self.n_mels, self.sampling_rate, self.n_fft = n_mels, sampling_rate, n_fft
        self.hop_length, self.chunk_length = hop_length, chunk_length
        self.samples = chunk_length * sampling_rate
        self.frames = self.samples // hop_length
        self.filters = mel_filters(n_fft, n_mels, sampling_rate)

    def __call__(self, audio, *, device=None):
        """audio: one 1-D array (or tensor) of samples at `sampling_rate`, or a list of them."""
        import torch

        items = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 or _is_tensor(audio) and audio.ndim == 1 \
            else list(audio)
        batch = np.zeros((len(items), self.samples), dtype=np.float32)
        for row, item in enumerate(items):
            item = np.asarray(item.detach().cpu() if _is_tensor(item) else item, dtype=np.float32).reshape(-1)
            if item.shape[0] > self.samples:
                raise ValueError(f"audio of {item.shape[0] / self.sampling_rate:.1f} s: the model reads at most "
                                 f"{self.chunk_length} s at a time")
            batch[row, : item.shape[0]] = item
        waveform = torch.from_numpy(batch).to(device or "cpu")
        window = torch.hann_window(self.n_fft, device=waveform.device)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        filters = torch.from_numpy(self.filters).to(waveform.device, torch.float32)
        log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()
        ceiling = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, ceiling - 8.0)
        return (log_spec + 4.0) / 4.0
