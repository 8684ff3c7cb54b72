"""A tiny random-weight Qwen2-VL (vision: depth 2, embed 32, 4 heads, patch 14, 2 frames per
patch, 2x2 merge; text: Qwen2 with hidden 64, 2 layers, 4 heads, 2 KV heads, M-RoPE sections
[2, 3, 3]) built and saved by HF transformers, loaded by tessera: image and video embeddings,
M-RoPE positions, prompt logits and greedy tokens against transformers running the same
weights, in fp32. Images and video go through tessera.multimodal's Qwen2VLImageProcessor."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tessera.formats import open_checkpoint  # noqa: E402
from tessera.models import SupportsMultiModal, load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402
from tessera.multimodal import (  # noqa: E402
    PlaceholderRange,
    Qwen2VLImageProcessor,
    batch_grid_thw,
    batch_pixel_values,
    mrope_positions,
)

VOCAB, IMAGE, VIDEO, START, END = 200, 190, 191, 192, 193
MERGE = 2
# fp32 on both sides, summed in different orders
RTOL = 1e-5
PROCESSOR = Qwen2VLImageProcessor()  # patch 14, 2 frames, merge 2: the tiny model's


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to RTOL of the largest magnitude in ``want``."""
    return (got - want).abs().max().item() <= RTOL * want.abs().max().item()


