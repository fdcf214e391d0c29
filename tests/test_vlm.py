"""The native multimodal LM: cached decoding equals full recomputation, batched generation equals
one-by-one, streaming equals the whole answer, the chat template, sampling and beam search."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from multimodal_models.data.preprocess import ImageProcessor
from multimodal_models.data.tokenizer import WordTokenizer
from multimodal_models.models.chat import CHAT_SPECIAL_TOKENS, WordChatTemplate, normalize_messages
from multimodal_models.models.generation import (GenerationConfig, TextStream, beam_search, beam_search_batch,
                                                  decode_tokens, filter_logits)
from multimodal_models.models.text import CausalDecoder, DecoderConfig
from multimodal_models.models.vision import VisionConfig
from multimodal_models.models.vlm import VisionLanguageModel, VLMSession, pixel_shuffle
from multimodal_models.shapes.models import ShapesVLM

WORDS = "is there a red blue green circle square star what color shape size yes no two one describe the image . ?"


def tiny_vlm(seed: int = 0, sharpen: bool = True, model_class: type[VisionLanguageModel] = VisionLanguageModel,
             **options) -> VisionLanguageModel:
    """A tiny random model; model_class: VisionLanguageModel or a model type built on it (its config_class
    takes `options`: shapes.models.ShapesVLM for image readers)."""
    torch.manual_seed(seed)
    tokenizer = WordTokenizer.train([WORDS], extra_special_tokens=CHAT_SPECIAL_TOKENS)
    config = model_class.config_class(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, pool="mean", class_token=False),
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, width=32, depth=2, heads=2, max_length=128),
        pixel_shuffle=2, image_token_id=tokenizer.image_id, **options)
    model = model_class(config).eval()
    if sharpen:  # larger random weights so that generation does not stop at once
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.mul_(8)
            model.decoder.lm_head.weight[tokenizer.eos_id] -= 1.0
            model.decoder.lm_head.weight[tokenizer.token_to_id("<user>")] -= 1.0
    model.tokenizer = tokenizer
    model.image_processor = ImageProcessor(size={"height": 32, "width": 32})
    return model


IMAGES = [Image.new("RGB", (40, 40), c) for c in ((250, 0, 0), (0, 0, 250), (0, 200, 0))]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_decoding_equals_full_forward(position):
    torch.manual_seed(0)
    decoder = CausalDecoder(DecoderConfig(vocab_size=40, width=32, depth=2, heads=4, kv_heads=2, position=position,
                                          norm="rmsnorm", mlp="gated", act="silu")).eval()
    ids = torch.randint(0, 40, (2, 12))
    full = decoder(ids)
    cache = decoder.new_cache(2, 16)
    pieces = [decoder(ids[:, :5], cache=cache)] + [decoder(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_generation_with_and_without_cache_and_batched_are_identical(image_attention):
    model = tiny_vlm(image_attention=image_attention)
    questions = ["is there a red circle?", "what color is the star?", "describe the image."]
    with_cache = [model.ask(i, q, max_new_tokens=6) for i, q in zip(IMAGES, questions)]
    without_cache = [model.ask(i, q, max_new_tokens=6, use_cache=False) for i, q in zip(IMAGES, questions)]
    assert with_cache == without_cache
    assert any(with_cache)  # something was generated
    assert model.answer_batch(questions, images=IMAGES, max_new_tokens=6) == with_cache


def test_a_bidirectional_image_block_sees_its_whole_image_and_nothing_after_it():
    model = tiny_vlm(sharpen=False, image_attention="bidirectional")
    image_id, K = model.config.image_token_id, model.config.tokens_per_image
    ids = torch.tensor([[7] + [image_id] * K + [8, 9] + [image_id] * K + [10]])  # text, image 1, text, image 2, text
    features = torch.randn(2, K, model.config.decoder.width)
    changed = features.clone()
    changed[0, -1] += 10 * torch.randn(model.config.decoder.width)  # the last token of the first image

    def hidden(image_embeddings, mask):  # the projected image tokens in place of the placeholders
        embeds = model.decoder.embed(ids).masked_scatter((ids == image_id)[..., None],
                                                         image_embeddings.reshape(-1, image_embeddings.shape[-1]))
        return model.decoder(embeds=embeds, mask=mask, return_hidden=True)[0]

    block = model.image_block_mask(ids, None)
    moved = (hidden(features, block) - hidden(changed, block)).abs().sum(-1) > 1e-6
    assert moved.tolist() == [False] + [True] * K + [True] * (K + 3)  # the first image's first token sees its last
    causal_moved = (hidden(features, None) - hidden(changed, None)).abs().sum(-1) > 1e-6
    assert causal_moved.tolist() == [False] * K + [True] * (K + 4)
    mask = block[0, 0]
    first, second = 1, K + 3
    assert mask[first, K] and not mask[first, second] and mask[second, second + K - 1]
    assert not mask[0, first] and not mask[K + 1, K + 2] and mask[K + 2, K + 1]  # text stays causal
    step = model.image_block_mask(ids[:, -1:], None, start=ids.shape[1] - 1)  # a step after a cached prompt
    assert step.shape == (1, 1, 1, ids.shape[1]) and bool(step.all())


def test_streaming_gives_the_same_text_in_pieces():
    model = tiny_vlm()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    pieces = list(model.chat(messages, images=IMAGES[:1], stream=True, max_new_tokens=8))
    assert len(pieces) > 1
    assert "".join(pieces) == model.chat(messages, images=IMAGES[:1], max_new_tokens=8)


def test_several_images_and_turns():
    model = tiny_vlm()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "image", "image": IMAGES[1]},
                                     {"type": "text", "text": "what color is the circle?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "what shape is the blue square?"},
    ]
    reply = model.chat(messages, max_new_tokens=5)
    assert isinstance(reply, str)
    with pytest.raises(ValueError, match="more image parts"):
        model.chat([{"role": "user", "content": "<image> <image> what color?"}], images=IMAGES[:1])
    with pytest.raises(ValueError, match="no place"):
        model.chat([{"role": "user", "content": "what color?"}], images=IMAGES[:1])


def test_sampling_is_reproducible_with_a_seed_and_beam_search_runs():
    model = tiny_vlm()
    a = model.ask(IMAGES[0], "describe the image.", do_sample=True, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=8)
    b = model.ask(IMAGES[0], "describe the image.", do_sample=True, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=8)
    assert a == b
    beam = model.ask(IMAGES[0], "describe the image.", num_beams=3, max_new_tokens=6)
    assert isinstance(beam, str)
    with pytest.raises(ValueError, match="cannot stream"):
        model.chat([{"role": "user", "content": "<image> hi"}], images=IMAGES[:1], stream=True, num_beams=2)


def test_captions_are_decoded_with_the_configured_beam_width_one_by_one_or_batched():
    model = tiny_vlm(caption_beams=3)
    greedy = [model.caption(image, num_beams=1, max_new_tokens=8) for image in IMAGES]
    beams = [model.caption(image, num_beams=3, max_new_tokens=8) for image in IMAGES]
    assert greedy != beams  # the random model's beams find other captions
    assert [model.caption(image, max_new_tokens=8) for image in IMAGES] == beams  # config.caption_beams
    pixels = model.image_processor(IMAGES)
    assert model.caption_batch(pixels=pixels, max_new_tokens=8) == beams
    assert model.caption_batch(images=IMAGES, max_new_tokens=8) == beams
    assert model.caption_batch(pixels=pixels, max_new_tokens=8, searches=2) == beams  # searches side by side, in chunks
    assert model.caption_batch(pixels=pixels, max_new_tokens=8, num_beams=1) == greedy
    streamed = model.caption(IMAGES[0], stream=True, max_new_tokens=8)  # beam search cannot stream: greedy
    assert "".join(streamed) == greedy[0]
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        model.caption_batch(pixels=pixels, num_beams=0)
    with pytest.raises(ValueError, match="caption_beams must be at least 1"):
        tiny_vlm(caption_beams=0)


class ScriptedSession:
    """A DecodingSession whose next-token logits depend only on (prompt, tokens so far)."""

    def __init__(self, prompts: list[int], vocab: int = 7):
        self.rows = [(p, ()) for p in prompts]
        self.vocab = vocab

    def _logits(self) -> torch.Tensor:
        def one(prompt, tokens):
            seed = hash((prompt, tokens)) % 2**31
            return torch.randn(self.vocab, generator=torch.Generator().manual_seed(seed)) * 2
        return torch.stack([one(*row) for row in self.rows])

    def prefill(self) -> torch.Tensor:
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.rows = [(p, seq + (int(t),)) for (p, seq), t in zip(self.rows, tokens, strict=True)]
        return self._logits()

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


def test_beam_searches_side_by_side_find_what_each_finds_alone():
    """beam_search_batch: each prompt's search as beam_search runs it alone, searches ending at
    different steps (stop token 0) giving up their rows."""
    config = GenerationConfig(max_new_tokens=9, num_beams=3)
    prompts = list(range(12))
    alone = [beam_search(ScriptedSession([p]), config, {0}) for p in prompts]
    together = beam_search_batch(ScriptedSession(prompts), config, {0}, searches=len(prompts))
    assert together == alone
    assert len({len(found) for found in alone}) > 2  # ended at several different steps
    with pytest.raises(ValueError, match="12 prompts"):
        beam_search_batch(ScriptedSession(prompts), config, {0}, searches=3)


def test_stop_strings_cut_the_text_and_are_never_shown():
    pieces = ["a", " red", " cir", "cle", " and", " more"]
    stream = TextStream(lambda ids: "".join(pieces[: len(ids)]), stop=(" and",))
    shown = "".join(stream.push(k) for k in range(len(pieces)))
    assert shown == "a red circle" and stream.stopped


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, GenerationConfig(top_p=0.75)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, GenerationConfig(top_k=1)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_chat_template_marks_only_assistant_words_as_targets():
    tokenizer = WordTokenizer.train([WORDS], extra_special_tokens=CHAT_SPECIAL_TOKENS)
    template = WordChatTemplate(tokenizer, image_tokens=4)
    encoding = template.encode([{"role": "user", "content": "<image>\nwhat color is the star?"},
                                {"role": "assistant", "content": "red"}])
    tokens = [tokenizer.id_to_token(i) for i in encoding.ids]
    assert tokens[:7] == ["<bos>", "<user>", "<image>", "<image>", "<image>", "<image>", "what"]
    assert [t for t, target in zip(tokens, encoding.targets) if target] == ["red", "<eos>"]
    assert normalize_messages([{"role": "user", "content": "a <image> b"}])[0][1] == [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    with pytest.raises(ValueError, match="role"):
        normalize_messages([{"role": "robot", "content": "hi"}])


def test_pixel_shuffle_groups_neighbouring_patches():
    tokens = torch.arange(16).float().view(1, 16, 1)  # a 4x4 grid, one channel
    shuffled = pixel_shuffle(tokens, 2)
    assert shuffled.shape == (1, 4, 4)
    assert shuffled[0, 0].tolist() == [0, 1, 4, 5]


def test_save_and_load_round_trip(tmp_path):
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "m", dtype=torch.float16)
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.tokenizer.vocab_size == model.tokenizer.vocab_size
    assert loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b, msg=name)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_a_packed_training_sequence_trains_each_segment_as_if_it_were_alone(tiny_shapes, tmp_path, image_attention):
    """Everything said about one image shares one sequence (vlm_task.py): each segment sees the
    image prefix and itself, so its logits equal those of `prefix + segment` on its own."""
    import random

    from multimodal_models.training.config import config_from_raw
    from multimodal_models.training.loop import build_task
    from multimodal_models.training.vlm_task import pack

    from .conftest import TINY_MODELS, tiny_config

    raw = tiny_config("vlm", tiny_shapes, tmp_path / "run")
    raw["model"] = {**TINY_MODELS["vlm"], "image_attention": image_attention}
    task = build_task(config_from_raw(raw), progress=False)
    model = task.model.eval()
    batch = task.make_batch([0], random.Random(0))
    unit = task.unit_sequence(task.units[0], random.Random(0))  # the same draw as the batch's
    segments = pack(unit, task.max_length)[3]
    assert len(unit.segments) > 3 and segments.count(1) > 0
    with torch.no_grad():
        packed = model(batch["ids"], batch["pixels"], mask=batch["mask"], positions=batch["positions"]).logits[0]
        for number, (seg_ids, _, _) in enumerate(unit.segments, start=1):
            where = [i for i, s in enumerate(segments) if s == number]
            if not where:  # left out: longer than max_length
                continue
            alone = model(torch.tensor([unit.prefix + seg_ids]), batch["pixels"]).logits[0]
            torch.testing.assert_close(packed[: len(unit.prefix)], alone[: len(unit.prefix)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed[where], alone[len(unit.prefix):], atol=1e-5, rtol=1e-5)


def test_a_training_batch_holds_each_packed_row_with_its_mask_and_reuses_encodings(tiny_shapes, tmp_path, monkeypatch):
    """make_batch: each row is pack()'s sequence of its unit, padded; labels are the trained tokens;
    a real position sees the earlier positions of its segment and of the prefix, padding only itself.
    The chats' encodings are remembered: the same draw again encodes nothing and gives the same batch."""
    import random

    from multimodal_models.models.packed_attention import PADDING
    from multimodal_models.training.config import config_from_raw
    from multimodal_models.training.loop import build_task
    from multimodal_models.training.vlm_task import pack

    from .conftest import tiny_config

    task = build_task(config_from_raw(tiny_config("vlm", tiny_shapes, tmp_path / "run")), progress=False)
    indices = [0, 1, 2, 3]
    batch = task.make_batch(indices, random.Random(0))
    rng = random.Random(0)
    rows = [pack(task.unit_sequence(task.units[i], rng), task.max_length) for i in indices]
    T = batch["ids"].shape[1]
    assert T == max(len(r[0]) for r in rows) and any(len(r[0]) < T for r in rows)  # some padding
    for b, (ids, targets, positions, segments, _) in enumerate(rows):
        n = len(ids)
        assert batch["ids"][b].tolist() == ids + [task.tokenizer.pad_id] * (T - n)
        assert batch["labels"][b].tolist() == [i if t else -100 for i, t in zip(ids, targets)] + [-100] * (T - n)
        assert batch["positions"][b, :n].tolist() == positions
        assert batch["segments"][b].tolist() == segments + [PADDING] * (T - n)
        seen = [[u <= t and segments[u] in (0, segments[t]) for u in range(n)] + [False] * (T - n) for t in range(n)]
        seen += [[u == t for u in range(T)] for t in range(n, T)]
        assert batch["mask"][b, 0].tolist() == seen
    assert batch["tokens"] == sum(sum(r[1]) for r in rows)

    def no_encoding(messages, **options):
        raise AssertionError("encoded again")

    monkeypatch.setattr(task.template, "encode", no_encoding)
    again = task.make_batch(indices, random.Random(0))
    for key in ("ids", "labels", "positions", "segments", "mask"):
        assert torch.equal(again[key], batch[key])


