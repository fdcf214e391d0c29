"""Format readers and writers, on tiny fixtures in each dataset's published layout."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from multimodal_models.data import formats
from multimodal_models.data.formats import (
    read_caption_results,
    read_coco_captions,
    read_karpathy,
    read_llava,
    read_mmmu,
    read_table,
    read_vqa,
    read_vqa_results,
    write_caption_results,
    write_coco_captions,
    write_karpathy,
    write_llava,
    write_mmmu_parquet,
    write_table,
    write_vqa,
    write_vqa_results,
)
from multimodal_models.data.images import load_image
from multimodal_models.data.records import CaptionRecord, ConversationRecord, MultipleChoiceRecord, Turn, VQARecord
from multimodal_models.errors import DataFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
COCO = FIXTURES / "coco" / "captions_val2014.json"
KARPATHY_COCO = FIXTURES / "karpathy" / "dataset_coco.json"
KARPATHY_FLICKR = FIXTURES / "karpathy" / "dataset_flickr30k.json"
VQA_QUESTIONS = FIXTURES / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_ANNOTATIONS = FIXTURES / "vqa" / "v2_mscoco_val2014_annotations.json"
LLAVA = FIXTURES / "llava" / "llava_instruct.json"
MMMU_DIR = FIXTURES / "mmmu"
MMMU_FILE = MMMU_DIR / "Art" / "validation-00000-of-00001.parquet"


def make_image(path: Path, size=(6, 4), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(color=(1, 2, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def mutated(source: Path, tmp_path: Path, change) -> Path:
    """A copy of a JSON fixture (same file name) with `change(document)` applied."""
    document = json.loads(source.read_text())
    change(document)
    target = tmp_path / source.name
    target.write_text(json.dumps(document))
    return target


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataFormatError) as error:
        call(*args, **kwargs)
    return str(error.value)


# =========================================================================================
# COCO captions
# =========================================================================================


def test_coco_captions_grouped_per_image_in_images_order():
    records = read_coco_captions(COCO, "/data/val2014")
    assert [r.image_id for r in records] == [391895, 522418, 184613]
    first = records[0]
    assert isinstance(first, CaptionRecord)
    assert first.image == Path("/data/val2014/COCO_val2014_000000391895.jpg")
    assert first.captions == (
        "A man with a red helmet on a small moped on a dirt road. ",  # verbatim, trailing space kept
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
    )
    assert len(records[1].captions) == 2 and len(records[2].captions) == 2


def test_coco_check_images_names_the_missing_files(tmp_path):
    make_image(tmp_path / "COCO_val2014_000000391895.jpg")
    make_image(tmp_path / "COCO_val2014_000000522418.jpg")
    message = error_of(read_coco_captions, COCO, tmp_path, check_images=True)
    assert str(COCO) in message
    assert "images[2]" in message and "field 'file_name'" in message
    assert "1 referenced image file(s) not found" in message and "COCO_val2014_000000184613.jpg" in message
    make_image(tmp_path / "COCO_val2014_000000184613.jpg")
    assert len(read_coco_captions(COCO, tmp_path, check_images=True)) == 3


def test_coco_null_caption_names_file_record_and_field():
    path = FIXTURES / "coco" / "captions_null_caption.json"
    message = error_of(read_coco_captions, path, "img")
    assert message == f"{path}, record annotations[1] (id 771687), field 'caption': expected a string, got null"


def test_invalid_json_gives_line_and_column():
    path = FIXTURES / "coco" / "captions_invalid.json"
    message = error_of(read_coco_captions, path, "img")
    assert message.startswith(f"{path}: invalid JSON at line 5, column 3:")


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            lambda d: d["annotations"][2].update(image_id=999),
            "record annotations[2] (id 452132), field 'image_id': image id 999 is not listed",
        ),
        (
            lambda d: d["annotations"][0].update(image_id="391895"),
            "field 'image_id': expected an integer, got a string ('391895')",
        ),
        (
            lambda d: d["images"][1].pop("file_name"),
            "record images[1] (id 522418), field 'file_name': missing; expected a non-empty string",
        ),
        (
            lambda d: d["images"][2].update(id=391895),
            "record images[2], field 'id': duplicate image id 391895 (also images[0])",
        ),
        (lambda d: d.pop("annotations"), "field 'annotations': missing; expected a list"),
        (
            lambda d: d["annotations"].__setitem__(3, "a caption"),
            "record annotations[3]: expected an object, got a string",
        ),
    ],
)
def test_coco_malformed_variants(tmp_path, change, expected):
    path = mutated(COCO, tmp_path, change)
    message = error_of(read_coco_captions, path, "img")
    assert message.startswith(str(path)) and expected in message


def test_coco_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text("[]")
    assert "expected an object at the top level" in error_of(read_coco_captions, path, "img")


def test_coco_write_read_round_trip(tmp_path):
    images = tmp_path / "images"
    records = [
        CaptionRecord(7, make_image(images / "train_000000000007.png", size=(12, 8)), ("a red square.", "a square")),
        CaptionRecord(3, make_image(images / "sub" / "train_000000000003.png", size=(5, 9)), ("a blue circle",)),
    ]
    path = write_coco_captions(tmp_path / "ann" / "captions_train.json", records, image_dir=images)
    assert read_coco_captions(path, images, check_images=True) == records
    document = json.loads(path.read_text())
    assert set(document) == {"info", "licenses", "images", "annotations"}
    assert document["images"][1] == {"id": 3, "file_name": "sub/train_000000000003.png", "width": 5, "height": 9}
    assert [a["id"] for a in document["annotations"]] == [1, 2, 3]


def test_coco_writer_without_image_dir_stores_bare_file_names(tmp_path):
    records = [CaptionRecord(1, tmp_path / "images" / "val" / "shapes_val_000000000001.png", ("a cube",), "val")]
    path = write_coco_captions(tmp_path / "captions_val.json", records, image_size=64, description="Shapes, val")
    document = json.loads(path.read_text())
    assert document["info"]["description"] == "Shapes, val"
    assert document["images"] == [{"id": 1, "file_name": "shapes_val_000000000001.png", "width": 64, "height": 64}]
    (record,) = read_coco_captions(path, tmp_path / "images" / "val")
    assert record.image == records[0].image and record.captions == ("a cube",)


def test_coco_writer_refuses_what_coco_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="integer ids"):
        write_coco_captions(tmp_path / "c.json", [CaptionRecord("x", tmp_path / "a.png", ("c",))], image_dir=tmp_path)
    with pytest.raises(ValueError, match="in-memory bytes"):
        write_coco_captions(tmp_path / "c.json", [CaptionRecord(1, png_bytes(), ("c",))], image_dir=tmp_path)
    with pytest.raises(ValueError, match="not inside the image folder"):
        write_coco_captions(
            tmp_path / "c.json", [CaptionRecord(1, Path("/elsewhere/a.png"), ("c",))], image_dir=tmp_path, image_size=4
        )


def test_caption_results():
    results = read_caption_results(FIXTURES / "coco" / "captions_results.json")
    assert results[522418] == "a woman cutting a cake" and len(results) == 3


def test_caption_results_duplicate_image_is_an_error():
    path = FIXTURES / "coco" / "results_duplicate.json"
    message = error_of(read_caption_results, path)
    assert message.startswith(f"{path}, record [2], field 'image_id': duplicate image_id 391895 (first at [0])")


def test_caption_results_round_trip(tmp_path):
    results = {1: "a cat", 42: "two dogs"}
    path = write_caption_results(tmp_path / "results.json", results)
    assert json.loads(path.read_text()) == [
        {"image_id": 1, "caption": "a cat"},
        {"image_id": 42, "caption": "two dogs"},
    ]
    assert read_caption_results(path) == results


# =========================================================================================
# Karpathy
# =========================================================================================


def test_karpathy_coco_layout():
    records = read_karpathy(KARPATHY_COCO, "/coco")
    assert [r.image_id for r in records] == [391895, 522418, 57870]  # cocoid
    assert [r.split for r in records] == ["test", "restval", "train"]
    assert records[2].image == Path("/coco/train2014/COCO_train2014_000000057870.jpg")
    assert records[0].captions[1] == "Man riding a motor bike on a dirt road on the countryside."


def test_karpathy_split_filter():
    assert [r.split for r in read_karpathy(KARPATHY_COCO, "/coco", split="test")] == ["test"]
    assert [r.image_id for r in read_karpathy(KARPATHY_COCO, "/coco", split=("train", "restval"))] == [522418, 57870]
    with pytest.raises(ValueError, match=r"no images with split \['tset'\].*'restval', 'test', 'train'"):
        read_karpathy(KARPATHY_COCO, "/coco", split="tset")


def test_karpathy_flickr30k_layout_has_no_filepath_or_cocoid():
    records = read_karpathy(KARPATHY_FLICKR, "/flickr30k-images")
    assert records[0].image == Path("/flickr30k-images/1000092795.jpg")
    assert [r.image_id for r in records] == [0, 1]  # imgid
    assert records[1].captions == ("Several men in hard hats are operating a giant pulley system.",)


def test_karpathy_malformed_sentence(tmp_path):
    path = mutated(KARPATHY_FLICKR, tmp_path, lambda d: d["images"][0]["sentences"][1].update(raw=None))
    message = error_of(read_karpathy, path, "/x")
    assert message == f"{path}, record images[0] (imgid 0), field 'sentences[1].raw': expected a string, got null"


def test_karpathy_missing_split(tmp_path):
    path = mutated(KARPATHY_COCO, tmp_path, lambda d: d["images"][1].pop("split"))
    assert "record images[1] (imgid 1), field 'split': missing" in error_of(read_karpathy, path, "/x")


def test_karpathy_check_images(tmp_path):
    make_image(tmp_path / "1000092795.jpg")
    message = error_of(read_karpathy, KARPATHY_FLICKR, tmp_path, check_images=True)
    assert "images[1] (imgid 1)" in message and "10002456.jpg" in message


def test_karpathy_write_read_round_trip(tmp_path):
    records = [
        CaptionRecord(11, tmp_path / "val" / "a.png", ("A red square, top left.",), "val"),
        CaptionRecord(12, tmp_path / "b.png", ("Two circles.", "A pair of circles!"), "restval"),
    ]
    path = write_karpathy(tmp_path / "dataset_shapes.json", records, image_root=tmp_path, dataset="shapes")
    assert read_karpathy(path, tmp_path) == records
    document = json.loads(path.read_text())
    first, second = document["images"]
    assert document["dataset"] == "shapes"
    assert first["filepath"] == "val" and first["filename"] == "a.png" and "filepath" not in second
    assert first["sentences"][0]["tokens"] == ["a", "red", "square", "top", "left"]
    assert second["sentids"] == [1, 2] and second["imgid"] == 1 and second["cocoid"] == 12
    with pytest.raises(ValueError, match="need a split"):
        write_karpathy(tmp_path / "x.json", [CaptionRecord(1, tmp_path / "a.png", ("c",))], image_root=tmp_path)


# =========================================================================================
# VQA v2
# =========================================================================================


def test_vqa_questions_and_annotations():
    records = read_vqa(VQA_QUESTIONS, VQA_ANNOTATIONS, "/coco/val2014")
    assert [r.question_id for r in records] == [262148000, 262148001, 393225000]
    first = records[0]
    assert isinstance(first, VQARecord)
    assert first.image_id == 262148 and first.question == "Where is he looking?"
    assert first.image == Path("/coco/val2014/COCO_val2014_000000262148.jpg")
    assert len(first.answers) == 10 and first.answers[2] == "at table"
    assert first.answer == "down" and first.answer_type == "other" and first.question_type == "none of the above"
    assert records[2].answer_type == "yes/no"


def test_vqa_questions_only_have_no_answers():
    record = read_vqa(VQA_QUESTIONS, image_dir="/coco/val2014")[1]
    assert record.answers == () and record.answer is None and record.answer_type is None


def test_vqa_images_found_by_id_suffix_in_other_collections(tmp_path):
    png = make_image(tmp_path / "val2014_000000262148.png")
    plain = make_image(tmp_path / "393225.jpg")
    make_image(tmp_path / "val2014_000000000148.png")  # another id ending in the same digits must not match
    records = read_vqa(VQA_QUESTIONS, VQA_ANNOTATIONS, tmp_path, check_images=True)
    assert [r.image for r in records] == [png, png, plain]


def test_vqa_prefers_the_coco_file_name(tmp_path):
    coco = make_image(tmp_path / "COCO_val2014_000000262148.jpg")
    make_image(tmp_path / "thumb_262148.png")
    assert read_vqa(VQA_QUESTIONS, image_dir=tmp_path)[0].image == coco


def test_vqa_missing_image_is_reported_with_check_images(tmp_path):
    make_image(tmp_path / "COCO_val2014_000000262148.jpg")
    message = error_of(read_vqa, VQA_QUESTIONS, VQA_ANNOTATIONS, tmp_path, check_images=True)
    assert "questions[2] (question_id 393225000)" in message and "field 'image_id'" in message
    assert "COCO_val2014_000000393225.jpg" in message
    assert read_vqa(VQA_QUESTIONS, VQA_ANNOTATIONS, tmp_path)[2].image == tmp_path / "COCO_val2014_000000393225.jpg"


def test_vqa_ambiguous_image_files(tmp_path):
    make_image(tmp_path / "a_262148.png")
    make_image(tmp_path / "b_0262148.jpg")
    message = error_of(read_vqa, VQA_QUESTIONS, image_dir=tmp_path)
    assert "image id 262148 matches several files" in message and "a_262148.png" in message


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            lambda d: d["annotations"][1]["answers"][3].update(answer=None),
            "record annotations[1] (question_id 262148001), field 'answers[3].answer': expected a string, got null",
        ),
        (lambda d: d["annotations"].pop(2), "field 'annotations': no annotation for question_id 393225000"),
        (
            lambda d: d["annotations"][0].update(question_id=5),
            "record annotations[0] (question_id 5), field 'question_id': question_id 5 is not in the questions file",
        ),
        (
            lambda d: d["annotations"][2].update(image_id=1),
            "field 'image_id': image_id 1 differs from the question's image_id 393225",
        ),
        (
            lambda d: d["annotations"][0].pop("multiple_choice_answer"),
            "field 'multiple_choice_answer': missing; expected a string",
        ),
        (
            lambda d: d["annotations"][0].update(referents=[[[0.2, 0.5]], [[0.4, 1.5]]]),
            "field 'referents[1][0]': expected [x, y] with both in [0, 1] (fractions of the image side), got [0.4, 1.5]",
        ),
        (
            lambda d: d["annotations"][1].update(evidence=[0.2, 0.5]),
            "field 'evidence[0]': expected [x, y] with both in [0, 1]",
        ),
        (
            lambda d: d["annotations"][1].update(referents=[{"x": 0.2}]),
            "field 'referents[0]': expected a list of [x, y] points, got an object",
        ),
    ],
)
def test_vqa_malformed_annotations(tmp_path, change, expected):
    path = mutated(VQA_ANNOTATIONS, tmp_path, change)
    message = error_of(read_vqa, VQA_QUESTIONS, path, "/img")
    assert message.startswith(str(path)) and expected in message


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            lambda d: d["questions"][1].update(question_id="262148001"),
            "record questions[1], field 'question_id': expected an integer, got a string",
        ),
        (
            lambda d: d["questions"][2].update(question_id=262148000),
            "record questions[2], field 'question_id': duplicate question_id 262148000",
        ),
        (
            lambda d: d["questions"][0].update(question=["Where?"]),
            "record questions[0] (question_id 262148000), field 'question': expected a string, got a list",
        ),
    ],
)
def test_vqa_malformed_questions(tmp_path, change, expected):
    path = mutated(VQA_QUESTIONS, tmp_path, change)
    assert expected in error_of(read_vqa, path, image_dir="/img")


def test_vqa_write_read_round_trip_with_shapes_style_png_names(tmp_path):
    images = tmp_path / "images"
    for image_id in (1, 2):
        make_image(images / f"shapes_val_{image_id:012d}.png")
    records = [
        VQARecord(
            10,
            1,
            images / "shapes_val_000000000001.png",
            "What colour is the square?",
            ("red",) * 9 + ("dark red",),
            "red",
            "other",
            "what color is the",
        ),
        VQARecord(
            11, 2, images / "shapes_val_000000000002.png", "How many circles?", ("2",) * 10, "2", "number", "how many",
            referents=(((0.25, 0.5), (0.75, 0.125)),), evidence=((0.25, 0.5), (0.75, 0.125)),
        ),
        VQARecord(12, 2, images / "shapes_val_000000000002.png", "How many squares?", ("0",) * 10, "0", "number",
                  "how many", referents=((),), evidence=()),
    ]
    questions, annotations = tmp_path / "q.json", tmp_path / "a.json"
    write_vqa(questions, annotations, records, data_subtype="shapes_val", data_type="shapes")
    assert read_vqa(questions, annotations, images, check_images=True) == records
    q_doc, a_doc = json.loads(questions.read_text()), json.loads(annotations.read_text())
    assert {"info", "task_type", "data_type", "data_subtype", "license", "questions"} == set(q_doc)
    assert {"info", "data_type", "data_subtype", "license", "annotations"} == set(a_doc)
    assert a_doc["annotations"][0]["answers"][9] == {"answer": "dark red", "answer_confidence": "yes", "answer_id": 10}
    assert "referents" not in a_doc["annotations"][0]  # written only where a record has them
    assert a_doc["annotations"][1]["referents"] == [[[0.25, 0.5], [0.75, 0.125]]]
    # an empty evidence (the answer rests on no object) is written; none at all (not annotated) is not
    assert a_doc["annotations"][2]["evidence"] == [] and "evidence" not in a_doc["annotations"][0]


def test_vqa_annotation_writer_needs_answers(tmp_path):
    record = VQARecord(1, 1, tmp_path / "x.png", "Why?")
    with pytest.raises(ValueError, match="no answer"):
        write_vqa(tmp_path / "q.json", tmp_path / "a.json", [record], data_subtype="val")


def test_vqa_results_round_trip_and_duplicates(tmp_path):
    assert read_vqa_results(FIXTURES / "vqa" / "vqa_results.json")[393225000] == "yes"
    path = write_vqa_results(tmp_path / "results.json", {5: "yes", 6: "2"})
    assert read_vqa_results(path) == {5: "yes", 6: "2"}
    path.write_text(json.dumps([{"question_id": 5, "answer": "yes"}, {"question_id": 5, "answer": "no"}]))
    assert "record [1], field 'question_id': duplicate question_id 5" in error_of(read_vqa_results, path)
    path.write_text(json.dumps([{"question_id": 5, "answer": 3}]))
    assert "record [0], field 'answer': expected a string, got an integer (3)" in error_of(read_vqa_results, path)


# =========================================================================================
# LLaVA
# =========================================================================================


def test_llava_conversations():
    records = read_llava(LLAVA, "/llava/data")
    bus, text_only, pair = records
    assert isinstance(bus, ConversationRecord) and bus.id == "000000033471"
    assert bus.images == (Path("/llava/data/coco/train2017/000000033471.jpg"),)
    assert [t.role for t in bus.turns] == ["user", "assistant", "user", "assistant"]
    assert bus.turns[0].text.startswith("<image>\nWhat are the colors")
    assert text_only.images == () and text_only.turns[1].role == "assistant"
    assert len(pair.images) == 2 and pair.turns[0] == Turn("system", "You compare pictures.")


def test_llava_marker_count_must_match_images():
    path = FIXTURES / "llava" / "llava_marker_mismatch.json"
    message = error_of(read_llava, path, "/data")
    assert message.startswith(f"{path}, record [1] (id 000000052846), field 'conversations': 0 '<image>' marker(s)")
    assert "for 1 image(s)" in message


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            lambda d: d[0]["conversations"][1].update({"from": "bot"}),
            "record [0] (id 000000033471), field 'conversations[1].from': expected 'human', 'gpt' or 'system', got 'bot'",
        ),
        (
            lambda d: d[2].update(image=42),
            "record [2] (id multi_0), field 'image': expected a path or a list of paths, got an integer (42)",
        ),
        (
            lambda d: d[1].pop("conversations"),
            "record [1] (id i6IyJda_0), field 'conversations': missing; expected a list",
        ),
        (
            lambda d: d[0]["conversations"][2].update(value=None),
            "field 'conversations[2].value': expected a string, got null",
        ),
        (lambda d: d[1].update(id=None), "record [1], field 'id': expected an integer or a string, got null"),
        (
            lambda d: d[0]["conversations"][0].update(question_type=3),
            "field 'conversations[0].question_type': expected a string, got an integer (3)",
        ),
    ],
)
def test_llava_malformed_variants(tmp_path, change, expected):
    path = mutated(LLAVA, tmp_path, change)
    assert expected in error_of(read_llava, path, "/data")


def test_llava_json_lines_and_check_images(tmp_path):
    entries = json.loads(LLAVA.read_text())
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    make_image(tmp_path / "coco" / "train2017" / "000000033471.jpg")
    assert read_llava(path, tmp_path) == read_llava(LLAVA, tmp_path)
    message = error_of(read_llava, path, tmp_path, check_images=True)
    assert "line 3 (id multi_0)" in message and "VG_100K/2356347.jpg" in message


def test_llava_write_read_round_trip(tmp_path):
    records = read_llava(LLAVA, tmp_path)
    path = write_llava(tmp_path / "out" / "llava.json", records, image_dir=tmp_path)
    assert read_llava(path, tmp_path) == records
    written = json.loads(path.read_text())
    assert written[0]["image"] == "coco/train2017/000000033471.jpg" and "image" not in written[1]
    assert written[2]["conversations"][0] == {"from": "system", "value": "You compare pictures."}
    typed = [ConversationRecord("t", (), (Turn("user", "is it above the star?", question_type="spatial_it"),
                                          Turn("assistant", "no")))]
    path = write_llava(tmp_path / "typed.json", typed, image_dir=tmp_path)
    assert json.loads(path.read_text())[0]["conversations"] == [
        {"from": "human", "value": "is it above the star?", "question_type": "spatial_it"}, {"from": "gpt", "value": "no"}]
    assert read_llava(path, tmp_path) == typed
    with pytest.raises(ValueError, match="in-memory bytes"):
        write_llava(
            tmp_path / "x.json",
            [ConversationRecord("a", (png_bytes(),), (Turn("user", "<image>"),))],
            image_dir=tmp_path,
        )


# =========================================================================================
# MMMU
# =========================================================================================


def test_mmmu_parquet_folder_and_file():
    records = read_mmmu(MMMU_DIR)
    assert records == read_mmmu(MMMU_FILE)
    first, second, third = records
    assert isinstance(first, MultipleChoiceRecord)
    assert first.id == "validation_Art_1" and first.subject == "Art" and first.subfield == "Fine Arts"
    assert first.options == ("Claude Monet", "Pablo Picasso", "Vincent van Gogh", "Frida Kahlo")
    assert first.answer == "C" and first.question_type == "multiple-choice"
    assert len(first.images) == 1 and isinstance(first.images[0], bytes)
    assert load_image(first.images[0]).getpixel((0, 0)) == (200, 30, 30)
    assert first.extra == {"explanation": "", "img_type": "['Paintings']", "topic_difficulty": "Easy"}
    assert len(second.images) == 2 and second.options == ("<image 1>", "<image 2>")
    assert third.question_type == "open" and third.options == () and third.answer == "1889"


def test_mmmu_write_read_round_trip(tmp_path):
    records = read_mmmu(MMMU_DIR)
    path = write_mmmu_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet", records)
    again = read_mmmu(path)
    assert again == records and [r.extra for r in again] == [r.extra for r in records]
    schema = pq.read_schema(path)
    assert tuple(schema.names) == formats.MMMU_COLUMNS == tuple(pq.read_schema(MMMU_FILE).names)
    assert schema.field("image_1").type == pq.read_schema(MMMU_FILE).field("image_1").type


def test_mmmu_folder_is_read_split_by_split_as_published(tmp_path):
    """MMMU's hub layout: <Subject>/<split>-00000-of-00001.parquet, three splits per subject."""
    records = read_mmmu(MMMU_DIR)
    for subject in ("Art", "Math"):
        for split in ("dev", "validation", "test"):
            renamed = [replace(r, id=f"{split}_{subject}_{k}", answer="?" if split == "test" else r.answer)
                       for k, r in enumerate(records, start=1)]
            write_mmmu_parquet(tmp_path / subject / f"{split}-00000-of-00001.parquet", renamed)
    write_mmmu_parquet(tmp_path / "Math" / "validation.parquet",
                       [replace(r, id=f"val_Math_{k}") for k, r in enumerate(records, start=1)])

    def ids(path, **split):
        return [r.id for r in read_mmmu(path, **split)]

    assert ids(tmp_path / "Art") == ["validation_Art_1", "validation_Art_2", "validation_Art_3"]
    assert ids(tmp_path / "Art", split="dev") == ["dev_Art_1", "dev_Art_2", "dev_Art_3"]
    assert [r.answer for r in read_mmmu(tmp_path / "Art", split="test")] == ["?", "?", "?"]
    assert len(ids(tmp_path / "Art", split=None)) == 9  # every file
    # the top folder: every subject's files of the split, in path order; "validation.parquet" counts too
    assert ids(tmp_path) == [*(f"validation_Art_{k}" for k in (1, 2, 3)), *(f"validation_Math_{k}" for k in (1, 2, 3)),
                             *(f"val_Math_{k}" for k in (1, 2, 3))]
    # a file is read whatever the split
    assert ids(tmp_path / "Art" / "test-00000-of-00001.parquet") == ["test_Art_1", "test_Art_2", "test_Art_3"]
    with pytest.raises(FileNotFoundError) as info:
        read_mmmu(tmp_path / "Art", split="train")
    assert str(info.value) == (
        f"{tmp_path / 'Art'}: no parquet files of split 'train' in this folder or below it (MMMU's layout: "
        "<Subject>/<split>-00000-of-00001.parquet); the files here are of split(s) dev, test, validation"
    )