def hf_config():
    return transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=MERGE,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The transformers model, ours loaded from its save_pretrained folder, and the folder
    (Qwen's hub layout: ``visual.``, ``model.``, ``lm_head``)."""
    folder = tmp_path_factory.mktemp("qwen2vl")
    torch.manual_seed(0)
    hf = transformers.Qwen2VLForConditionalGeneration(hf_config()).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # greedy runs the full length
    return hf.eval(), load_model(open_checkpoint(folder)), folder


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = [(84, 56), (56, 112)]  # (width, height): grids (1, 4, 6) and (1, 8, 4)


def images(n: int, seed: int = 0):
    """Processed images of different sizes."""
    return PROCESSOR([image(*SIZES[i % len(SIZES)], seed + i) for i in range(n)])


def video(seed: int = 0):
    """4 frames of 56 x 56: grid (2, 4, 4), 8 tokens."""
    return PROCESSOR.process_video([image(56, 56, seed + f) for f in range(4)])


def text(n: int, seed: int) -> list[int]:
    return torch.randint(3, 180, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Prompt:
    """Text around vision items (``<start> placeholders <end>``): our ids, placeholder runs and
    M-RoPE positions, and transformers' inputs."""

    def __init__(self, items, seed: int = 1) -> None:
        self.items = list(items)
        ids, types, runs = text(3, seed), [0] * 3, []
        for i, item in enumerate(self.items):
            token, kind = (IMAGE, 1) if item.modality == "image" else (VIDEO, 2)
            ids.append(START)
            runs.append((PlaceholderRange(len(ids), item.num_tokens), item.grid_thw))
            ids += [token] * item.num_tokens + [END]
            types += [0] + [kind] * item.num_tokens + [0]
            tail = text(4 + i, seed + 1 + i)
            ids, types = ids + tail, types + [0] * len(tail)
        self.ids, self.types = ids, types
        self.positions, self.delta = mrope_positions(len(ids), runs, MERGE)

    def hf_inputs(self) -> dict:
        out = {"input_ids": torch.tensor([self.ids]), "mm_token_type_ids": torch.tensor([self.types])}
        for kind, pixels, grid in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            mine = [p for p in self.items if p.modality == kind]
            if mine:
                out[pixels], out[grid] = batch_pixel_values(mine), batch_grid_thw(mine)
        return out

    def embeds(self, model, extra_ids=()) -> torch.Tensor:
        """Our input embeddings of the prompt (and ``extra_ids`` after it)."""
        ids = torch.tensor(self.ids + list(extra_ids))
        if not self.items:
            return model.embed_input_ids(ids)
        rows = model.embed_multimodal(batch_pixel_values(self.items), batch_grid_thw(self.items))
        return model.embed_input_ids(ids, rows)


def hf_logits(hf, prompt: Prompt) -> torch.Tensor:
    with torch.no_grad():
        return hf(**prompt.hf_inputs()).logits[0].float()


def ours_logits(model, prompt: Prompt, chunks=None, positions="mrope") -> torch.Tensor:
    (got,) = forward_chunks(
        model,
        [chunks or [prompt.ids]],
        inputs_embeds=[prompt.embeds(model)],
        mrope_positions=[prompt.positions] if positions == "mrope" else None,
    )
    return got


def test_the_model_declares_the_multimodal_capability_and_mrope(pair):
    _, ours, _ = pair
    assert isinstance(ours, SupportsMultiModal)
    assert ours.uses_mrope and ours.spatial_merge_size == MERGE
    assert not getattr(ours.language_model, "uses_mrope", False)
    mm = ours.config.multimodal
    assert (mm.image_token_id, mm.video_token_id, mm.vision_start_token_id) == (IMAGE, VIDEO, START)
    assert ours.config.rope_scaling == {"rope_type": "mrope", "mrope_section": (2, 3, 3)}
    assert mm.tokens_per_image is None  # it depends on the image


@pytest.mark.parametrize("n", [1, 2])
def test_image_embeddings_match_transformers_get_image_features(pair, n):
    """One image, and two images of different sizes in one call."""
    hf, ours, _ = pair
    items = images(n)
    pixels, grid = batch_pixel_values(items), batch_grid_thw(items)
    got = ours.embed_multimodal(pixels, grid)
    with torch.no_grad():
        want = hf.model.get_image_features(pixels, grid).pooler_output
    assert [g.shape for g in got] == [(item.num_tokens, 64) for item in items]
    for g, w in zip(got, want, strict=True):
        assert close(g, w)


def test_video_embeddings_match_transformers_get_video_features(pair):
    hf, ours, _ = pair
    item = video()
    assert item.grid_thw == (2, 4, 4) and item.num_tokens == 8
    pixels, grid = item.pixel_values, batch_grid_thw([item])
    (got,) = ours.embed_multimodal(pixels, grid)
    with torch.no_grad():
        (want,) = hf.model.get_video_features(pixels, grid).pooler_output
    assert close(got, want)


CASES = {
    "text only": lambda: [],
    "one image": lambda: images(1, seed=3),
    "two images of different sizes": lambda: images(2, seed=5),
    "4-frame video": lambda: [video(seed=7)],
    "an image and a video": lambda: [*images(1, seed=9), video(seed=9)],
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_mrope_positions_equal_transformers_get_rope_index(pair, case):
    hf, _, _ = pair
    prompt = Prompt(case())
    if not prompt.items:  # transformers' positions for text are 0..T-1 in all three rows
        assert torch.equal(prompt.positions, torch.arange(len(prompt.ids)).expand(3, -1))
        return
    inputs = prompt.hf_inputs()
    want, delta = hf.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
    )
    assert torch.equal(prompt.positions, want[:, 0]) and prompt.delta == delta.item()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prompt_logits_match_transformers(pair, case):
    hf, ours, _ = pair
    prompt = Prompt(case())
    assert close(ours_logits(ours, prompt), hf_logits(hf, prompt))


def test_text_only_positions_may_be_one_row(pair):
    """[T] positions are plain RoPE: the same as three equal rows."""
    _, ours, _ = pair
    prompt = Prompt([])
    assert torch.equal(ours_logits(ours, prompt, positions="1d"), ours_logits(ours, prompt))


def test_chunked_prefill_that_splits_images_matches_transformers(pair):
    hf, ours, _ = pair
    prompt = Prompt(images(2, seed=11), seed=12)
    ids = prompt.ids  # image tokens at 4..9 and 16..23
    chunks = [ids[:6], ids[6:11], ids[11:20], ids[20:]]
    assert close(ours_logits(ours, prompt, chunks), hf_logits(hf, prompt))


def test_a_batch_with_and_without_images_matches_transformers(pair):
    hf, ours, _ = pair
    with_image, text_only = Prompt([*images(1, seed=13), video(seed=13)], seed=14), Prompt([], seed=15)
    got = forward_chunks(
        ours,
        [[with_image.ids[:10], with_image.ids[10:]], [text_only.ids[:2], text_only.ids[2:]]],
        inputs_embeds=[with_image.embeds(ours), None],
        mrope_positions=[with_image.positions, None],
    )
    assert close(got[0], hf_logits(hf, with_image))
    assert close(got[1], hf_logits(hf, text_only))


@pytest.mark.parametrize("items", ["image", "two images and a video"])
def test_greedy_decode_after_vision_matches_transformers_generate(pair, items):
    """Decode tokens take position j + delta in all three rows. Our greedy choice at every
    decode step, fed transformers' previous tokens, is its token."""
    hf, ours, _ = pair
    prompt = Prompt(images(1, seed=17) if items == "image" else [*images(2, seed=18), video(seed=18)], 19)
    with torch.no_grad():
        out = hf.generate(**prompt.hf_inputs(), max_new_tokens=6, do_sample=False)
    n = len(prompt.ids)
    generated = out[0, n:].tolist()
    assert len(generated) == 6
    decode = torch.arange(n, n + 5) + prompt.delta
    positions = torch.cat([prompt.positions, decode.expand(3, -1)], dim=1)
    chunks = [prompt.ids[:9], prompt.ids[9:]] + [[t] for t in generated[:-1]]
    (logits,) = forward_chunks(
        ours,
        [chunks],
        inputs_embeds=[prompt.embeds(ours, generated[:-1])],
        mrope_positions=[positions],
    )
    assert logits[n - 1 :].argmax(-1).tolist() == generated


def test_transformers_5_names_load_the_same_weights(pair, tmp_path):
    """transformers 5's in-memory names (``model.visual.``, ``model.language_model.``)."""
    hf, ours, folder = pair
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.visual.blocks.0.attn.qkv.weight" in tensors
    assert "model.language_model.embed_tokens.weight" in tensors
    (tmp_path / "t5").mkdir()
    save_file(tensors, tmp_path / "t5" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "t5" / "config.json").write_text((folder / "config.json").read_text())
    other = load_model(open_checkpoint(tmp_path / "t5"))
    prompt = Prompt(images(1, seed=21))
    assert torch.equal(ours_logits(other, prompt), ours_logits(ours, prompt))


def test_bad_vision_inputs_are_refused_with_what_was_expected(pair):
    _, ours, _ = pair
    (item,) = images(1)
    grid = batch_grid_thw([item])
    with pytest.raises(ValueError, match="needs grid_thw"):
        ours.embed_multimodal(item.pixel_values)
    with pytest.raises(ValueError, match=r"expected \[patches, 1176\]"):
        ours.embed_multimodal(item.pixel_values[:, :100], grid)
    with pytest.raises(ValueError, match="24 patch rows but grid_thw says 48"):
        ours.embed_multimodal(item.pixel_values, grid * torch.tensor([2, 1, 1]))
    with pytest.raises(ValueError, match="7 placeholder positions but 6 embedding rows"):
        ours.embed_input_ids(torch.tensor([IMAGE] * 7), ours.embed_multimodal(item.pixel_values, grid))
