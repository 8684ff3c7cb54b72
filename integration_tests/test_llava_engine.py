"""A vision-language model through the whole engine (issue 15): a random-weight tiny LLaVA
(CLIP 32 px, patch 8, 2 vision layers; a 2-layer Llama) saved by HF transformers with its image
processor, served by ``tessera.engine.LLM`` with images in ``multi_modal_data``, against
transformers' own processor and ``generate`` on the same weights and images (fp32, greedy).
Also: the encoder cache (a repeated image runs no encoder), images in the prefix-cache keys, and
bad input refused with nothing queued."""

import base64
import io
import json
import struct
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from tessera.engine import LLM  # noqa: E402
from tessera.multimodal import MediaError  # noqa: E402
from tessera.sampling import SamplingParams  # noqa: E402

VOCAB, IMAGE_TOKEN = 300, 290
TOKENS_PER_IMAGE = 16  # (32 / 8) ** 2 patches, the class token dropped


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def tokenizer_files(folder) -> None:
    """A byte-level BPE over the 256 bytes and fillers, no merges, ``<image>`` at IMAGE_TOKEN."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in byte_alphabet().items()}
    vocab |= {f"<tok{i}>": i for i in range(256, VOCAB) if i != IMAGE_TOKEN} | {"<image>": IMAGE_TOKEN}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 256, "chat_template": template})
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-engine")
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=16,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=IMAGE_TOKEN,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def hf(folder):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).float().eval()
    model.generation_config.eos_token_id = None
    return model, transformers.CLIPImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=64,
               block_size=16)  # fmt: skip


def image(seed: int, size=(40, 36)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


def text(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(hf, ids: list[int], images: list, steps: int) -> list[int]:
    """transformers' tokens: its processor's pixels, each image token expanded as LLaVA's
    processor does, ``generate`` greedy."""
    model, proc = hf
    expanded = [t for tok in ids for t in ([tok] * TOKENS_PER_IMAGE if tok == IMAGE_TOKEN else [tok])]
    kw = {}
    if images:
        kw["pixel_values"] = proc(images=images, return_tensors="pt")["pixel_values"].float()
    out = model.generate(
        torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
        max_new_tokens=steps, do_sample=False, **kw,
    )  # fmt: skip
    return out[0, len(expanded) :].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_one_image_greedy_equals_transformers(llm, hf):
    ids = [*text(5, 1), IMAGE_TOKEN, *text(4, 2)]
    img = image(0)
    (out,) = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": img}}], GREEDY)
    assert out.token_ids == hf_greedy(hf, ids, [img], 6)
    assert len(out.prompt_token_ids) == len(ids) - 1 + TOKENS_PER_IMAGE


def test_two_images_of_different_sizes_and_a_text_only_request_in_one_batch(llm, hf):
    ids_2 = [*text(3, 3), IMAGE_TOKEN, *text(6, 4), IMAGE_TOKEN, *text(2, 5)]
    imgs = [image(1, (50, 30)), image(2, (25, 64))]
    ids_t = text(20, 6)
    outs = llm.generate([{"prompt_token_ids": ids_2, "multi_modal_data": {"image": imgs}}, ids_t], GREEDY)
    assert outs[0].token_ids == hf_greedy(hf, ids_2, imgs, 6)
    assert outs[1].token_ids == hf_greedy(hf, ids_t, [], 6)


def test_a_prompt_chunked_inside_an_image_gives_the_same_tokens(folder, hf):
    small = LLM(str(folder), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=8,
                block_size=16)  # fmt: skip
    ids = [*text(3, 7), IMAGE_TOKEN, *text(3, 8)]
    img = image(3)
    (out,) = small.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": img}}], GREEDY)
    assert out.token_ids == hf_greedy(hf, ids, [img], 6)


def test_a_repeated_image_runs_no_encoder_and_different_images_share_no_blocks(llm):
    enc = llm.engine.runner.encoders
    ids = [*text(40, 9), IMAGE_TOKEN, *text(20, 10)]  # the image's tokens at 40..55: block 2-3
    a, b = image(10), image(11)
    runs = enc.encoder_runs
    first = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": a}}], GREEDY)[0]
    assert enc.encoder_runs == runs + 1
    again = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": a}}], GREEDY)[0]
    assert enc.encoder_runs == runs + 1 and again.token_ids == first.token_ids
    assert again.num_cached_tokens >= 64  # the same image: its blocks come from the prefix cache
    other = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": b}}], GREEDY)[0]
    assert enc.encoder_runs == runs + 2
    assert other.num_cached_tokens == 32  # the two text blocks before the image, nothing after


def test_bad_image_input_is_refused_and_nothing_is_queued(llm):
    ids = [*text(4, 12), IMAGE_TOKEN]
    held = dict(llm.engine.runner.encoders.requests)  # finished ones go at the next step
    png = io.BytesIO()
    image(12).save(png, format="PNG")
    with pytest.raises(MediaError, match="image 0"):
        llm.add_request({"prompt_token_ids": ids, "multi_modal_data": {"image": png.getvalue()[:60]}})
    with pytest.raises(ValueError, match="names 1 images .* but 2 were given"):
        llm.add_request({"prompt_token_ids": ids, "multi_modal_data": {"image": [image(0), image(1)]}})
    with pytest.raises(ValueError, match="more than the limit of 4"):
        llm.add_request({"prompt_token_ids": ids, "multi_modal_data": {"image": [image(0)] * 5}})
    with pytest.raises(ValueError, match="not videos"):
        llm.add_request({"prompt_token_ids": ids, "multi_modal_data": {"video": [image(0)]}})
    with pytest.raises(ValueError, match="names 1 images .* but 0 were given"):
        llm.add_request(ids)  # the image token with no image
    with pytest.raises(MediaError, match="not allowed|allowed"):
        llm.add_request({"prompt_token_ids": ids, "multi_modal_data": {"image": "/etc/passwd"}})
    assert not llm.has_unfinished_requests() and llm.engine.runner.encoders.requests == held


def test_an_aborted_image_request_gives_back_its_blocks_and_its_inputs(folder):
    small = LLM(str(folder), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=8,
                block_size=16)  # fmt: skip
    kv = small.engine.scheduler.kv
    free = kv.num_free_blocks
    rid = small.add_request({"prompt_token_ids": [*text(3, 13), IMAGE_TOKEN, *text(3, 14)],
                             "multi_modal_data": {"image": image(13)}})  # fmt: skip
    small.step()  # 8 of its 22 tokens: its image encoded, half of it computed
    assert rid in small.engine.runner.encoders.requests and kv.num_free_blocks < free
    small.abort(rid)
    small.step()  # the runner hears of it with the next step
    assert kv.num_free_blocks == free and rid not in small.engine.runner.encoders.requests
    assert not small.has_unfinished_requests()


def test_a_text_only_model_refuses_images():
    llm = LLM("smollm2-135m-instruct", device="cpu", max_model_len=256)
    with pytest.raises(ValueError, match="takes text only"):
        llm.add_request({"prompt": "hi", "multi_modal_data": {"image": image(0)}})
    assert not llm.has_unfinished_requests()


def data_url(img: Image.Image | bytes) -> str:
    if isinstance(img, Image.Image):
        png = io.BytesIO()
        img.save(png, format="PNG")
        img = png.getvalue()
    return "data:image/png;base64," + base64.b64encode(img).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds none (a bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_the_server_takes_an_image_part_as_llm_generate_takes_the_image(
    folder, llm, start_default_model_server
):
    openai = pytest.importorskip("openai")
    import httpx

    url = start_default_model_server(
        "--model", str(folder), "--dtype", "float32", "--device", "cpu", "--max-model-len", "256"
    )
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        img = image(20)
        parts = [{"type": "image_url", "image_url": {"url": data_url(img), "detail": "low"}},
                 {"type": "text", "text": "what is it?"}]  # fmt: skip

        def ask(content, **kw):
            return client.chat.completions.create(
                model=str(folder), messages=[{"role": "user", "content": content}], temperature=0,
                max_tokens=6, **kw,
            )  # fmt: skip

        got = ask(parts).choices[0].message.content
        prompt = "user: <image>\nwhat is it?\nassistant:"
        want = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": img}}],
            SamplingParams(temperature=0, max_tokens=6),
        )
        assert got == want[0].text
        # the same image again: its blocks come from the prefix cache, no encoder runs; behind
        # other text (no prefix in common) its encoder output comes from the encoder cache
        assert ask(parts).choices[0].message.content == got
        ask([{"type": "text", "text": "look:"}, *parts])
        metrics = httpx.get(f"{url}/metrics").text
        assert "tessera_encoder_runs_total 1.0" in metrics
        assert "tessera_encoder_cache_hits_total 1.0" in metrics
        bad = [
            ([{"type": "image_url", "image_url": {"url": data_url(img)[:80]}}], "image 0"),
            (
                [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                "allows no media domains",
            ),
            ([{"type": "image_url", "image_url": {"url": data_url(img)}}] * 5, "limit of 4"),
            (
                [{"type": "image_url", "image_url": {"url": data_url(png_header(30_000, 30_000))}}],
                "refused before",
            ),
            (
                [{"type": "image_url", "image_url": {"url": data_url(png_header(0, 0))}}],
                r"empty image \(0x0\)",
            ),
            ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "image"),
        ]
        for content, why in bad:
            with pytest.raises(openai.BadRequestError, match=why):
                ask(content)
        assert ask(parts).choices[0].message.content == got  # still serving
    finally:
        url.proc.terminate()
        url.proc.communicate(timeout=30)