def test_mmmu_writer_reads_image_files_and_subject_falls_back_to_folder(tmp_path):
    image = make_image(tmp_path / "pic.png", color=(9, 8, 7))
    record = MultipleChoiceRecord(
        id="q1", question="What is in <image 1>?", options=("a", "b"), answer="A", images=(image,)
    )
    path = write_mmmu_parquet(tmp_path / "Physics" / "dev.parquet", [record])
    (loaded,) = read_mmmu(path)
    assert loaded.subject == "Physics"  # the id does not follow MMMU's <split>_<Subject>_<n>
    assert load_image(loaded.images[0]).getpixel((0, 0)) == (9, 8, 7)
    assert pq.read_table(path).column("image_1").to_pylist()[0]["path"] == "pic.png"


def write_rows(path: Path, **overrides) -> Path:
    """The fixture's table with some columns replaced."""
    table = pq.read_table(MMMU_FILE)
    for name, values in overrides.items():
        index = table.column_names.index(name)
        table = table.set_column(index, table.schema.field(name), pa.array(values, type=table.schema.field(name).type))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_mmmu_bad_options(tmp_path):
    path = write_rows(tmp_path / "Art" / "v.parquet", options=["Monet, Picasso", "['<image 1>', '<image 2>']", "[]"])
    message = error_of(read_mmmu, path)
    assert message.startswith(
        f"{path}, record row 0 (id validation_Art_1), field 'options': expected a Python list literal"
    )


