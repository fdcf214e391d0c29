"""ImageProcessor: same pixels as transformers' CLIP/SigLIP image processors, config round trips."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_models.data.preprocess import CONFIG_NAME, ImageProcessor
from multimodal_models.errors import DataFormatError

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
# transformers >= 5 names the Pillow/NumPy implementation *Pil (the plain names need torchvision);
# in 4.x the plain names are that implementation.
HFClip = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
HFSiglip = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor

# (width, height): landscape, portrait, odd ratios, square, smaller than the output, 1 px, extreme.
SIZES = [
    (640, 480),
    (480, 640),
    (333, 500),
    (500, 333),
    (224, 224),
    (225, 224),
    (50, 30),
    (13, 7),
    (1, 1),
    (7, 300),
    (301, 97),
]

CLIP_SETTINGS = [
    {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},  # openai/clip-vit-*
    {
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 200},
        "resample": 2,
    },  # non-square crop, bilinear
    {
        "size": {"shortest_edge": 200},
        "crop_size": {"height": 224, "width": 224},
    },  # crop larger than the resize: zero padding
    {
        "size": {"shortest_edge": 64},
        "do_center_crop": False,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
]
SIGLIP_SETTINGS = [
    {},  # google/siglip-base-patch16-224: 224x224 bicubic, mean/std 0.5, no crop
    {"size": {"height": 96, "width": 128}, "resample": 1},  # non-square fixed size, lanczos
    {
        "size": {"height": 64, "width": 64},
        "do_rescale": False,
        "do_normalize": True,
        "image_mean": [127.5] * 3,
        "image_std": [127.5] * 3,
    },
]


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_pixels(processor, image) -> torch.Tensor:
    return processor(image, return_tensors="pt")["pixel_values"]


def assert_same_pixels(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and theirs.dtype == torch.float32
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("settings", CLIP_SETTINGS)
def test_matches_transformers_clip_image_processor(settings):
    reference = HFClip(**settings)
    ours = ImageProcessor.from_dict(reference.to_dict())
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed)
        assert_same_pixels(ours(image), hf_pixels(reference, image))


@pytest.mark.parametrize("settings", SIGLIP_SETTINGS)
def test_matches_transformers_siglip_image_processor(settings):
    reference = HFSiglip(**settings)
    ours = ImageProcessor.from_dict(reference.to_dict())
    batch = [random_image(width, height, seed) for seed, (width, height) in enumerate(SIZES)]
    assert_same_pixels(ours(batch), hf_pixels(reference, batch))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1"])
def test_matches_transformers_on_other_pixel_modes(mode):
    reference = HFClip()
    ours = ImageProcessor.from_dict(reference.to_dict())
    rgba = np.random.default_rng(1).integers(0, 256, (240, 320, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    assert_same_pixels(ours(image), hf_pixels(reference, image))


def test_transformers_reads_our_saved_config_and_agrees(tmp_path):
    ours = ImageProcessor(
        size={"shortest_edge": 96},
        do_center_crop=True,
        crop_size={"height": 80, "width": 80},
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
    )
    ours.save(tmp_path)
    reference = HFClip.from_pretrained(tmp_path)
    image = random_image(150, 101, 7)
    assert_same_pixels(ours(image), hf_pixels(reference, image))


def test_we_read_a_config_saved_by_transformers(tmp_path):
    HFSiglip(size={"height": 32, "width": 48}).save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"height": 32, "width": 48}
    assert ours.image_processor_type == "SiglipImageProcessor"
    image = random_image(90, 60, 3)
    assert_same_pixels(ours(image), hf_pixels(HFSiglip.from_pretrained(tmp_path), image))


# --- behaviour of our own ---------------------------------------------------------------------------


def test_shapes_defaults():
    processor = ImageProcessor()
    assert processor.size == {"height": 64, "width": 64} and not processor.do_center_crop
    assert processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == (0.5, 0.5, 0.5)
    pixels = processor(random_image(100, 80, 0))
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min().item() and pixels.max().item() <= 1.0
    white = processor(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert torch.all(white == 1.0)


def test_single_image_list_and_preprocess_one():
    processor = ImageProcessor(size={"height": 16, "width": 24})
    image = random_image(40, 30, 0)
    one = processor.preprocess_one(image)
    assert one.shape == (3, 16, 24) and one.dtype == np.float32
    assert processor(image).shape == (1, 3, 16, 24)
    batch = processor([image, random_image(10, 50, 1), image])
    assert batch.shape == (3, 3, 16, 24)
    assert np.array_equal(batch[0].numpy(), one) and np.array_equal(batch[2].numpy(), one)


def test_accepts_paths_bytes_and_arrays(tmp_path):
    processor = ImageProcessor(size={"height": 8, "width": 8})
    image = random_image(20, 10, 2)
    path = tmp_path / "x.png"
    image.save(path)
    expected = processor(image)
    for source in (path, str(path), path.read_bytes(), np.asarray(image)):
        assert torch.equal(processor(source), expected)


def test_files_get_their_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    random_image(40, 20, 0).save(buffer, format="PNG", exif=exif.tobytes())
    processor = ImageProcessor(size={"shortest_edge": 10}, do_center_crop=False)
    assert processor(buffer.getvalue()).shape == (1, 3, 20, 10)  # upright: portrait


def test_images_of_different_output_sizes_cannot_be_batched():
    processor = ImageProcessor(size={"shortest_edge": 8})
    with pytest.raises(ValueError, match="different sizes"):
        processor([random_image(16, 8, 0), random_image(8, 16, 1)])


def test_output_size_rule():
    processor = ImageProcessor(size={"shortest_edge": 224})
    assert processor.output_size(500, 333) == (224, 336)  # int(224 * 500 / 333) = 336
    assert processor.output_size(333, 500) == (336, 224)
    cropped = ImageProcessor(size={"shortest_edge": 224}, do_center_crop=True, crop_size={"height": 200, "width": 100})
    assert cropped.output_size(500, 333) == (200, 100)


def test_dict_and_folder_round_trip(tmp_path):
    processor = ImageProcessor(
        size={"shortest_edge": 32},
        do_center_crop=True,
        crop_size={"height": 30, "width": 30},
        resample=2,
        image_mean=(0.1, 0.2, 0.3),
        image_std=(0.4, 0.5, 0.6),
    )
    assert ImageProcessor.from_dict(processor.to_dict()) == processor
    path = processor.save(tmp_path / "model")
    assert path.name == CONFIG_NAME
    assert json.loads(path.read_text())["crop_size"] == {"height": 30, "width": 30}
    assert ImageProcessor.from_pretrained(tmp_path / "model") == processor


def test_legacy_clip_config_is_understood():
    legacy = {  # openai/clip-vit-base-patch32's preprocessor_config.json
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    processor = ImageProcessor.from_dict(legacy)
    assert processor.size == {"shortest_edge": 224} and processor.crop_size == {"height": 224, "width": 224}
    assert processor.image_processor_type == "CLIPImageProcessor"


def test_settings_we_do_not_implement_are_refused_not_ignored(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"size": {"height": 8, "width": 8}, "do_pad": True}))
    with pytest.raises(DataFormatError, match=r"field 'do_pad'.*unsupported setting do_pad=True") as error:
        ImageProcessor.from_pretrained(tmp_path)
    assert CONFIG_NAME in str(error.value)
    assert ImageProcessor.from_dict({"do_pad": False, "processor_class": "CLIPProcessor"}).size == {
        "height": 64,
        "width": 64,
    }


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size": {"longest_edge": 10}}, "size must be"),
        ({"size": {"height": 0, "width": 4}}, "positive integer"),
        ({"do_center_crop": True}, "needs crop_size"),
        ({"resample": 9}, "resample"),
        ({"image_std": (0.5, 0.0, 0.5)}, "must not contain 0"),
        ({"image_mean": (0.5, 0.5)}, "3 numbers"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor(**kwargs)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        ImageProcessor.from_pretrained(tmp_path)


def test_do_convert_rgb_false_requires_rgb_input():
    processor = ImageProcessor(do_convert_rgb=False)
    with pytest.raises(ValueError, match="mode 'L'"):
        processor(Image.new("L", (4, 4)))


def test_the_package_does_not_import_transformers():
    code = "import sys, multimodal_models.data.preprocess; sys.exit('transformers' in sys.modules)"
    repository = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=repository).returncode == 0


def test_cached_uint8_path_gives_the_same_numbers_as_preprocess_one():
    """Training caches resize_to_array() output and finishes with normalize_batch()."""
    rng = np.random.default_rng(0)
    processor = ImageProcessor(size={"height": 48, "width": 40}, image_mean=(0.48, 0.45, 0.40), image_std=(0.26, 0.26, 0.27))
    images = [Image.fromarray(rng.integers(0, 256, (60 + k, 50, 3), dtype=np.uint8)) for k in range(3)]
    cached = torch.from_numpy(np.stack([processor.resize_to_array(im) for im in images]))
    assert cached.dtype == torch.uint8
    assert torch.equal(processor.normalize_batch(cached), processor(images))
