"""Whisper checkpoints (WhisperForConditionalGeneration) in the Hugging Face layout, loaded into our
SpeechToText: log-mel features equal to WhisperFeatureExtractor's, encoder states and logits within 1e-5,
greedy transcription token-identical to transformers' `generate` (language detection, forced ids,
language and task tokens, suppressed tokens, the end token) on tiny random checkpoints, and the export
back to a folder transformers loads to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import multimodal_models
from multimodal_models.data.audio import LogMelFeatures, load_audio
from multimodal_models.errors import DataFormatError
from multimodal_models.export import export
from multimodal_models.models.speech import SpeechToText
from multimodal_models.pretrained import supported_layouts
from multimodal_models.pretrained.whisper import load_whisper

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

CORPUS = ["the quick brown fox jumps over the lazy dog", "what colour is the circle? it is red.",
          "hello world, this is a tiny whisper test"] * 4
LANGUAGES = ["<|en|>", "<|fr|>", "<|de|>"]
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", *LANGUAGES, "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def whisper_tokenizer():
    """A tiny byte-level BPE in WhisperTokenizer, with Whisper's special tokens after the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    whisper = transformers.WhisperTokenizer(vocab=tokenizer.get_vocab(), merges=merges)
    whisper.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return whisper, {token: whisper.convert_tokens_to_ids(token) for token in SPECIALS}


CASES = {
    # multilingual: the language detected (forced ids [[1, None], [2, transcribe]]), tied output projection
    "multilingual": dict(multilingual=True, tie=True, act="gelu", scale=False, end_rival=0.0),
    # English-only (no language tokens, forced <|notimestamps|>), its own proj_out, tanh GELU; scale_embedding
    # set, which transformers' Whisper never applies (nor do we)
    "english": dict(multilingual=False, tie=False, act="gelu_new", scale=True, end_rival=0.0),
    # the end token made likely, so that rows of a batch stop at different steps
    "stops": dict(multilingual=True, tie=True, act="gelu", scale=False, end_rival=0.1),
}


def make_whisper(folder: Path, case: str) -> Path:
    c = CASES[case]
    tokenizer, ids = whisper_tokenizer()
    end = ids["<|endoftext|>"]
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=64,
        max_source_positions=100, max_target_positions=64, pad_token_id=end, bos_token_id=end, eos_token_id=end,
        decoder_start_token_id=ids["<|startoftranscript|>"], init_std=0.2, activation_function=c["act"],
        scale_embedding=c["scale"], tie_word_embeddings=c["tie"])
    torch.manual_seed(sorted(CASES).index(case))
    model = transformers.WhisperForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id = (
        ids["<|startoftranscript|>"], end, end)
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.suppress_tokens = [5, 7, 11, 40]
    generation.begin_suppress_tokens = [end, 220]
    generation.max_length = 24
    if c["multilingual"]:
        generation.lang_to_id = {token: ids[token] for token in LANGUAGES}
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        generation.is_multilingual = True
        generation.forced_decoder_ids = [[1, None], [2, ids["<|transcribe|>"]]]
    else:
        generation.is_multilingual = False
        generation.forced_decoder_ids = [[1, ids["<|notimestamps|>"]]]
    generation._from_model_config = False  # written as set here, not re-derived from config.json
    if c["end_rival"]:  # the end token's embedding near that of the token the random model repeats most
        features = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=2)
        inputs = features(clips(), sampling_rate=16000, return_tensors="pt").input_features
        common = torch.mode(model.generate(inputs, language="en").flatten()).values
        with torch.no_grad():
            weight = model.model.decoder.embed_tokens.weight
            weight[end] = weight[common] + c["end_rival"] * torch.randn(weight.shape[1])
    model.save_pretrained(folder)
    features = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=2)  # 200 frames: 100 positions
    transformers.WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whisper")
    return {case: make_whisper(root / case, case) for case in CASES}


