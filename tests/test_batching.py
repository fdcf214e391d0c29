"""Continuous batching: sequences that join and leave one decode batch (BatchedKVCache,
VisionLanguageModel.decode_step) get the logits and tokens they get alone, for our VLM (learned
positions, bidirectional image attention), ShapesVLM with image readers, and a LLaVA checkpoint
(RoPE, grouped-query attention); and the server's batching engine (serve/batching.py) on its own."""

from __future__ import annotations

import pytest
import torch

from multimodal_models.models.generation import GenerationConfig, generate_tokens, pick_token, sampling_generator
from multimodal_models.models.vlm import VisionLanguageModel, VLMSession
from multimodal_models.shapes.models import ShapesVLM

from .test_vlm import IMAGES, tiny_vlm

torch.set_num_threads(1)
QUESTIONS = ["what color is the circle?", "describe the image.", "is there a red star?", "what shape is it?",
             "how many squares are there?"]


def prompts(model: VisionLanguageModel) -> list[tuple[list[int], torch.Tensor | None]]:
    """Prompts of different lengths with one, two or no images."""
    template = model.chat_template()
    out = []
    for i, question in enumerate(QUESTIONS):
        images = [IMAGES[i % 3], IMAGES[(i + 1) % 3]][: (i % 3)]  # 0, 1, 2 images
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
        encoding = template.encode([{"role": "user", "content": content}], add_generation_prompt=True)
        out.append((encoding.ids, model._pixels(encoding.images)))
    return out