def test_question_rates_train_on_a_share_of_each_named_question_type(tiny_shapes, tmp_path):
    """task_options.question_rates keeps each question of a named type with that chance, drawn every
    time its image comes round; other types, captions and dialogues are all kept. Unknown types and
    shares outside (0, 1] are refused, naming the option."""
    import random

    from multimodal_models.training.config import config_from_raw
    from multimodal_models.training.loop import build_task

    from .conftest import tiny_config

    def task_with(rates):
        raw = tiny_config("vlm", tiny_shapes, tmp_path / "run")
        raw["task_options"] = {"question_rates": rates}
        return build_task(config_from_raw(raw), progress=False)

    task = task_with({"exist": 0.25, "count": 1.0})
    rng = random.Random(0)
    kept, offered = {}, {}
    for _ in range(20):
        for unit in task.units:
            texts = [messages[0]["content"][1]["text"] for messages, _ in task._chats(unit, rng)
                     if isinstance(messages[0]["content"], list)]
            for q in unit.qa:
                offered[q.question_type] = offered.get(q.question_type, 0) + 1
                kept[q.question_type] = kept.get(q.question_type, 0) + texts.count(q.question)
            assert len(texts) - sum(t in {q.question for q in unit.qa} for t in texts) == 1  # the caption
            assert len(task._chats(unit, rng)) >= 1 + len(unit.chats)
    assert offered["exist"] > 400
    assert 0.2 < kept["exist"] / offered["exist"] < 0.3
    assert all(kept[t] == offered[t] for t in offered if t != "exist")  # count's 1.0 and the unnamed ones
    # an image with only exist questions, no caption and no dialogue still trains on one of them
    from multimodal_models.training.vlm_task import ImageExamples

    lone = ImageExamples(task.units[0].images, qa=[q for u in task.units for q in u.qa if q.question_type == "exist"][:3])
    task_rare = task_with({"exist": 1e-9})
    assert all(len(task_rare._chats(lone, random.Random(seed))) == 1 for seed in range(5))

    with pytest.raises(ValueError, match=r"question_rates names .*\['exsit'\].*'exist'"):
        task_with({"exsit": 0.5})
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=r"task_options.question_rates.exist: expected a share in \(0, 1\]"):
            task_with({"exist": bad})
    # values that are no share at all are refused when the config is read (typed task options)
    from multimodal_models.errors import DataFormatError

    for bad in ("half", True):
        with pytest.raises(DataFormatError, match=r"task_options.question_rates.exist: expected float"):
            task_with({"exist": bad})
    with pytest.raises(DataFormatError, match=r"task_options.question_rates: expected dict"):
        task_with(["exist"])


