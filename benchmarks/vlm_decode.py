"""VLM decoding: ours in float32 / bfloat16 / int8 against transformers' `generate` in float32.

    .venv/bin/python benchmarks/vlm_decode.py [--models smolvlm-256m llava-interleave-0.5b] [--threads 1 2]
        [--new-tokens 32] [--repeats 2] [--cache /tmp/vlm_decode]

Two checkpoints with the real shapes of published ones and random weights, made by transformers and
saved in the Hugging Face layout (kept in --cache between runs):

- smolvlm-256m: HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3: SigLIP-B/16 tower at 512 px, pixel
  shuffle 4 -> 64 image tokens per tile, SmolLM2-135M decoder: 576 wide x 30 layers, 9 heads / 3 KV
  heads, vocabulary 49,280, untied head). Image splitting is off (one 512 px tile), so that the time
  to first token is not 17 tiles of vision tower;
- llava-interleave-0.5b: llava-hf/llava-interleave-qwen-0.5b-hf (SigLIP so400m tower, 26 layers,
  27 x 27 patches of 14 px -> 729 image tokens, "full" strategy; Qwen1.5-0.5B decoder: 1024 wide x
  24 layers, 16 heads, vocabulary 152,000, tied head). Its images are 378 px here, not 384: the
  27 x 27 patches the convolution takes of 384 px are the first 378 (same weights, same tokens), and
  our VisionConfig refuses an image_size that is not a multiple of patch_size (384 / 14).

The tokenizer is a stand-in (a small BPE with the checkpoint's special tokens, as
benchmarks/pretrained_clip.py does): the prompt is the chat template applied to one image and one
question, the same ids for every variant. Each variant runs in its own process (its peak RSS is its
own), one after the other, pinned to the thread count: transformers' `generate` in float32 (greedy,
`generation_config.eos_token_id = None`: no early stop), and ours via `load(..., dtype=..., quantize=...)`
with `generate_tokens` and no stop ids. Each process warms up once, then decodes --new-tokens tokens
--repeats times; medians are reported.

- ttft_s: from the start (prompt ids and preprocessed pixels ready) to the first new token: vision
  tower, projector, prefill of the whole prompt;
- decode_tok_s: new tokens after the first per second ((N - 1) / (t_N - t_1)), the KV-cache decode step;
- ttft_cpu_s, decode_tok_per_cpu_s: the same in CPU seconds of the process (time.process_time). On a
  CPU shared with other jobs the wall clock measures the neighbours as much as the model; with one
  thread, CPU time is what the run would take alone (with two it adds both threads' time);
  load_average: the machine's 1-minute load before and after the timed runs;
- peak_rss_mib: the process's RSS high-water mark (getrusage ru_maxrss: loading included); rss_mib: RSS
  after the runs;
- speedup: transformers' figure over ours for TTFT, ours over transformers' for tokens/s (> 1: faster);
- same_tokens: the greedy tokens equal transformers' (first difference otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("transformers-fp32", "ours-fp32", "ours-bf16", "ours-int8")
OURS = {"ours-fp32": {}, "ours-bf16": {"dtype": "bfloat16"}, "ours-int8": {"quantize": "int8"}}
CORPUS = ["what is in the image? a red circle and a blue square.", "describe the picture in one sentence please.",
          "user assistant system: there are two green stars, one small and one large.", "yes no maybe 0 1 2 3"] * 4
QUESTION = "Describe this image in detail."
IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The published config.json values (HuggingFaceTB/SmolVLM-256M-Instruct, llava-hf/llava-interleave-qwen-0.5b-hf);
# the image token id is the stand-in tokenizer's.
SMOLVLM_256M = {
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    "text_config": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                    "tie_word_embeddings": False},
    "scale_factor": 4, "tie_word_embeddings": False,
}
LLAVA_INTERLEAVE_05B = {
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 378, "patch_size": 14,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False},
    "text_config": {"model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 152000,
                    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                    "tie_word_embeddings": True},
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
    "tie_word_embeddings": True,
}
MODELS = ("smolvlm-256m", "llava-interleave-0.5b")


# -- the checkpoints ------------------------------------------------------------------------------


def write_tokenizer(folder: Path, specials: list[str], *, bos: str | None, eos: str, pad: str, template: str):
    """A stand-in byte-level BPE tokenizer.json + tokenizer_config.json with the checkpoint's special tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300 + len(specials), special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad,
              "model_max_length": 32768, "chat_template": template}
    if bos is not None:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def make_checkpoint(name: str, folder: Path) -> None:
    """The random-weight checkpoint `name` in `folder` (model, stand-in tokenizer, processor) and the
    prompt's inputs (inputs.pt: transformers' processor output)."""
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    torch.manual_seed(0)
    if name == "smolvlm-256m":
        tokenizer = write_tokenizer(folder, ["<|endoftext|>", "<|im_start|>"] + IDEFICS3_SPECIALS, bos="<|im_start|>",
                                    eos="<end_of_utterance>", pad="<|endoftext|>", template=SMOLVLM_TEMPLATE)
        config = transformers.Idefics3Config(**SMOLVLM_256M, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
        model = transformers.Idefics3ForConditionalGeneration(config)
        image_processor = transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": 4 * 512}, max_image_size={"longest_edge": 512}, do_image_splitting=False, resample=1)
        processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                   image_seq_len=64, chat_template=SMOLVLM_TEMPLATE)
    else:
        tokenizer = write_tokenizer(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], bos=None,
                                    eos="<|im_end|>", pad="<|endoftext|>", template=CHATML_TEMPLATE)
        config = transformers.LlavaConfig(**LLAVA_INTERLEAVE_05B,
                                          image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
        model = transformers.LlavaForConditionalGeneration(config)
        image_processor = transformers.SiglipImageProcessorPil(size={"height": 378, "width": 378}, resample=3)
        processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                                vision_feature_select_strategy="full", num_additional_image_tokens=0,
                                                chat_template=CHATML_TEMPLATE)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    torch.save(dict(inputs), folder / "inputs.pt")
    (folder / "done").write_text("")


