"""LoRA adapters: only they train, training teaches a rule, merging changes nothing in the outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimodal_models.models.lora import (LoRALinear, apply_lora, lora_layers, lora_modules, merge_lora, unmerge_lora,
                                          wrap_linear)
from multimodal_models.models.text import CausalDecoder, DecoderConfig

torch.set_num_threads(1)


def llama_like_decoder(tie: bool = False) -> CausalDecoder:
    torch.manual_seed(0)
    decoder = CausalDecoder(DecoderConfig(vocab_size=48, width=32, depth=2, heads=4, kv_heads=2, mlp="gated",
                                          act="silu", norm="rmsnorm", position="rope", qkv_bias=False, out_bias=False,
                                          mlp_bias=False, tie_embeddings=tie, max_length=64))
    with torch.no_grad():  # weights of a trained model's size, not the tiny ones of a fresh init
        for p in decoder.parameters():
            p.mul_(5)
    return decoder


def marker_sequences(count: int, generator: torch.Generator, length: int = 16) -> torch.Tensor:
    """Token ids (count, length): a random token of 0-3, then its marker (16 after an even token, 17 after an
    odd one), and so on. The markers follow a rule; the other tokens cannot be predicted."""
    tokens = torch.randint(0, 4, (count, length // 2), generator=generator)
    return torch.stack([tokens, 16 + tokens % 2], dim=2).flatten(1)


def marker_accuracy(decoder: CausalDecoder, ids: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = decoder(ids)[:, 0::2].argmax(-1)  # what each token 0-3 predicts comes next
    return (predicted == ids[:, 1::2]).float().mean().item()


def test_lora_decoder_trains_and_merging_gives_the_same_outputs():
    decoder = llama_like_decoder()
    keys_before = set(decoder.state_dict())
    frozen = {name: p.detach().clone() for name, p in decoder.named_parameters()}
    trainable = apply_lora(decoder, targets=("q", "k", "v", "out"), rank=4, alpha=8)
    assert len(lora_layers(decoder)) == 2 * 4 and len(trainable) == 2 * 2 * 4
    assert {id(p) for p in decoder.parameters() if p.requires_grad} == {id(p) for p in trainable}

    # the adapters learn the marker rule: fresh sequences (not seen in training) get their markers right,
    # where the base model gets almost none (chance among 48 tokens is 2%; guessing 16 or 17, 50%). This
    # base passes 90% by step 15 for each of ten data seeds, 40 other random bases by step 40 at the latest.
    ids = marker_sequences(64, torch.Generator().manual_seed(1))
    before = decoder(ids)
    assert marker_accuracy(decoder, ids) < 0.5
    stream = torch.Generator().manual_seed(2)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(80):
        batch = marker_sequences(8, stream)
        logits = decoder(batch)
        loss = F.cross_entropy(logits[:, 0::2].flatten(0, 1), batch[:, 1::2].flatten())  # the predictable tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert marker_accuracy(decoder, ids) >= 0.9
    for name, p in decoder.named_parameters():  # the base weights did not move
        if name in frozen:
            assert torch.equal(p, frozen[name]), name

    decoder.eval()
    with torch.no_grad():
        adapted = decoder(ids)
        assert not torch.allclose(adapted, before, atol=1e-3)
        merge_lora(decoder, unload=False)
        torch.testing.assert_close(decoder(ids), adapted, atol=1e-4, rtol=1e-4)
        unmerge_lora(decoder)
        torch.testing.assert_close(decoder(ids), adapted, atol=1e-4, rtol=1e-4)
        for name, p in decoder.named_parameters():
            if name in frozen:
                torch.testing.assert_close(p, frozen[name], atol=1e-6, rtol=0)
        merge_lora(decoder)  # unload: plain nn.Linear layers, the original state-dict keys
        assert not lora_layers(decoder)
        assert set(decoder.state_dict()) == keys_before
        torch.testing.assert_close(decoder(ids), adapted, atol=1e-4, rtol=1e-4)


def test_new_adapters_start_as_the_identity_and_dropout_only_while_training():
    decoder = llama_like_decoder().eval()
    ids = torch.randint(0, 48, (2, 10))
    with torch.no_grad():
        reference = decoder(ids)
        apply_lora(decoder, targets=("q", "v", "gate", "up", "down"), rank=2, alpha=4, dropout=0.5)
        torch.testing.assert_close(decoder(ids), reference, atol=0, rtol=0)
    layer = decoder.blocks[0].attn.q
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0


def test_tied_output_layer_is_not_wrapped_and_unknown_targets_are_errors():
    decoder = llama_like_decoder(tie=True)
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(decoder, targets=("lm_head",), rank=2)  # tied to the embedding: skipped, so nothing found
    with pytest.raises(ValueError, match="nope"):
        apply_lora(llama_like_decoder(), targets=("q", "nope"))
    with pytest.raises(ValueError, match="already has LoRA"):
        d = llama_like_decoder()
        apply_lora(d, targets=("q",))
        apply_lora(d, targets=("q",))


def test_wrap_linear_by_module_path_and_its_refusals():
    decoder = llama_like_decoder(tie=True)
    layer = wrap_linear(decoder, "blocks.1.mlp.down", rank=2, alpha=4, scale=0.5)  # e.g. rsLoRA's alpha / sqrt(r)
    assert lora_modules(decoder) == {"blocks.1.mlp.down": layer}
    assert decoder.blocks[1].mlp.down is layer and layer.scale == 0.5 and layer.rank == 2
    with pytest.raises(ValueError, match="blocks.0.norm1 is not an nn.Linear layer"):
        wrap_linear(decoder, "blocks.0.norm1", rank=2, alpha=4)
    with pytest.raises(ValueError, match="blocks.1.mlp.down already has a LoRA adapter"):
        wrap_linear(decoder, "blocks.1.mlp.down", rank=2, alpha=4)
    with pytest.raises(ValueError, match="lm_head shares its weight with another module"):
        wrap_linear(decoder, "lm_head", rank=2, alpha=4)


def test_merging_a_half_precision_layer_rounds_once():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(torch.bfloat16)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.01)
    exact = original.float() + (layer.lora_b.float() @ layer.lora_a.float()) * 2
    layer.merge()
    assert torch.equal(layer.weight, exact.to(torch.bfloat16))  # the sum rounded once, not the update first