def test_dialogue_accuracy_per_turn_and_per_form_of_question(tmp_path, monkeypatch):
    """Each assistant turn is scored after the gold history, by turn number and by the form of the
    user turn it answers; turns without a question_type count in the totals only."""
    from multimodal_models.data.records import ConversationRecord, Turn
    from multimodal_models.data.splits import ImageStore
    from multimodal_models.evaluate.harness import evaluate_dialogues

    model = tiny_vlm()
    IMAGES[0].save(tmp_path / "a.png")
    image = tmp_path / "a.png"

    def chat(*exchanges):
        turns = []
        for k, (question, form, answer) in enumerate(exchanges):
            turns += [Turn("user", ("<image>\n" if k == 0 else "") + question, question_type=form),
                      Turn("assistant", answer)]
        return ConversationRecord(str(len(exchanges)), (image,), tuple(turns))

    conversations = [chat(("is there a red circle?", "exist", "yes"), ("is it above the star?", "spatial_it", "no")),
                     chat(("is there a blue star?", "exist", "yes"), ("is it above the circle?", "spatial_it", "yes"),
                          ("what color is it?", "query_it", "blue"), ("what shape is it?", None, "yes"))]
    yes = model.tokenizer.encode("yes")
    monkeypatch.setattr(model, "generate_batch", lambda prompts, features, **kw: [yes for _ in prompts])
    scores = evaluate_dialogues(model, conversations, ImageStore([image], model.image_processor, progress=False))
    assert scores["turn_accuracy"] == 66.67 and scores["num_turns"] == 6 and scores["num_dialogues"] == 2
    assert scores["perTurn"] == {"1": 100.0, "2": 50.0, "3": 0.0, "4": 100.0}
    assert scores["perQuestionType"] == {"exist": 100.0, "query_it": 0.0, "spatial_it": 50.0}
    assert scores["numPerQuestionType"] == {"exist": 2, "query_it": 1, "spatial_it": 2}


