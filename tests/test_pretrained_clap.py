"""Hugging Face CLAP checkpoints (ClapModel) in our modules: the same numbers as transformers.

Tiny random ClapModels, unfused and fused (HTSAT: 128x128 spectrogram image, 4x4 patches, three
Swin stages of width 8/16/32 with windows of 8, shifted and unshifted; RoBERTa: width 32, 2 layers),
every weight, BatchNorm statistic and relative position bias randomised, are saved with their
ClapProcessor (ClapFeatureExtractor at 48 kHz, 1 s windows, and a tiny byte-level RobertaTokenizer)
by transformers, loaded by `multimodal_models.load` and compared: features (to the bit, within
1e-4 asked), audio and text embeddings within 1e-5, zero-shot logits, export back to the layout
that transformers loads with the same outputs, our own layout, and the errors. No network is used.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

import multimodal_models
from multimodal_models.cli import main
from multimodal_models.data.audio import load_audio
from multimodal_models.errors import DataFormatError
from multimodal_models.models.audio_text import AudioFeatureExtractor, AudioTextEncoder
from multimodal_models.pretrained import supported_layouts
from multimodal_models.pretrained.clap import load_clap

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=0)
RATE = 48_000
FEATURES = dict(feature_size=64, sampling_rate=RATE, hop_length=480, max_length_s=1, fft_window_size=1024,
                frequency_min=50, frequency_max=14_000)
TEXTS = ["a dog barks", "rain on a roof", "the cat!", "a bell"]
# (seconds): shorter than the 1 s window (repeated / padded), exactly it, longer by less than a hop
# (one window: not "longer" for fusion, cut for rand_trunc), and much longer (crops)
LENGTHS = (0.15, 0.6, 1.0, 1.003, 2.7)


def roberta_tokenizer():
    """A tiny byte-level BPE in RoBERTa's layout: <s> text </s>, <pad> = 1, a few merges."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for piece in [*"abcdefghijklmnopqrstuvwxyz.!", "Ġ", *("Ġ" + c for c in "abcdefghijklmnopqrstuvwxyz")]:
        vocab[piece] = len(vocab)
    merges = [("Ġ", "a"), ("o", "g"), ("Ġd", "og"), ("a", "i"), ("Ġr", "ai"), ("Ġrai", "n")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return transformers.RobertaTokenizer(vocab=vocab, merges=merges)


def make_clap(folder, *, fused: bool, seed: int = 0):
    """A tiny random ClapModel with its processor, saved by transformers; returns (folder, model, processor)."""
    tokenizer = roberta_tokenizer()
    config = transformers.ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40),
        audio_config=dict(spec_size=128, num_mel_bins=64, patch_embeds_hidden_size=8, depths=[2, 2, 2],
                          num_attention_heads=[1, 2, 4], hidden_size=32, window_size=8, enable_fusion=fused),
        projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.ClapModel(config).eval()
    with torch.no_grad():  # transformers starts the biases, BatchNorms and position bias tables at constants
        for name, tensor in model.named_parameters():
            tensor.add_(torch.randn_like(tensor) * 0.05)
        for name, tensor in model.named_buffers():
            if name.endswith("running_mean"):
                tensor.normal_()
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    extractor = transformers.ClapFeatureExtractor(**FEATURES, truncation="fusion" if fused else "rand_trunc")
    processor = transformers.ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def unfused(tmp_path_factory):
    return make_clap(tmp_path_factory.mktemp("clap-unfused"), fused=False)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return make_clap(tmp_path_factory.mktemp("clap-fused"), fused=True, seed=1)


@pytest.fixture(params=["unfused", "fused"])
def checkpoint(request, unfused, fused):
    return unfused if request.param == "unfused" else fused


def clips(seed: int = 0, lengths=LENGTHS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(max(lengths) * RATE)) / RATE
    return [(0.3 * np.sin(2 * np.pi * (220 + 300 * i) * t[: int(s * RATE)]) + 0.05 * rng.standard_normal(int(s * RATE)))
            .astype(np.float32) for i, s in enumerate(lengths)]


def hf_features(processor, audio, seed: int):
    np.random.seed(seed)  # transformers draws the crops (and a row to mark "longer") from NumPy's global generator
    if isinstance(processor, transformers.ClapFeatureExtractor):
        return processor(audio, sampling_rate=RATE, return_tensors="pt")
    return processor(audio=audio, sampling_rate=RATE, return_tensors="pt")


def hf_audio_embeds(model, features, is_longer):
    with torch.no_grad():
        return model.get_audio_features(input_features=features, is_longer=is_longer.reshape(-1, 1)).pooler_output


