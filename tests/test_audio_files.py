"""Audio files (data/audio.py): WAV, FLAC, MP3 and OGG at any rate and channel count, written here with
soundfile, come back as mono samples at the rate asked for with their tones' frequencies, amplitudes and
durations; broken, empty, huge and endless sources are refused, naming the source and the limit."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest
import soundfile

from multimodal_models.data.audio import AudioLoadError, load_audio, read_audio
from multimodal_models.errors import DataFormatError

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
           "ogg": ("OGG", "VORBIS")}
LOSSY = {"mp3", "ogg"}


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def write(path, samples: np.ndarray, rate: int, kind: str):
    container, subtype = FORMATS[kind]
    soundfile.write(str(path), samples, rate, format=container, subtype=subtype)
    return path


def spectrum_peak(samples: np.ndarray, rate: int) -> tuple[float, float]:
    """(frequency of the strongest component, its amplitude), from a Hann-windowed FFT of the middle."""
    middle = samples[len(samples) // 4: 3 * len(samples) // 4]
    window = np.hanning(len(middle))
    magnitude = np.abs(np.fft.rfft(middle * window)) * 2 / window.sum()
    index = int(np.argmax(magnitude))
    return index * rate / len(middle), float(magnitude[index])


def amplitude_at(samples: np.ndarray, rate: int, frequency: float) -> float:
    middle = samples[len(samples) // 4: 3 * len(samples) // 4]
    window = np.hanning(len(middle))
    magnitude = np.abs(np.fft.rfft(middle * window)) * 2 / window.sum()
    index = int(round(frequency * len(middle) / rate))
    return float(magnitude[index - 2: index + 3].max())


@pytest.mark.parametrize("kind", sorted(FORMATS))
@pytest.mark.parametrize("rate,frequency", [(8000, 440.0), (22050, 1000.0), (44100, 3000.0), (48000, 1500.0)])
def test_a_tone_keeps_its_frequency_amplitude_and_duration(tmp_path, kind, rate, frequency):
    if kind == "ogg" and rate == 8000:
        frequency = 440.0
    path = write(tmp_path / f"tone.{kind}", tone(frequency, rate, 1.5), rate, kind)
    samples = load_audio(path, rate=16000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 24000) <= (0 if kind not in LOSSY else 40)  # 1.5 s at 16 kHz
    peak, amplitude = spectrum_peak(samples, 16000)
    assert abs(peak - frequency) <= 2.0  # FFT bin width 16000/12000 Hz
    assert amplitude == pytest.approx(0.5, abs=0.02 if kind not in LOSSY else 0.08)


def test_stereo_is_mixed_to_mono_and_every_source_kind_gives_the_same_samples(tmp_path):
    rate = 44100
    left, right = tone(300.0, rate, 1.0, 0.6), tone(1200.0, rate, 1.0, 0.4)
    path = write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), rate, "flac")
    samples = load_audio(path, rate=16000)
    assert len(samples) == 16000
    assert amplitude_at(samples, 16000, 300.0) == pytest.approx(0.3, abs=0.01)  # the mean of the channels
    assert amplitude_at(samples, 16000, 1200.0) == pytest.approx(0.2, abs=0.01)
    data = path.read_bytes()
    np.testing.assert_array_equal(load_audio(data, rate=16000), samples)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data), rate=16000), samples)
    stored, stored_rate = read_audio(path)
    assert stored.shape == (rate, 2) and stored_rate == rate
    np.testing.assert_allclose(load_audio(stored, rate=16000, source_rate=rate), samples, atol=1e-6)


def test_six_channels_and_the_rate_already_wanted(tmp_path):
    rate = 16000
    channels = np.stack([tone(500.0 * (i + 1), rate, 0.5, 0.3) for i in range(6)], axis=1)
    path = write(tmp_path / "surround.wav", channels, rate, "wav")
    samples = load_audio(path, rate=16000)
    np.testing.assert_allclose(samples, channels.mean(axis=1), atol=1e-4)  # PCM_16 rounding only


def test_arrays_integer_pcm_and_tensors():
    torch = pytest.importorskip("torch")
    wave = tone(440.0, 8000, 1.0)
    pcm = np.round(wave * 32767).astype(np.int16)
    from_int = load_audio(pcm, rate=8000, source_rate=8000)
    np.testing.assert_allclose(from_int, wave, atol=1e-4)
    up = load_audio(torch.from_numpy(wave), rate=16000, source_rate=8000)
    assert len(up) == 16000 and abs(spectrum_peak(up, 16000)[0] - 440.0) <= 2.0
    with pytest.raises(AudioLoadError, match="needs its sample rate"):
        load_audio(wave)
    with pytest.raises(AudioLoadError, match=r"\(frames,\) or \(frames, channels\)"):
        load_audio(np.zeros((2, 3, 4), np.float32), source_rate=8000)
    with pytest.raises(AudioLoadError, match="not finite"):
        load_audio(np.array([0.0, np.nan], np.float32), source_rate=8000)
    with pytest.raises(AudioLoadError, match=r"is 2.0 s long; the limit is 1 s \(max_seconds\)"):
        load_audio(np.zeros(16000, np.float32), source_rate=8000, max_seconds=1)


# -- refusals ---------------------------------------------------------------------------------------


def test_missing_folder_and_empty_sources(tmp_path):
    with pytest.raises(AudioLoadError, match=r"nothere\.wav: no such file"):
        load_audio(tmp_path / "nothere.wav")
    with pytest.raises(AudioLoadError, match="is a folder"):
        load_audio(tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioLoadError, match=r"empty\.wav: is empty \(0 bytes\)"):
        load_audio(tmp_path / "empty.wav")
    silent = write(tmp_path / "nosamples.wav", np.zeros(0, np.float32), 16000, "wav")
    with pytest.raises(AudioLoadError, match=r"nosamples\.wav: holds no audio \(0 samples\)"):
        load_audio(silent)
    assert issubclass(AudioLoadError, DataFormatError)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_broken_files_are_refused_naming_the_file(tmp_path, kind):
    path = write(tmp_path / f"whole.{kind}", tone(440.0, 22050, 2.0), 22050, kind)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioLoadError, match=rf"cut\.{kind}: .*(truncated|corrupt|malformed|not a readable)"):
        load_audio(cut)
    garbage = tmp_path / f"garbage.{kind}"
    garbage.write_bytes(data[:40] + b"\x00" * 8)
    with pytest.raises(AudioLoadError, match=rf"garbage\.{kind}: "):
        load_audio(garbage)


def test_text_and_other_containers_are_refused(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio at all")
    with pytest.raises(AudioLoadError, match=r"notes\.wav: is not a readable audio file \(WAV, FLAC, MP3 or OGG\)"):
        load_audio(tmp_path / "notes.wav")
    soundfile.write(str(tmp_path / "tone.aiff"), tone(440.0, 8000, 0.2), 8000, format="AIFF")
    with pytest.raises(AudioLoadError, match=r"tone\.aiff: is AIFF .*the formats read are WAV, FLAC, MP3 and OGG"):
        load_audio(tmp_path / "tone.aiff")


def test_huge_files_are_refused_before_decoding(tmp_path):
    path = write(tmp_path / "long.flac", tone(440.0, 8000, 3.0), 8000, "flac")
    with pytest.raises(AudioLoadError, match=r"long\.flac: is 3\.0 s long; the limit is 2 s \(max_seconds\)"):
        load_audio(path, max_seconds=2)
    with pytest.raises(AudioLoadError, match=r"long\.flac: is \d+ bytes; the limit is 1000 bytes \(max_bytes\)"):
        load_audio(path, max_bytes=1000)
    with pytest.raises(AudioLoadError, match=r"the limit is 1000 bytes \(max_bytes\)"):
        load_audio(path.read_bytes(), max_bytes=1000)


def test_a_header_that_understates_the_length_is_caught_while_decoding(tmp_path):
    """A WAV whose data chunk says 'unknown size' (as streaming writers leave it) holds 3 s: the
    header-free count stops decoding at the limit."""
    path = write(tmp_path / "stream.wav", tone(440.0, 8000, 3.0), 8000, "wav")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4: at + 8] = struct.pack("<I", 0xFFFFFFFF)
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(bytes(data))
    assert len(load_audio(streamed, rate=8000)) == 24000  # readable when within the limits
    with pytest.raises(AudioLoadError, match=r"streamed\.wav: is \d\.\d s long; the limit is 2 s \(max_seconds\)"):
        load_audio(streamed, max_seconds=2)


def test_endless_streams_are_refused(tmp_path):
    if os.path.exists("/dev/zero"):
        with pytest.raises(AudioLoadError, match=r"/dev/zero: is not a regular file \(a pipe or a device"):
            load_audio("/dev/zero")

    class Endless(io.RawIOBase):
        name = "<microphone>"

        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"\x01" * len(buffer)
            return len(buffer)

    with pytest.raises(AudioLoadError, match=r"<microphone>: is more than 100000 bytes \(max_bytes\); a stream is "
                                             r"read no further"):
        load_audio(Endless(), max_bytes=100_000)
    fifo = tmp_path / "pipe.wav"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        with pytest.raises(AudioLoadError, match=r"pipe\.wav: is not a regular file"):
            load_audio(fifo)  # refused from its type, without opening (which would block)


def test_ogg_opus(tmp_path):
    path = tmp_path / "voice.opus.ogg"
    soundfile.write(str(path), tone(600.0, 48000, 1.0), 48000, format="OGG", subtype="OPUS")
    samples = load_audio(path, rate=16000)
    assert abs(len(samples) - 16000) <= 40 and abs(spectrum_peak(samples, 16000)[0] - 600.0) <= 2.0