def clips(seconds=(1.0, 1.7, 0.4), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i, length in enumerate(seconds):
        t = np.arange(int(16000 * length)) / 16000
        out.append((0.3 * np.sin(2 * np.pi * (200 + 300 * i) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return out


def reference(folder: Path):
    return (transformers.WhisperForConditionalGeneration.from_pretrained(folder).eval(),
            transformers.WhisperProcessor.from_pretrained(folder))


# -- features -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_features_equal_the_feature_extractors(n_mels):
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    audio = clips((3.0, 12.5, 30.0, 0.01))
    expected = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    ours = LogMelFeatures(n_mels)(audio).numpy()
    assert ours.shape == expected.shape == (4, n_mels, 3000)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    with pytest.raises(ValueError, match="at most 30 s at a time"):
        LogMelFeatures(n_mels)([np.zeros(16000 * 31, np.float32)])


def test_features_of_a_file_at_another_rate(tmp_path):
    """A 44.1 kHz stereo FLAC is mixed and resampled to 16 kHz, then featurised as the extractor does."""
    t = np.arange(44100) / 44100
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 880 * t)], axis=1)
    soundfile.write(str(tmp_path / "a.flac"), stereo, 44100)
    samples = load_audio(tmp_path / "a.flac", rate=16000)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    expected = extractor(samples, sampling_rate=16000, return_tensors="np").input_features
    np.testing.assert_allclose(LogMelFeatures(80)([samples]).numpy(), expected, atol=1e-5)


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoder_states_and_logits_match_transformers(checkpoints, case):
    theirs, processor = reference(checkpoints[case])
    model = multimodal_models.load(checkpoints[case])
    assert isinstance(model, SpeechToText)
    audio = clips()
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    np.testing.assert_allclose(model.features(audio).numpy(), features.numpy(), atol=1e-5)
    tokens = torch.tensor([[model.config.decoder_start_token_id, 302, 306, 310, 17, 95, 140, 12]] * len(audio))
    with torch.no_grad():
        expected = theirs(input_features=features, decoder_input_ids=tokens)
        encoder = theirs.model.encoder(features).last_hidden_state
        ours = model(features, tokens)
    torch.testing.assert_close(ours.encoder_states, encoder, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits, expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,options", [
    ("multilingual", {}), ("multilingual", {"language": "fr"}), ("multilingual", {"language": "de", "task": "translate"}),
    ("multilingual", {"task": "translate"}), ("english", {}), ("stops", {}), ("stops", {"language": "en"}),
])
def test_greedy_transcription_is_token_identical(checkpoints, case, options):
    theirs, processor = reference(checkpoints[case])
    model = multimodal_models.load(checkpoints[case])
    audio = clips(seed=len(options))
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    expected = theirs.generate(features, **options)
    ours = model.generate_ids(features, **options)
    end = model.config.eos_token_id
    assert ours == [[t for t in row if t != end] for row in expected.tolist()]
    texts = model.transcribe(audio, source_rate=16000, **options)
    assert texts == processor.batch_decode(expected, skip_special_tokens=True)
    if case == "stops":  # the end token was reached, at different steps in different rows
        lengths = {len(row) for row in ours}
        assert len(lengths) > 1 and min(lengths) < theirs.generation_config.max_length


def test_the_prompt_follows_the_generation_config(checkpoints):
    model = multimodal_models.load(checkpoints["multilingual"])
    ids = model.tokenizer.token_to_id
    start, notimestamps = ids("<|startoftranscript|>"), ids("<|notimestamps|>")
    assert model.prompt_ids() == [start, None, ids("<|transcribe|>"), notimestamps]  # None: detected
    assert model.prompt_ids(language="fr") == [start, ids("<|fr|>"), ids("<|transcribe|>"), notimestamps]
    assert model.prompt_ids(language="<|de|>", task="translate") == [start, ids("<|de|>"), ids("<|translate|>"),
                                                                      notimestamps]
    with pytest.raises(ValueError, match="unknown language 'xx'; this model knows de, en, fr"):
        model.prompt_ids(language="xx")
    with pytest.raises(ValueError, match="unknown task 'summarise'"):
        model.prompt_ids(task="summarise")
    english = multimodal_models.load(checkpoints["english"])
    assert english.prompt_ids() == [start, notimestamps]
    with pytest.raises(ValueError, match="English-only"):
        english.prompt_ids(language="fr")


def test_transcribe_files_and_long_audio(checkpoints, tmp_path):
    theirs, processor = reference(checkpoints["stops"])
    model = multimodal_models.load(checkpoints["stops"])
    t = np.arange(int(22050 * 1.2)) / 22050
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 330 * t), 0.3 * np.sin(2 * np.pi * 990 * t)], axis=1)
    soundfile.write(str(tmp_path / "question.ogg"), stereo, 22050, format="OGG", subtype="VORBIS")
    samples = load_audio(tmp_path / "question.ogg", rate=16000)
    features = processor.feature_extractor(samples, sampling_rate=16000, return_tensors="pt").input_features
    expected = processor.batch_decode(theirs.generate(features), skip_special_tokens=True)[0]
    assert model.transcribe(tmp_path / "question.ogg") == expected
    assert model.transcribe((tmp_path / "question.ogg").read_bytes()) == expected
    soundfile.write(str(tmp_path / "long.wav"), np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(DataFormatError, match=r"long\.wav: is 3\.0 s long; the limit is 2 s \(max_seconds\)"):
        model.transcribe(tmp_path / "long.wav")  # one window (chunk_length) at most: no long-form yet


def test_loads_in_bfloat16(checkpoints):
    model = multimodal_models.load(checkpoints["multilingual"], dtype="bfloat16")
    assert model.decoder.embed.weight.dtype == torch.bfloat16
    rows = model.generate_ids(model.audio_features(clips()[:1], source_rate=16000), max_new_tokens=5)
    assert len(rows) == 1 and len(rows[0]) <= 5


# -- export and our own format --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["multilingual", "english"])
def test_export_back_to_the_layout_transformers_loads(checkpoints, tmp_path, case):
    model = multimodal_models.load(checkpoints[case])
    out = export(model, tmp_path / "exported", format="hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    theirs = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = transformers.WhisperProcessor.from_pretrained(out)
    original, _ = reference(checkpoints[case])
    audio = clips(seed=3)
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    np.testing.assert_allclose(model.features(audio).numpy(), features.numpy(), atol=1e-5)
    tokens = torch.tensor([[model.config.decoder_start_token_id, 17, 95, 140]] * len(audio))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_features=features, decoder_input_ids=tokens).logits,
                                   original(input_features=features, decoder_input_ids=tokens).logits, atol=1e-6, rtol=0)
    assert theirs.generate(features).tolist() == original.generate(features).tolist()
    again = load_whisper(out)
    assert again.generate_ids(features) == model.generate_ids(features)
    assert again.config == model.config