# -- features -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
def test_features_equal_the_feature_extractor(truncation, padding):
    theirs = transformers.ClapFeatureExtractor(**FEATURES, truncation=truncation, padding=padding)
    ours = AudioFeatureExtractor(**FEATURES, truncation=truncation, padding=padding)
    for batch, seed in ((clips(0), 3), (clips(1, LENGTHS[:3]), 4)):  # the second has no clip longer than the window
        expected = hf_features(theirs, batch, seed)
        features, longer = ours(batch, rng=np.random.RandomState(seed), mark_random_longer=True)
        assert features.shape == expected["input_features"].shape
        assert features.shape[1] == (4 if truncation == "fusion" else 1)
        torch.testing.assert_close(features, expected["input_features"].float(), atol=1e-4, rtol=0)
        assert longer.tolist() == expected["is_longer"].reshape(-1).tolist()
    # by default only the clips longer than the window are marked (an embedding not hanging on its batch)
    _, longer = ours(clips(0))
    assert longer.tolist() == [False, False, False, truncation == "rand_trunc", True]
    _, longer = ours(clips(1, LENGTHS[:3]))
    assert not longer.any()


def test_feature_settings_come_from_the_checkpoint_in_either_layout(unfused, tmp_path):
    folder, _, processor = unfused
    model = multimodal_models.load(folder)
    assert model.audio_processor.truncation == "rand_trunc" and model.audio_processor.frequency_min == 50
    # transformers 4.x layout: preprocessor_config.json at the top
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (legacy / name).write_bytes((folder / name).read_bytes())
    (legacy / "preprocessor_config.json").write_text(json.dumps(processor.feature_extractor.to_dict()))
    again = multimodal_models.load(legacy)
    assert again.audio_processor.to_dict() == model.audio_processor.to_dict()


# -- embeddings --------------------------------------------------------------------------------------


def test_loads_with_the_same_audio_and_text_embeddings(checkpoint):
    folder, reference, processor = checkpoint
    model = multimodal_models.load(folder)
    assert isinstance(model, AudioTextEncoder)
    fused = model.config.audio.fusion
    batch = clips(2)
    expected = hf_features(processor, batch, seed=5)
    features, longer = model.audio_features(batch, rng=np.random.RandomState(5))
    torch.testing.assert_close(features, expected["input_features"].float(), atol=1e-4, rtol=0)
    with torch.no_grad():
        ours = model.encode_audio(features, longer)
    torch.testing.assert_close(ours, hf_audio_embeds(reference, features, longer), **TOL)
    if fused:  # the fusion path changes the embedding (the test would prove nothing otherwise)
        with torch.no_grad():
            assert not torch.allclose(ours[-1], model.encode_audio(features, torch.zeros_like(longer))[-1], atol=1e-3)
    # embed_audios: the same vectors, batched, from arrays at the model's rate
    torch.testing.assert_close(model.embed_audios(batch, batch_size=2, rng=np.random.RandomState(5)), ours, **TOL)

    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_text = reference.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(model.embed_texts(TEXTS), expected_text, **TOL)
    assert model.embed_texts(TEXTS).shape == (len(TEXTS), 16)


def test_zero_shot_classify_is_transformers_softmax(fused):
    folder, reference, processor = fused
    model = multimodal_models.load(folder)
    clip = clips(3, (0.4,))[0]
    labels = ["dog", "rain", "bell"]
    result = model.classify(clip, labels)
    assert [label for label, _ in result] == labels
    inputs = processor(text=[f"This is a sound of {label}." for label in labels], audio=[clip], sampling_rate=RATE,
                       padding=True, return_tensors="pt")
    inputs["is_longer"] = torch.zeros_like(inputs["is_longer"])  # ours marks no clip at random
    with torch.no_grad():
        logits = reference(**inputs).logits_per_audio[0]
    torch.testing.assert_close(torch.tensor([p for _, p in result]), logits.softmax(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="has no '{}'"):
        model.classify(clip, labels, templates=["a sound"])


def test_audio_files_are_read_mixed_and_resampled(unfused, tmp_path):
    folder, reference, processor = unfused
    model = multimodal_models.load(folder)
    t = np.arange(int(0.7 * 16_000)) / 16_000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1).astype(np.float32) * 0.4
    path = tmp_path / "tone.flac"
    soundfile.write(path, stereo, 16_000)
    waveform = load_audio(path, rate=RATE)  # data/audio.py: mono, soxr to 48 kHz
    from_file = model.embed_audios(str(path))
    torch.testing.assert_close(from_file, model.embed_audios([waveform]), atol=0, rtol=0)
    expected = hf_features(processor, [waveform], seed=0)
    torch.testing.assert_close(from_file, hf_audio_embeds(reference, expected["input_features"],
                                                          expected["is_longer"]), **TOL)
    # an array at another rate is resampled; a broken file is refused by name
    torch.testing.assert_close(model.embed_audios([stereo.mean(axis=1)], sampling_rate=16_000),
                               model.embed_audios([load_audio(stereo.mean(axis=1), rate=RATE, source_rate=16_000)]))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(DataFormatError, match="broken.wav"):
        model.embed_audios([broken])


