"""A tiny random-weight LLaVA (CLIP 32 px, patch 8, 2 vision layers; a 2-layer Llama) built and
saved by HF transformers, loaded by tessera: image embeddings, prompt logits and greedy tokens
against transformers running the same weights, in fp32."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from tessera.formats import open_checkpoint  # noqa: E402
from tessera.models import SupportsMultiModal, load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402

VOCAB, IMAGE_TOKEN = 160, 150
TOKENS_PER_IMAGE = 16  # (32 / 8) ** 2 patches, the class token dropped
# fp32 on both sides, summed in different orders: measured relative differences are ~1e-6
RTOL = 1e-5


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to RTOL of the largest magnitude in ``want``."""
    return (got - want).abs().max().item() <= RTOL * want.abs().max().item()


def hf_config(**overrides):
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    text = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, **overrides
    )


def build_hf(folder, **overrides):
    """A random model with weights large enough that mistakes show, saved to ``folder`` as
    transformers saves it (the llava-hf layout: ``language_model.model.``, ``vision_tower.``)."""
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(hf_config(**overrides)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = None  # greedy runs the full length
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    hf = build_hf(folder)
    return hf, load_model(open_checkpoint(folder)), folder


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text(n: int, seed: int) -> list[int]:
    return torch.randint(0, IMAGE_TOKEN, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompt_with_images(n_images: int, seed: int = 1) -> list[int]:
    ids = text(3, seed)
    for i in range(n_images):
        ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE + text(4 + i, seed + 1 + i)
    return ids


def hf_image_features(hf, pixel_values) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(hf.get_image_features(pixel_values=pixel_values).pooler_output)


def hf_logits(hf, ids, pixel_values=None) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0].float()


def ours_logits(model, ids, pixel_values=None, chunks=None) -> torch.Tensor:
    embeds = None
    if pixel_values is not None:
        embeds = model.embed_input_ids(torch.tensor(ids), model.embed_multimodal(pixel_values))
    (got,) = forward_chunks(model, [chunks or [ids]], inputs_embeds=None if embeds is None else [embeds])
    return got


def test_the_model_declares_the_multimodal_capability(pair):
    _, ours, _ = pair
    assert isinstance(ours, SupportsMultiModal)
    assert not isinstance(ours.language_model, SupportsMultiModal)
    assert ours.config.multimodal.tokens_per_image == TOKENS_PER_IMAGE


@pytest.mark.parametrize("n", [1, 2])
def test_image_embeddings_match_transformers_get_image_features(pair, n):
    hf, ours, _ = pair
    pixels = images(n)
    got, want = ours.embed_multimodal(pixels), hf_image_features(hf, pixels)
    assert len(got) == n
    for g, w in zip(got, want, strict=True):
        assert g.shape == (TOKENS_PER_IMAGE, 64)
        assert close(g, w)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prompt_logits_match_transformers(pair, n_images):
    """A text-only prompt, one image, and two images in one prompt."""
    hf, ours, _ = pair
    ids = prompt_with_images(n_images)
    pixels = images(n_images) if n_images else None
    assert close(ours_logits(ours, ids, pixels), hf_logits(hf, ids, pixels))


def test_chunked_prefill_that_splits_an_image_matches_transformers(pair):
    hf, ours, _ = pair
    ids, pixels = prompt_with_images(2, seed=5), images(2, seed=5)
    chunks = [ids[:7], ids[7:12], ids[12:30], ids[30:]]  # cuts inside the first and second image
    assert close(ours_logits(ours, ids, pixels, chunks), hf_logits(hf, ids, pixels))


def test_a_batch_with_and_without_images_matches_transformers(pair):
    hf, ours, _ = pair
    with_image, text_only, pixels = prompt_with_images(1, seed=7), text(29, seed=8), images(1, seed=7)
    embeds = ours.embed_input_ids(torch.tensor(with_image), ours.embed_multimodal(pixels))
    got = forward_chunks(
        ours,
        [[with_image[:10], with_image[10:]], [text_only[:20], text_only[20:]]],
        inputs_embeds=[embeds, None],
    )
    assert close(got[0], hf_logits(hf, with_image, pixels))
    assert close(got[1], hf_logits(hf, text_only))


def test_greedy_decode_after_an_image_matches_transformers_generate(pair):
    """Our greedy choice at every decode step, fed transformers' previous tokens, is its token
    (so a greedy decode of ours yields the same sequence)."""
    hf, ours, _ = pair
    ids, pixels = prompt_with_images(2, seed=11), images(2, seed=11)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=6, do_sample=False
        )
    generated = out[0, len(ids) :].tolist()
    assert len(generated) == 6
    full = ids + generated
    embeds = ours.embed_input_ids(torch.tensor(full), ours.embed_multimodal(pixels))
    chunks = [ids[:20], ids[20:]] + [[t] for t in generated[:-1]]
    (logits,) = forward_chunks(ours, [chunks], inputs_embeds=[embeds[:-1]])
    assert logits[len(ids) - 1 :].argmax(-1).tolist() == generated


def _relayout(src, dst, rename):
    """``src``'s folder with its tensors renamed (config and the rest as they are)."""
    from safetensors import safe_open

    dst.mkdir()
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("layout", ["transformers-5", "clip-vision_model"])
def test_the_other_checkpoint_layouts_load_the_same_weights(pair, tmp_path, layout):
    """transformers 5's in-memory names (``model.language_model.``, ``model.vision_tower.``,
    ``lm_head``), and llava-hf's hub files (CLIP's ``vision_model.`` level kept)."""
    hf, ours, folder = pair
    if layout == "transformers-5":
        _relayout(folder, tmp_path / layout, lambda k: k)
        tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
        assert "model.language_model.embed_tokens.weight" in tensors
        save_file(tensors, tmp_path / layout / "model.safetensors", metadata={"format": "pt"})
    else:
        _relayout(
            folder, tmp_path / layout, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")
        )
    other = load_model(open_checkpoint(tmp_path / layout))
    ids, pixels = prompt_with_images(1, seed=3), images(1, seed=3)
    assert torch.equal(ours_logits(other, ids, pixels), ours_logits(ours, ids, pixels))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
        dict(vision_feature_layer=[-2, 0], projector_hidden_act="quick_gelu"),
    ],
)
def test_other_feature_layers_and_strategies_match_transformers(tmp_path, overrides):
    hf = build_hf(tmp_path, **overrides)
    ours = load_model(open_checkpoint(tmp_path))
    pixels = images(2, seed=13)
    want = hf_image_features(hf, pixels)
    got = ours.embed_multimodal(pixels)
    for g, w in zip(got, want, strict=True):
        assert close(g, w)
    n = ours.config.multimodal.tokens_per_image
    ids = text(3, 14) + [IMAGE_TOKEN] * n + text(5, 15) + [IMAGE_TOKEN] * n + text(2, 16)
    assert close(ours_logits(ours, ids, pixels), hf_logits(hf, ids, pixels))


def test_placeholder_count_must_match_the_image_rows(pair):
    _, ours, _ = pair
    ids = torch.tensor(prompt_with_images(1) + [IMAGE_TOKEN])  # one placeholder too many
    with pytest.raises(ValueError, match="17 placeholder positions but 16 embedding rows"):
        ours.embed_input_ids(ids, ours.embed_multimodal(images(1)))
    with pytest.raises(ValueError, match="expected \\[n, 3, 32, 32\\]"):
        ours.embed_multimodal(torch.zeros(1, 3, 64, 64))