# -- one variant in its own process ---------------------------------------------------------------


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(variant: str, folder: Path, new_tokens: int, repeats: int) -> dict:
    import torch

    inputs = torch.load(folder / "inputs.pt")
    start = time.perf_counter()
    if variant == "transformers-fp32":
        import transformers

        transformers.logging.set_verbosity_error()
        kind = json.loads((folder / "config.json").read_text())["model_type"]
        model_class = (transformers.Idefics3ForConditionalGeneration if kind == "idefics3"
                       else transformers.LlavaForConditionalGeneration)
        model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # no early stop: every run decodes new_tokens

        class Clock(transformers.generation.streamers.BaseStreamer):
            def __init__(self):
                self.times, self.prompt_seen = [], False

            def put(self, value):
                if self.prompt_seen:  # the first put is the prompt
                    self.times.append((time.perf_counter(), time.process_time()))
                self.prompt_seen = True

            def end(self):
                pass

        def run(count: int) -> tuple[list[float], list[int]]:
            clock = Clock()
            began = (time.perf_counter(), time.process_time())
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=count, do_sample=False,
                                     streamer=clock, pad_token_id=0)
            return [began] + clock.times, out[0, inputs["input_ids"].shape[1]:].tolist()
    else:
        import multimodal_models
        from multimodal_models.models.generation import GenerationConfig, generate_tokens
        from multimodal_models.models.vlm import VLMSession

        model = multimodal_models.load(folder, **OURS[variant])
        ids = inputs["input_ids"]
        pixels = inputs["pixel_values"]
        pixels = pixels.reshape(-1, *pixels.shape[-3:]).to(next(model.parameters()).dtype
                                                           if variant == "ours-bf16" else torch.float32)

        def run(count: int) -> tuple[list[float], list[int]]:
            config = GenerationConfig(max_new_tokens=count)
            times, tokens = [(time.perf_counter(), time.process_time())], []
            with torch.inference_mode():
                session = VLMSession(model, ids, pixels, config)
                for token in generate_tokens(session, config, set()):
                    times.append((time.perf_counter(), time.process_time()))
                    tokens.append(token)
                    if len(tokens) == count:  # the loop would compute one more step's logits
                        break
            return times, tokens
    load_s = time.perf_counter() - start
    run(2)  # warm-up: kernels, allocations
    load_average = os.getloadavg()[0]
    ttft, rate, ttft_cpu, rate_cpu, tokens = [], [], [], [], []
    for _ in range(repeats):
        times, tokens = run(new_tokens)
        if len(times) != new_tokens + 1:
            raise RuntimeError(f"{variant} made {len(times) - 1} tokens, not {new_tokens}")
        wall, cpu = [t[0] for t in times], [t[1] for t in times]
        ttft.append(wall[1] - wall[0])
        rate.append((new_tokens - 1) / (wall[-1] - wall[1]))
        ttft_cpu.append(cpu[1] - cpu[0])
        rate_cpu.append((new_tokens - 1) / (cpu[-1] - cpu[1]))
    return {"variant": variant, "threads": torch.get_num_threads(), "load_s": round(load_s, 1),
            "ttft_s": round(statistics.median(ttft), 3), "decode_tok_s": round(statistics.median(rate), 2),
            "ttft_cpu_s": round(statistics.median(ttft_cpu), 3),
            "decode_tok_per_cpu_s": round(statistics.median(rate_cpu), 2),
            "ttft_all": [round(t, 3) for t in ttft], "decode_all": [round(r, 2) for r in rate],
            "load_average": [round(load_average, 1), round(os.getloadavg()[0], 1)],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_mib": round(rss_mib()), "prompt_tokens": int(inputs["input_ids"].shape[1]), "tokens": tokens}


def run_worker(variant: str, folder: Path, threads: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--threads", str(threads),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vlm_decode"), help="where the checkpoints are kept")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads[0])
        print(json.dumps(worker(args.worker, args.folder, args.new_tokens, args.repeats)))
        return

    import torch
    import transformers

    report = {"new_tokens": args.new_tokens, "repeats": args.repeats, "torch": torch.__version__,
              "transformers": transformers.__version__, "models": {}}
    for name in args.models:
        folder = args.cache / name
        if not (folder / "done").is_file():
            print(f"making {name} in {folder}", file=sys.stderr)
            make_checkpoint(name, folder)
        rows = []
        for threads in args.threads:
            for variant in args.variants:
                row = run_worker(variant, folder, threads, args)
                print(f"{name} threads={threads} {variant}: TTFT {row['ttft_s']} s, {row['decode_tok_s']} tok/s, "
                      f"per CPU second {row['ttft_cpu_s']} s, {row['decode_tok_per_cpu_s']} tok/s, "
                      f"peak {row['peak_rss_mib']} MiB, load {row['load_average']}", file=sys.stderr)
                rows.append(row)
        for row in rows:
            reference = next((r for r in rows if r["threads"] == row["threads"] and r["variant"] == "transformers-fp32"),
                             None)
            if reference is None:
                continue
            row["ttft_speedup"] = round(reference["ttft_s"] / row["ttft_s"], 2)
            row["decode_speedup"] = round(row["decode_tok_s"] / reference["decode_tok_s"], 2)
            row["ttft_cpu_speedup"] = round(reference["ttft_cpu_s"] / row["ttft_cpu_s"], 2)
            row["decode_cpu_speedup"] = round(row["decode_tok_per_cpu_s"] / reference["decode_tok_per_cpu_s"], 2)
            row["peak_rss_ratio"] = round(row["peak_rss_mib"] / reference["peak_rss_mib"], 2)
            same = [a == b for a, b in zip(row["tokens"], reference["tokens"])]
            row["same_tokens"] = all(same) or f"first difference at token {same.index(False)}"
        report["models"][name] = {"prompt_tokens": rows[0]["prompt_tokens"],
                                  "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}
    print(json.dumps(report, indent=2))
    print("\nwall clock (CPU time in brackets: CPU-seconds of the process, what the run costs when the CPU is shared)")
    print("model                  threads  variant             TTFT s (x)            tok/s (x)              "
          "peak MiB (x)  same")
    for name, result in report["models"].items():
        for r in result["rows"]:
            print(f"{name:<22} {r['threads']:>7}  {r['variant']:<18} {r['ttft_s']:>6} ({r.get('ttft_speedup')}x) "
                  f"[{r.get('ttft_cpu_speedup')}x]  {r['decode_tok_s']:>6} ({r.get('decode_speedup')}x) "
                  f"[{r.get('decode_cpu_speedup')}x]  {r['peak_rss_mib']:>6} ({r.get('peak_rss_ratio')}x)  "
                  f"{r.get('same_tokens', '')}")


if __name__ == "__main__":
    main()
