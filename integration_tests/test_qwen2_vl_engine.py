"""Qwen2-VL through the whole engine (issue 15): a random-weight tiny Qwen2-VL (vision depth 2,
patch 14, 2 frames a patch, 2x2 merge; a 2-layer Qwen2 with M-RoPE) saved by HF transformers,
served by ``tessera.engine.LLM`` with images and a 4-frame video in ``multi_modal_data``, against
transformers' ``generate`` on the same weights and pixels (fp32, greedy). The engine builds the
prompt's 3-D positions, encodes each input when the scheduler says, and decodes at j + delta."""

import base64
import io
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from tessera.engine import LLM  # noqa: E402
from tessera.multimodal import (  # noqa: E402
    Qwen2VLImageProcessor,
    batch_grid_thw,
    batch_pixel_values,
    decode_video,
)
from tessera.sampling import SamplingParams  # noqa: E402

VOCAB, IMAGE, VIDEO, START, END = 300, 290, 291, 292, 293
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64}  # at most 64 merged tokens an image
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def tokenizer_files(folder) -> None:
    """Byte-level BPE over the 256 bytes and fillers; Qwen2-VL's vision tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    alphabet = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    named = {"<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "<|vision_start|>": START, "<|vision_end|>": END}
    vocab = {ch: b for b, ch in alphabet.items()}
    vocab |= {f"<tok{i}>": i for i in range(256, VOCAB) if i not in named.values()} | named
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in named])
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 512, "chat_template": template})
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2vl-engine")
    torch.manual_seed(0)
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    model = transformers.Qwen2VLForConditionalGeneration(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    pre = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, **PIXELS}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(pre))
    tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def hf(folder):
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).float().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32", device="cpu", max_model_len=512, block_size=16)


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def text(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(hf, ids: list[int], images=(), videos=()) -> list[int]:
    """transformers' tokens on the same processed pixels (tessera's processor equals
    transformers' PIL one: packages/multimodal's tests), each placeholder expanded."""
    proc = Qwen2VLImageProcessor.from_hf(PIXELS)
    vproc = Qwen2VLImageProcessor.from_hf(PIXELS, video=True)
    items = {IMAGE: [proc.process_image(i) for i in images], VIDEO: [vproc.process_video(v) for v in videos]}
    expanded, types, used = [], [], {IMAGE: 0, VIDEO: 0}
    for t in ids:
        if t in items:
            item = items[t][used[t]]
            used[t] += 1
            expanded += [t] * item.num_tokens
            types += [1 if t == IMAGE else 2] * item.num_tokens
        else:
            expanded.append(t)
            types.append(0)
    kw = {"input_ids": torch.tensor([expanded]), "mm_token_type_ids": torch.tensor([types])}
    if items[IMAGE]:
        kw["pixel_values"], kw["image_grid_thw"] = (
            batch_pixel_values(items[IMAGE]),
            batch_grid_thw(items[IMAGE]),
        )
    if items[VIDEO]:
        kw["pixel_values_videos"] = batch_pixel_values(items[VIDEO])
        kw["video_grid_thw"] = batch_grid_thw(items[VIDEO])
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=6, do_sample=False)
    return out[0, len(expanded) :].tolist()


def test_an_image_and_a_video_greedy_equal_transformers(llm, hf):
    img = image(84, 56, 1)
    frames = [image(56, 56, 10 + f) for f in range(4)]
    ids = [*text(3, 1), START, IMAGE, END, *text(4, 2), START, VIDEO, END, *text(2, 3)]
    data = {"image": img, "video": frames}
    (out,) = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": data}], GREEDY)
    assert out.token_ids == hf_greedy(hf, ids, [img], [frames])


def test_two_images_and_a_text_request_in_one_batch_chunked(folder, hf):
    small = LLM(str(folder), dtype="float32", device="cpu", max_model_len=512, block_size=16,
                max_num_batched_tokens=16)  # fmt: skip
    imgs = [image(84, 56, 4), image(56, 112, 5)]
    ids = [*text(2, 4), START, IMAGE, END, *text(3, 5), START, IMAGE, END, *text(3, 6)]
    plain = text(12, 7)
    outs = small.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}, plain], GREEDY)
    assert outs[0].token_ids == hf_greedy(hf, ids, imgs)
    assert outs[1].token_ids == hf_greedy(hf, plain)


def test_llava_style_checks_hold_for_qwen2_vl(llm):
    ids = [*text(3, 8), START, IMAGE, END]
    with pytest.raises(ValueError, match="names 0 videos .* but 1 were given"):
        llm.add_request(
            {
                "prompt_token_ids": ids,
                "multi_modal_data": {"image": image(56, 56, 0), "video": [image(56, 56, 1)] * 2},
            }
        )
    with pytest.raises(ValueError, match="video 0: video frames differ in size"):
        llm.add_request(
            {
                "prompt_token_ids": [START, VIDEO, END],
                "multi_modal_data": {"video": [image(56, 56, 0), image(84, 56, 1)]},
            }
        )
    assert not llm.has_unfinished_requests()


def mp4(frames: int, seed: int, side: int = 56) -> bytes:
    """An MPEG-4 video of noise frames of ``side`` x ``side``."""
    av = pytest.importorskip("av", reason="PyAV (tessera-multimodal[video]) is not installed")
    out = io.BytesIO()
    rng = np.random.default_rng(seed)
    with av.open(out, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return out.getvalue()


def test_a_video_file_gives_the_tokens_of_its_decoded_frames(llm, hf):
    # 6 frames of 112 px: 3 temporal groups over a 4 x 4 merged grid. (With more groups than
    # merged rows or columns, transformers 5.24 starts the text after a video at a position
    # Qwen2-VL's original code and vLLM do not; tessera follows the latter: see
    # packages/multimodal's M-RoPE tests.)
    data = mp4(6, 30, side=112)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    frames = decode_video(data, "clip", max_frames=16)
    ids = [*text(3, 31), START, VIDEO, END, *text(3, 32)]
    (out,) = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"video": url}}], GREEDY)
    assert out.token_ids == hf_greedy(hf, ids, videos=[frames])


def test_the_server_takes_a_video_url_part(folder, llm, start_default_model_server):
    openai = pytest.importorskip("openai")
    data = mp4(4, 40)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    server = start_default_model_server(
        "--model", str(folder), "--dtype", "float32", "--device", "cpu", "--max-model-len", "512"
    )
    try:
        client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)
        got = client.chat.completions.create(
            model=str(folder), temperature=0, max_tokens=6,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "and?"}]}],
        ).choices[0].message.content  # fmt: skip
        prompt = "user: <|video_pad|>\nand?\nassistant:"
        want = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"video": url}}],
            SamplingParams(temperature=0, max_tokens=6),
        )
        assert got == want[0].text
        cut = [{"type": "video_url", "video_url": {"url": url[:200]}}]
        with pytest.raises(openai.BadRequestError, match="video 0"):
            client.chat.completions.create(
                model=str(folder), max_tokens=2, messages=[{"role": "user", "content": cut}]
            )
    finally:
        server.proc.terminate()
        server.proc.communicate(timeout=30)