def test_mmmu_reference_to_a_missing_image(tmp_path):
    questions = pq.read_table(MMMU_FILE).column("question").to_pylist()
    questions[2] = "Compare <image 1> and <image 2>."
    message = error_of(read_mmmu, write_rows(tmp_path / "v.parquet", question=questions))
    assert (
        "record row 2 (id validation_Art_3), field 'question': refers to <image 2> but the row has 1 image(s)"
        in message
    )


def test_mmmu_gap_in_image_columns(tmp_path):
    table = pq.read_table(MMMU_FILE)
    second = table.column("image_2").to_pylist()
    second[0] = {"bytes": png_bytes(), "path": None}
    first = table.column("image_1").to_pylist()
    first[0] = None
    message = error_of(read_mmmu, write_rows(tmp_path / "v.parquet", image_1=first, image_2=second))
    assert "record row 0 (id validation_Art_1), field 'image_2': image_2 is set but image_1 is empty" in message


def test_mmmu_missing_column_and_unreadable_file(tmp_path):
    path = tmp_path / "v.parquet"
    pq.write_table(pq.read_table(MMMU_FILE).drop_columns(["options"]), path)
    assert "field 'options': missing column(s) ['options']" in error_of(read_mmmu, path)
    path.write_text("id,question\n1,hello\n")
    assert "not a readable parquet file" in error_of(read_mmmu, path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        read_mmmu(empty)


# =========================================================================================
# JSONL / CSV tables
# =========================================================================================


def test_jsonl_vqa_table():
    path = FIXTURES / "table" / "vqa.jsonl"
    cat, dog, sleeping = read_table(path)
    folder = path.parent
    assert cat == VQARecord(
        0, "img/cat.png", folder / "img" / "cat.png", "What animal is this?", ("cat", "cat", "kitten"), "cat"
    )
    assert dog.answers == ("brown",) and dog.answer == "brown" and dog.question_id == 1
    assert sleeping.question_id == 77 and sleeping.answer is None and sleeping.answers == ()


def test_csv_caption_table_groups_rows_of_one_image(tmp_path):
    path = FIXTURES / "table" / "captions.csv"
    cat, dog = read_table(path, image_dir="/pictures")
    assert cat == CaptionRecord("img/cat.png", Path("/pictures/img/cat.png"), ("A cat on a sofa.", "A grey cat."))
    assert dog.captions == ("A brown dog, asleep.",)


def test_csv_vqa_table_with_answers_and_ids(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(
        "question_id,image_id,image,question,answer,answers\n"
        '5,12,a.png,What?,red,"[""red"", ""crimson""]"\n'
        "q6,x,b.png,Why?,,\n"
    )
    first, second = read_table(path)
    assert first.question_id == 5 and first.image_id == 12 and first.answers == ("red", "crimson")
    assert second.question_id == "q6" and second.answer is None and second.answers == ()


@pytest.mark.parametrize(
    "content,expected",
    [
        ("image,question,caption\na.png,What?,A cat\n", "has both 'question' and 'caption' columns"),
        ("picture,caption\na.png,A cat\n", "field 'image': no 'image' column"),
        ("image,label\na.png,cat\n", "expected columns image, question"),
        ("image,caption\na.png,A cat\nb.png,A dog,extra\n", "record line 3: 3 field(s) where the header has 2"),
        (
            "image,caption\na.png,A cat\nb.png,\n",
            "record line 3, field 'caption': expected a non-empty string, got an empty string",
        ),
        ("image,question,answers\na.png,What?,red\n", "record line 2, field 'answers': expected a list of strings"),
        ("", "empty CSV file"),
    ],
)
def test_malformed_csv_tables(tmp_path, content, expected):
    path = tmp_path / "table.csv"
    path.write_text(content)
    message = error_of(read_table, path)
    assert message.startswith(str(path)) and expected in message


def test_malformed_jsonl_tables(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text('{"image": "a.png", "question": "What?"}\n{"image": "b.png", "question": "Why?"\n')
    assert error_of(read_table, path) == f"{path}: invalid JSON at line 2, column 38: Expecting ',' delimiter"
    path.write_text('{"image": "a.png", "question": "What?", "answer": 3}\n')
    assert "record line 1, field 'answer': expected a string, got an integer (3)" in error_of(read_table, path)
    path.write_text(
        '{"image": "a.png", "question": "What?", "question_id": 1}\n{"image": "b.png", "question": "Q", "question_id": 1}\n'
    )
    assert "record line 2, field 'question_id': duplicate question_id 1 (also line 1)" in error_of(read_table, path)
    path.write_text(
        '{"image": "a.png", "caption": "A cat", "image_id": 1}\n{"image": "a.png", "caption": "A cat", "image_id": 2}\n'
    )
    assert "record line 2, field 'image_id': 2 differs from 1" in error_of(read_table, path)


def test_unsupported_table_extension(tmp_path):
    path = tmp_path / "table.tsv"
    path.write_text("image\tcaption\n")
    assert "expected .jsonl or .csv" in error_of(read_table, path)


@pytest.mark.parametrize("image", ["/etc/passwd", "../secret.png", "sub/../../secret.png", "C:\\\\x.png"])
def test_confine_rejects_paths_leaving_the_image_folder(tmp_path, image):
    path = tmp_path / "uploads" / "table.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"image": image, "caption": "x"}) + "\n")
    read_table(path)  # allowed unless confined
    message = error_of(read_table, path, confine=True)
    assert "record line 1, field 'image'" in message and ("absolute" in message or "outside" in message)


def test_confine_accepts_paths_inside_the_folder(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text(json.dumps({"image": "sub/../a.png", "caption": "x"}) + "\n")
    (record,) = read_table(path, confine=True)
    assert record.image == tmp_path.resolve() / "a.png"


def test_table_check_images(tmp_path):
    shutil.copy(FIXTURES / "table" / "vqa.jsonl", tmp_path)
    make_image(tmp_path / "img" / "cat.png")
    message = error_of(read_table, tmp_path / "vqa.jsonl", check_images=True)
    assert "2 referenced image file(s) not found" in message and "line 2" in message and "img/dog.png" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_table_write_read_round_trip(tmp_path, suffix):
    vqa = [
        VQARecord(1, 10, tmp_path / "a.png", "What, exactly?", ("red", "red, dark"), "red", "other"),
        VQARecord(2, 11, tmp_path / "sub" / "b.png", "Why?", (), None),
    ]
    path = write_table(tmp_path / f"vqa{suffix}", vqa)
    assert read_table(path) == vqa
    captions = [
        CaptionRecord(3, tmp_path / "a.png", ("one", "two"), "train"),
        CaptionRecord(4, tmp_path / "c.png", ("three",), "val"),
    ]
    path = write_table(tmp_path / f"captions{suffix}", captions)
    assert read_table(path) == captions


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    import os
    import stat

    from multimodal_models.io import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "hello")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~_UMASK
    assert not list(tmp_path.glob(".a.txt.*"))  # no temporary file left behind