def test_saved_in_our_format_it_comes_back(checkpoints, tmp_path):
    model = multimodal_models.load(checkpoints["multilingual"])
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "speech_to_text"
    again = multimodal_models.load(tmp_path / "ours", expect="speech_to_text")
    audio = clips(seed=5)
    assert again.transcribe(audio, source_rate=16000) == model.transcribe(audio, source_rate=16000)


# -- refusals ---------------------------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_layouts_that_do_not_fit_are_refused(checkpoints, tmp_path):
    assert supported_layouts()["whisper"] == "WhisperForConditionalGeneration"
    folder = _copy(checkpoints["multilingual"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "decoder_layers": 3}))
    with pytest.raises(DataFormatError, match=r"model\.safetensors: the weights do not match config\.json: missing "
                                              r"model\.decoder\.layers\.2\."):
        multimodal_models.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "mish"}))
    with pytest.raises(DataFormatError, match=r"config\.json, field 'activation_function': activation 'mish'"):
        multimodal_models.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "max_source_positions": 150}))
    with pytest.raises(DataFormatError, match=r"processor_config\.json, field 'chunk_length': chunk_length 2 s makes "
                                              r"200 mel frames; config\.json's max_source_positions 150 needs 300"):
        multimodal_models.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["feature_extractor"]["dither"] = 0.01
    (folder / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(DataFormatError, match=r"processor_config\.json, field 'dither': dither 0\.01 is not supported"):
        multimodal_models.load(folder)


# -- multimodal transcribe --------------------------------------------------------------------------


def test_transcribe_command(checkpoints, tmp_path, capsys, monkeypatch):
    from multimodal_models.cli import main

    folder = checkpoints["stops"]
    theirs, processor = reference(folder)
    audio = clips((1.0, 1.5), seed=7)
    paths = []
    for i, (samples, kind) in enumerate(zip(audio, ("WAV", "FLAC"))):
        paths.append(tmp_path / f"clip{i}.{kind.lower()}")
        soundfile.write(str(paths[-1]), samples, 16000, format=kind)
    features = processor.feature_extractor([load_audio(p) for p in paths], sampling_rate=16000,
                                           return_tensors="pt").input_features
    expected = [t.strip() for t in processor.batch_decode(theirs.generate(features), skip_special_tokens=True)]
    detected = theirs.detect_language(features).tolist()
    codes = {i: t.strip("<|>") for t, i in theirs.generation_config.lang_to_id.items()}

    assert main(["transcribe", *map(str, paths), "--model", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, expected)]
    assert main(["transcribe", *map(str, paths), "--model", str(folder), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"audio": str(p), "text": t, "language": codes[d]} for p, t, d in zip(paths, expected, detected)]

    french = processor.batch_decode(theirs.generate(features, language="fr", max_new_tokens=3), skip_special_tokens=True)
    assert main(["transcribe", *map(str, paths), "--model", str(folder), "--language", "fr", "--max-tokens", "3",
                 "--json", "--dtype", "float32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == [t.strip() for t in french] and {l["language"] for l in lines} == {"fr"}

    (tmp_path / "broken.mp3").write_bytes(b"ID3 but nothing else")
    assert main(["transcribe", str(paths[0]), str(tmp_path / "broken.mp3"), "--model", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{paths[0]}\t{expected[0]}"]  # those before the broken file are printed
    assert f"{tmp_path / 'broken.mp3'}: is not a readable audio file" in captured.err
    assert main(["transcribe", str(paths[0]), "--model", "shapes-clip"]) == 2
    assert "needs a speech_to_text model" in capsys.readouterr().err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default model, not downloaded: how to get it
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert main(["transcribe", str(paths[0])]) == 2
    assert "openai/whisper-tiny" in (err := capsys.readouterr().err) and "hf download openai/whisper-tiny" in err
