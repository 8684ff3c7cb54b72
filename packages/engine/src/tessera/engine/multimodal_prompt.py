"""A prompt's images, for a vision-language model: loaded under the engine's media policy,
processed as transformers would, and turned into placeholder runs (the scheduler's
``MultiModalFeature``: offset, length, content hash) and the pixel tensors the runner encodes.

The prompt names each image with the model's image token once (LLaVA's ``<image>``), in the
order of the images; each is expanded to the number of tokens its encoder output has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.formats import ModelConfig
from tessera.multimodal import ClipImageProcessor, MediaError, expand_placeholders, load_image
from tessera.scheduler import MultiModalFeature

DEFAULT_LIMIT_IMAGES = 4  # images a prompt may hold (vLLM's --limit-mm-per-prompt)


class MultiModalPrompter:
    def __init__(
        self,
        folder: Path,
        config: ModelConfig,
        *,
        limit_images: int = DEFAULT_LIMIT_IMAGES,
        allowed_local_media_path: str | None = None,
        allowed_media_domains: tuple[str, ...] = (),
    ) -> None:
        mm = config.multimodal
        self.image_token_id = mm.image_token_id
        self.processor = ClipImageProcessor.from_folder(folder)
        side = mm.vision.image_size
        if self.processor.num_tokens(side, side) != mm.tokens_per_image:
            raise ValueError(
                f"{folder}: the processor gives {self.processor.num_tokens(side, side)} tokens an "
                f"image, the model's encoder {mm.tokens_per_image}"
            )
        self.limit_images = limit_images
        self.media = {
            "allowed_local_media_path": allowed_local_media_path,
            "allowed_media_domains": allowed_media_domains,
        }

    def prepare(
        self, ids: list[int], images: list
    ) -> tuple[list[int], list[MultiModalFeature], list[torch.Tensor]]:
        """(the ids with each image token expanded, the placeholder runs, each image's pixels
        ``[C, H, W]``); ValueError (MediaError for an image) naming what is wrong."""
        if len(images) > self.limit_images:
            raise ValueError(
                f"the prompt holds {len(images)} images, more than the limit of {self.limit_images}"
            )
        marks = sum(t == self.image_token_id for t in ids)
        if marks != len(images):
            raise ValueError(
                f"the prompt names {marks} images (image token id {self.image_token_id}) but "
                f"{len(images)} were given: each image needs its token in the prompt, in order"
            )
        processed = []
        for i, source in enumerate(images):
            try:
                processed.append(self.processor.process_image(load_image(source, **self.media)))
            except MediaError as e:
                raise MediaError(f"image {i}: {e}") from None
        if not processed:
            return ids, [], []
        ids, runs = expand_placeholders(ids, {self.image_token_id: [p.num_tokens for p in processed]})
        features = [
            MultiModalFeature(r.offset, r.length, p.content_hash.hex())
            for r, p in zip(runs[self.image_token_id], processed, strict=True)
        ]
        return ids, features, [p.pixel_values[0] for p in processed]


def images_of(data: dict | None) -> list:
    """The images of vLLM's ``multi_modal_data`` (``{"image": one or a list}``); a ValueError for
    any other modality or key."""
    if not data:
        return []
    unknown = set(data) - {"image"}
    if unknown:
        raise ValueError(f"multi_modal_data: {sorted(unknown)} not supported (this model takes 'image')")
    images = data["image"]
    return list(images) if isinstance(images, (list, tuple)) else [images]