@pytest.mark.parametrize("readers", [False, True])
def test_decoding_goes_on_after_the_model_writes_its_placeholder(readers):
    """An undertrained model may rate <image> highest. A placeholder the model writes is text (as in
    transformers): it brings no image embeddings, and greedy, sampled, beam and batched decoding, with
    the KV cache and without it, go on after it (before, the next step failed). ShapesVLM's image
    readers read only the prompt's images then (they counted every <image> in the ids, and without the
    cache indexed past the image features)."""
    options = {"model_class": ShapesVLM, "image_reader_blocks": (0, 1)} if readers else {}
    model = tiny_vlm(seed=3, **options)
    placeholder = model.config.image_token_id

    def prefer_the_placeholder(_module, _inputs, logits):  # swamps every other token
        logits[..., placeholder] += 100.0
        return logits

    model.decoder.lm_head.register_forward_hook(prefer_the_placeholder)
    image = IMAGES[0]
    for options in ({}, {"do_sample": True, "seed": 0}, {"num_beams": 3}, {"use_cache": False}):
        generation = GenerationConfig(max_new_tokens=6, **options)
        encoding = model.chat_template().encode([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": "what colour is it?"}]}],
            add_generation_prompt=True)
        session = VLMSession(model, torch.tensor([encoding.ids]), model._pixels(encoding.images), generation)
        with torch.no_grad():
            tokens = list(decode_tokens(session, generation, model.chat_template().stop_ids()))
        assert tokens == [placeholder] * 6, options  # it wrote <image> and went on
        text = model.ask(image, "what colour is it?", max_new_tokens=6, **options)
        assert "<image>" not in text
    answers = model.answer_batch(["what colour is it?"] * 2, images=IMAGES[:2], max_new_tokens=6)
    assert all("<image>" not in a for a in answers)
    assert model.caption_batch(images=IMAGES[:2], num_beams=2, max_new_tokens=6)


def test_generation_runs_no_forward_pass_after_its_last_token():
    from multimodal_models.models.generation import GenerationConfig, generate_tokens

    class Counting:
        steps = 0

        def prefill(self):
            return torch.tensor([[0.0, 1.0, 0.0]])

        def step(self, tokens):
            Counting.steps += 1
            return torch.tensor([[0.0, 1.0, 0.0]])

    tokens = list(generate_tokens(Counting(), GenerationConfig(max_new_tokens=5), stop_ids=set()))
    assert tokens == [1] * 5 and Counting.steps == 4  # prefill gives the first; each later token one step
