"""A prompt's images and videos, for a vision-language model: loaded under the engine's media
policy, processed as transformers would, and turned into placeholder runs (the scheduler's
``MultiModalFeature``: offset, length, content hash), the processed inputs the runner encodes
and, for an M-RoPE model (Qwen2-VL), the prompt's 3-D positions.

The prompt names each image with the model's image token once (LLaVA's ``<image>``, Qwen2-VL's
``<|image_pad|>``; a video with its video token), in the order of the inputs; each is expanded
to the number of tokens its encoder output has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tessera.formats import ModelConfig
from tessera.multimodal import (
    ClipImageProcessor,
    MediaError,
    ProcessedImage,
    Qwen2VLImageProcessor,
    expand_placeholders,
    load_image,
    load_video,
    load_video_frames,
    mrope_positions,
)
from tessera.scheduler import MultiModalFeature

DEFAULT_LIMIT_IMAGES = 4  # images (and videos) a prompt may hold (vLLM's --limit-mm-per-prompt)
MAX_VIDEO_FRAMES = 16  # frames a video is sampled down to


@dataclass(frozen=True)
class EncoderInput:
    """One image or video as the runner encodes it."""

    pixels: torch.Tensor  # as the processor gives it: LLaVA [1, 3, H, W]; Qwen2-VL [patches, C*T*P*P]
    grid_thw: torch.Tensor | None  # Qwen2-VL: [1, 3] (frames, rows, columns in patches)


@dataclass(frozen=True)
class MultiModalInputs:
    """A prompt's inputs as the engine hands them on."""

    features: list[MultiModalFeature]
    inputs: list[EncoderInput]
    # M-RoPE models: the prompt's [3, n] positions and the offset of every later token's
    mrope: tuple[torch.Tensor, int] | None = None


class MultiModalPrompter:
    def __init__(
        self,
        folder: Path,
        config: ModelConfig,
        *,
        uses_mrope: bool = False,
        limit_images: int = DEFAULT_LIMIT_IMAGES,
        allowed_local_media_path: str | None = None,
        allowed_media_domains: tuple[str, ...] = (),
    ) -> None:
        mm = config.multimodal
        self.image_token_id = mm.image_token_id
        self.video_token_id = getattr(mm, "video_token_id", None)
        self.merge = getattr(mm, "spatial_merge_size", None)
        self.uses_mrope = uses_mrope
        if uses_mrope:
            self.processor = Qwen2VLImageProcessor.from_folder(folder)
            self.video_processor = Qwen2VLImageProcessor.from_folder(folder, video=True)
        else:
            self.processor = ClipImageProcessor.from_folder(folder)
            self.video_processor = None
            side = mm.vision.image_size
            if self.processor.num_tokens(side, side) != mm.tokens_per_image:
                raise ValueError(
                    f"{folder}: the processor gives {self.processor.num_tokens(side, side)} tokens an "
                    f"image, the model's encoder {mm.tokens_per_image}"
                )
        # the most placeholder tokens one input can have: Qwen2-VL's at the processor's pixel cap
        if uses_mrope:
            f, v = self.processor.factor, self.video_processor.factor
            self.max_tokens_per_input = max(
                self.processor.max_pixels // (f * f),
                self.video_processor.max_pixels // (v * v) * (MAX_VIDEO_FRAMES // 2),
            )
        else:
            self.max_tokens_per_input = mm.tokens_per_image
        self.limit_images = limit_images
        self.media = {
            "allowed_local_media_path": allowed_local_media_path,
            "allowed_media_domains": allowed_media_domains,
        }

    def prepare(
        self, ids: list[int], images: list, videos: list
    ) -> tuple[list[int], MultiModalInputs | None]:
        """(the ids with each input's token expanded, its inputs); ValueError (MediaError for an
        image or a video) naming what is wrong."""
        if videos and self.video_processor is None:
            raise ValueError("this model takes images, not videos")
        if len(images) + len(videos) > self.limit_images:
            raise ValueError(
                f"the prompt holds {len(images) + len(videos)} images and videos, more than the limit of "
                f"{self.limit_images}"
            )
        self._check_marks(ids, self.image_token_id, len(images), "image")
        if self.video_token_id is not None:
            self._check_marks(ids, self.video_token_id, len(videos), "video")
        if not images and not videos:
            return ids, None
        done: dict[int, list[ProcessedImage]] = {self.image_token_id: []}
        for i, source in enumerate(images):
            try:
                done[self.image_token_id].append(
                    self.processor.process_image(load_image(source, **self.media))
                )
            except MediaError as e:
                raise MediaError(f"image {i}: {e}") from None
        if videos:
            done[self.video_token_id] = []
            for i, video in enumerate(videos):
                try:
                    if isinstance(video, (list, tuple)):
                        sampled = load_video_frames(list(video), max_frames=MAX_VIDEO_FRAMES, **self.media)
                    else:  # a file: a data:video/... URL, a path, an allowed http(s) URL, bytes
                        sampled = load_video(video, max_frames=MAX_VIDEO_FRAMES, **self.media)
                    done[self.video_token_id].append(self.video_processor.process_video(sampled))
                except (MediaError, TypeError) as e:
                    raise MediaError(f"video {i}: {e}") from None
        ids, runs = expand_placeholders(ids, {tok: [p.num_tokens for p in ps] for tok, ps in done.items()})
        pairs = sorted(
            ((r, p) for tok, ps in done.items() for r, p in zip(runs.get(tok, []), ps, strict=True)),
            key=lambda rp: rp[0].offset,
        )
        features = [MultiModalFeature(r.offset, r.length, p.content_hash.hex()) for r, p in pairs]
        inputs = [
            EncoderInput(p.pixel_values, torch.tensor([p.grid_thw]) if p.grid_thw is not None else None)
            for _, p in pairs
        ]
        mrope = None
        if self.uses_mrope:
            mrope = mrope_positions(len(ids), [(r, p.grid_thw) for r, p in pairs], self.merge)
        return ids, MultiModalInputs(features, inputs, mrope)

    @staticmethod
    def _check_marks(ids: list[int], token: int, given: int, what: str) -> None:
        marks = sum(t == token for t in ids)
        if marks != given:
            raise ValueError(
                f"the prompt names {marks} {what}s ({what} token id {token}) but {given} were given: "
                f"each {what} needs its token in the prompt, in order"
            )


def inputs_of(data: dict | None) -> tuple[list, list]:
    """(images, videos) of vLLM's ``multi_modal_data``: ``"image"``, one or a list; ``"video"``,
    one video (a list of PIL frames, or a file: URL, path or bytes) or a list of videos. A
    ValueError for any other key."""
    if not data:
        return [], []
    unknown = set(data) - {"image", "video"}
    if unknown:
        raise ValueError(f"multi_modal_data: {sorted(unknown)} not supported (it takes 'image' and 'video')")
    images = data.get("image", [])
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    videos = data.get("video", [])
    if not isinstance(videos, (list, tuple)) or (videos and isinstance(videos[0], Image.Image)):
        videos = [videos]  # one video: a file, or a list of frames
    return images, list(videos)