# -- export and our own layout -----------------------------------------------------------------------


def test_export_reloads_in_transformers_with_the_same_outputs(checkpoint, tmp_path, capsys):
    folder, reference, processor = checkpoint
    code = main(["export", str(folder), str(tmp_path / "hf"), "--format", "hf"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(
        json.loads(captured.out)["files"])
    again, info = transformers.ClapModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    again.eval()
    their_processor = transformers.ClapProcessor.from_pretrained(tmp_path / "hf")
    batch = clips(4)
    inputs = hf_features(their_processor, batch, seed=6)
    torch.testing.assert_close(inputs["input_features"], hf_features(processor, batch, seed=6)["input_features"],
                               atol=0, rtol=0)
    text = their_processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert text["input_ids"].tolist() == processor.tokenizer(TEXTS, padding=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs, **text).logits_per_audio,
                                   reference(**inputs, **text).logits_per_audio, **TOL)
    # and our reader reads what it wrote
    model = multimodal_models.load(tmp_path / "hf")
    torch.testing.assert_close(model.embed_texts(TEXTS), multimodal_models.load(folder).embed_texts(TEXTS), **TOL)


def test_our_own_layout_round_trips(fused, tmp_path):
    folder, _, _ = fused
    model = multimodal_models.load(folder)
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "audio_text"
    again = multimodal_models.load(tmp_path / "ours", expect="audio_text")
    batch = clips(5, (0.3, 2.2))
    torch.testing.assert_close(again.embed_audios(batch), model.embed_audios(batch), atol=0, rtol=0)
    torch.testing.assert_close(again.embed_texts(TEXTS), model.embed_texts(TEXTS), atol=0, rtol=0)
    assert again.audio_processor.to_dict() == model.audio_processor.to_dict()


# -- errors ------------------------------------------------------------------------------------------


def rewrite_config(folder, tmp_path, change) -> str:
    target = tmp_path / "changed"
    target.mkdir(exist_ok=True)
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("section, field, value, message", [
    ("audio_config", "patch_stride", [2, 2], "patch stride other than the patch size"),
    ("audio_config", "fusion_type", "channel_map", "fusion 'channel_map' is not supported"),
    ("audio_config", "patch_embed_input_channels", 2, "only one input channel"),
    ("audio_config", "window_size", 5, "not tiled by 5x5 windows"),
    ("audio_config", "hidden_size", 64, "is not the last stage's width"),
    ("text_config", "position_embedding_type", "relative_key", "'relative_key' positions are not supported"),
])
def test_settings_the_published_checkpoints_do_not_use_are_refused(fused, tmp_path, section, field, value, message):
    folder, _, _ = fused
    changed = rewrite_config(folder, tmp_path, lambda config: config[section].update({field: value}))
    with pytest.raises(DataFormatError, match=message) as error:
        multimodal_models.load(changed)
    assert f"{section}.{field}" in str(error.value) or field in str(error.value)


def test_missing_keys_and_mismatched_features_are_named(unfused, fused, tmp_path):
    folder, _, _ = unfused
    # an unfused config over fused weights: the fusion tensors are named as unexpected
    changed = rewrite_config(fused[0], tmp_path, lambda config: config["audio_config"].update(enable_fusion=False))
    with pytest.raises(DataFormatError, match="unexpected .*fusion_model"):
        load_clap(changed)
    model = multimodal_models.load(folder)
    features, _ = AudioFeatureExtractor(**FEATURES, truncation="fusion")(clips(0, (0.5,)))
    with pytest.raises(ValueError, match="has no fusion"):
        model.encode_audio(features)
    assert supported_layouts()["clap"] == "ClapModel"
    with pytest.raises(DataFormatError, match="ClapModel|not a CLIPModel"):
        multimodal_models.pretrained.load_hf(folder)


def test_the_truncation_is_the_one_the_model_reads(fused, tmp_path):
    folder, reference, _ = fused
    changed = tmp_path / "rand-trunc-settings"
    changed.mkdir()
    for path in folder.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["feature_extractor"]["truncation"] = "rand_trunc"
    (changed / "processor_config.json").write_text(json.dumps(processor))
    model = multimodal_models.load(changed)
    assert model.audio_processor.truncation == "rand_trunc"  # kept as the file says, written back so
    batch = clips(6, (0.5, 1.8))
    features, longer = model.audio_features(batch, rng=np.random.RandomState(2))
    assert features.shape[1] == 4 and longer.tolist() == [False, True]
    torch.testing.assert_close(model.embed_audios(batch, rng=np.random.RandomState(2)),
                               hf_audio_embeds(reference, features, longer), **TOL)