def alone(model, ids, pixels, config: GenerationConfig, stop_ids) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and the logits that chose them (the prompt's, then each step's), decoded alone (VLMSession, as
    model.chat decodes)."""
    with torch.no_grad():
        session = VLMSession(model, torch.tensor([ids]), pixels, config)
    logits_seen = []
    original_prefill, original_step = session.prefill, session.step

    def prefill():
        logits = original_prefill()
        logits_seen.append(logits[0])
        return logits

    def step(tokens):
        logits = original_step(tokens)
        logits_seen.append(logits[0])
        return logits

    session.prefill, session.step = prefill, step
    with torch.no_grad():
        return list(generate_tokens(session, config, stop_ids)), logits_seen


def side_by_side(model, requests, configs, stop_ids, joins_at: list[int]):
    """Decode all requests in one BatchedKVCache; request i joins at step joins_at[i] (after its prompt has run,
    together with the others joining then), each leaves when it ends. Returns each one's tokens, the logits
    of its prompt and of each step, and the batch size of each step."""
    cache = model.decoder.new_batched_cache()
    rows: list[int] = []  # request of each row
    last: dict[int, int] = {}
    tokens = {i: [] for i in range(len(requests))}
    logits_seen = {i: [] for i in range(len(requests))}
    generators = {i: sampling_generator(c) for i, c in enumerate(configs)}
    waiting = list(range(len(requests)))
    step = 0
    sizes = []

    def accept(i, token) -> bool:
        if token in stop_ids:
            return False
        tokens[i].append(token)
        last[i] = token
        return len(tokens[i]) < configs[i].max_new_tokens

    while waiting or rows:
        joining = [i for i in waiting if joins_at[i] <= step]
        if joining:  # their prompts run together (prefill_batch), then they join the batch
            prompts = [requests[i][0] for i in joining]
            prefilled, first = model.prefill_batch(prompts, [requests[i][1] for i in joining],
                                                   room=max(configs[i].max_new_tokens for i in joining) + 1)
            for row, i in enumerate(joining):
                waiting.remove(i)
                logits_seen[i].append(first[row])
                if accept(i, pick_token(first[row], configs[i], generators[i])):
                    cache.add(prefilled, row, len(prompts[row]))
                    rows.append(i)
        if rows:
            sizes.append(len(rows))
            logits = model.decode_step(torch.tensor([last[i] for i in rows]), cache)
            ended = []
            for row, i in enumerate(rows):
                logits_seen[i].append(logits[row])
                if not accept(i, pick_token(logits[row], configs[i], generators[i])):
                    ended.append(row)
            for row in sorted(ended, reverse=True):
                cache.remove(row)
                rows[row] = rows[-1]
                rows.pop()
        step += 1
    return tokens, logits_seen, sizes


def check_side_by_side(model, configs, joins_at):
    requests = prompts(model)
    stop_ids = model.chat_template().stop_ids()
    expected = [alone(model, ids, pixels, config, stop_ids) for (ids, pixels), config in zip(requests, configs)]
    with torch.no_grad():
        tokens, logits_seen, sizes = side_by_side(model, requests, configs, stop_ids, joins_at)
    assert max(sizes) >= 3, sizes  # they really shared steps
    for i, (want_tokens, want_logits) in enumerate(expected):
        assert tokens[i] == want_tokens, i
        assert len(want_tokens) >= 2, "the test needs answers that go on"
        # the alone run steps once more after its last token; compare the steps both made
        # float32 rounding: a batched matmul adds in another order (the random weights are large: logits ~20)
        for got, want in zip(logits_seen[i], want_logits):
            torch.testing.assert_close(got, want, atol=5e-5 * float(want.abs().max()), rtol=0)
    return tokens


GREEDY = [GenerationConfig(max_new_tokens=n) for n in (9, 5, 12, 7, 10)]
SAMPLED = [GenerationConfig(max_new_tokens=n, do_sample=True, temperature=0.9, top_p=0.95, top_k=k, seed=s)
           for n, k, s in ((9, 0, 1), (5, 5, 2), (12, 0, 3), (7, 0, 1), (10, 8, 5))]


@pytest.mark.parametrize("configs", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_a_batch_of_sequences_decodes_as_each_alone(configs, image_attention):
    model = tiny_vlm(image_attention=image_attention)
    assert model.can_decode_in_batches()
    check_side_by_side(model, configs, joins_at=[0, 0, 2, 2, 5])


@pytest.mark.parametrize("configs", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_image_readers_read_each_sequences_own_images_in_a_batch(configs):
    model = tiny_vlm(model_class=ShapesVLM, image_reader_blocks=(0, 1), image_reader_sink=True)
    assert model.can_decode_in_batches()
    check_side_by_side(model, configs, joins_at=[0, 1, 1, 4, 4])


def test_a_batch_of_one_is_the_sequence_alone_to_the_bit():
    model = tiny_vlm(model_class=ShapesVLM, image_reader_blocks=(0, 1), image_reader_sink=True)
    requests, stop_ids = prompts(model), model.chat_template().stop_ids()
    with torch.no_grad():  # each joins after the one before has left
        tokens, logits_seen, sizes = side_by_side(model, requests, GREEDY, stop_ids, joins_at=[0, 20, 40, 60, 80])
    assert max(sizes) == 1
    for i, ((ids, pixels), config) in enumerate(zip(requests, GREEDY)):
        want_tokens, want_logits = alone(model, ids, pixels, config, stop_ids)
        assert tokens[i] == want_tokens
        assert all(torch.equal(got, want) for got, want in zip(logits_seen[i], want_logits))


def test_a_model_whose_hook_keeps_unknown_state_is_not_batched():
    class Hooked(VisionLanguageModel):
        def block_hook(self, ids, features, cache, packed, slots=None):
            return None

    model = tiny_vlm()
    model.__class__ = Hooked
    assert not model.can_decode_in_batches()


def test_the_batch_cache_grows_moves_rows_and_masks_each_rows_own_positions():
    model = tiny_vlm()
    cache = model.decoder.new_batched_cache()
    sessions = []
    for length in (3, 70, 5):  # 70 > the first allocation of 64 positions
        session = VLMSession(model, torch.randint(10, 20, (1, length)), None, GenerationConfig(max_new_tokens=2))
        with torch.no_grad():
            session.prefill()
        cache.add(session.cache)
        sessions.append(session)
    assert cache.size == 3 and cache.lengths == [3, 70, 5] and cache.length == 70
    mask = cache.attention_mask()
    assert mask.shape == (3, 71) and mask.sum(1).tolist() == [4, 71, 6]
    assert cache.positions()[:, 0].tolist() == [3, 70, 5]
    cache.remove(0)  # the last row moves into row 0
    assert cache.lengths == [5, 70]
    torch.testing.assert_close(cache.keys[1][0, :, :5], sessions[2].cache.keys[1][0, :, :5])
    with pytest.raises(ValueError, match="one token to each"):
        cache.update(0, torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))


@pytest.fixture(scope="module", params=["llama-clip", "qwen2-siglip", "idefics3-split"])
def checkpoint(request, tmp_path_factory):
    pytest.importorskip("transformers")
    import multimodal_models

    from .test_pretrained_vlm import make_idefics3, make_llava

    folder = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("idefics3"):
        make_idefics3(folder, splitting=True)
    else:
        make_llava(folder, request.param)
    return multimodal_models.load(folder)


@pytest.mark.parametrize("configs", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_hugging_face_checkpoint_decodes_in_a_batch_as_alone(checkpoint, configs):
    """LLaVA (RoPE at each row's own positions, grouped-query attention, the checkpoint's template) and
    Idefics3 (images split into tiles: prompts with different numbers of image tokens)."""
    assert checkpoint.can_decode_in_batches()
    check_side_by_side(checkpoint, configs, joins_at=[0, 0, 2, 2, 5])
