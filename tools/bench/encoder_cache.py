"""Time to first token of image requests with the encoder cache on and off (issue 15), beside HF
transformers on the same weights.

    uv run python tools/bench/encoder_cache.py --out docs/bench/encoder-cache [--requests 8]

The model is a random-weight LLaVA with LLaVA-1.5's vision tower (CLIP ViT-L/14 at 336 px: 24
layers, 1024 wide, 576 tokens an image) and a small Llama (4 layers, 512 wide), written once by
transformers into a temporary folder: the encoder's share of the first token is as in the real
model, the language model's is small. Every request holds the same image behind a different
text prefix (so the prefix cache never covers the image: only the encoder cache can spare its
encoder run) and asks for one token. Modes: tessera with the encoder cache (the first request
encodes, the rest hit), tessera with it off (``encoder_cache_memory=0``: every request encodes),
and transformers (``model(**inputs)`` on the same ids and pixel values, no cache). Reports the
median of the requests after the first, a table, ``encoder_cache.json`` and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine  # run as a script from this folder
from PIL import Image

IMAGE_TOKEN = 290
VOCAB = 300


def build(folder: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=IMAGE_TOKEN,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(folder)
    from tokenizers import AddedToken, Tokenizer, models

    vocab = {f"<t{i}>": i for i in range(VOCAB)} | {"<image>": IMAGE_TOKEN}
    del vocab[f"<t{IMAGE_TOKEN}>"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 2048}')


def prompts(n: int) -> list[list[int]]:
    """A different 8-token prefix each, then the image, then the same question."""
    g = torch.Generator().manual_seed(1)
    return [[*torch.randint(3, 280, (8,), generator=g).tolist(), IMAGE_TOKEN, 5, 6, 7, 8] for _ in range(n)]


def picture() -> Image.Image:
    g = torch.Generator().manual_seed(2)
    return Image.fromarray(torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8).numpy())


def tessera_ttft(folder: Path, cache_bytes: int, ids: list[list[int]], img) -> tuple[list[float], dict]:
    from tessera.engine import LLM
    from tessera.sampling import SamplingParams

    llm = LLM(str(folder), device="cpu", max_model_len=2048, encoder_cache_memory=cache_bytes)
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([{"prompt_token_ids": ids[0], "multi_modal_data": {"image": img}}], one)  # warm-up
    times = []
    for p in ids:
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p, "multi_modal_data": {"image": img}}], one)
        times.append(time.perf_counter() - t)
    enc = llm.engine.runner.encoders
    return times, {"encoder_runs": enc.encoder_runs, "encoder_cache_hits": enc.encoder_cache_hits}


def hf_ttft(folder: Path, ids: list[list[int]], img) -> list[float]:
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        folder, torch_dtype=torch.bfloat16
    ).eval()
    proc = transformers.CLIPImageProcessor.from_pretrained(folder)
    tokens = model.config.vision_config.image_size // model.config.vision_config.patch_size
    times = []
    with torch.inference_mode():
        for p in [ids[0], *ids]:  # the first is the warm-up
            t = time.perf_counter()
            pixels = proc(images=[img], return_tensors="pt")["pixel_values"].to(torch.bfloat16)
            expanded = [x for tok in p for x in ([tok] * tokens**2 if tok == IMAGE_TOKEN else [tok])]
            model(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits[0, -1].argmax()
            times.append(time.perf_counter() - t)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=8)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ids, img = prompts(a.requests), picture()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("writing the random LLaVA (CLIP ViT-L/14-336 tower, small Llama)", flush=True)
        build(folder)
        for name, cache in (("tessera, encoder cache on", 256 << 20), ("tessera, encoder cache off", 0)):
            print(f"{name}: {a.requests} requests", flush=True)
            times, counters = tessera_ttft(folder, cache, ids, img)
            rows[name] = {"ttft_s": times, "median_after_first_s": statistics.median(times[1:]), **counters}
        print(f"transformers: {a.requests} requests", flush=True)
        times = hf_ttft(folder, ids, img)
        rows["transformers (bf16)"] = {"ttft_s": times, "median_after_first_s": statistics.median(times[1:])}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "requests": a.requests, "rows": rows}
    (out / "encoder_cache.json").write_text(json.dumps(result, indent=2))
    base = rows["transformers (bf16)"]["median_after_first_s"]
    print(f"\n| mode | TTFT median, requests 2..{a.requests} | first request | vs transformers |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows.items():
        m = r["median_after_first_s"]
        print(f"| {name} | {m * 1e3:.0f} ms | {r['ttft_s'][0] * 1e3:.0f} ms | {base / m:.2f}x |")
    plot(rows, out / "encoder_cache.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, r in rows.items():
        ax.plot(range(1, len(r["ttft_s"]) + 1), [t * 1e3 for t in r["ttft_s"]], marker="o", label=name)
    ax.set_xlabel("request (the same image, a different text prefix each)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Repeated image: encoder cache on and off (CLIP ViT-L/14-336 tower)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
