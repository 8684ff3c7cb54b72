"""Content hashes as the prefix cache's extra keys: per block, the hashes of the images in it,
in the type tessera.kvcache's block hash takes; different images behind equal tokens give
different block hashes from the first block holding an image on."""

from __future__ import annotations

import torch

from tessera.kvcache import hash_blocks
from tessera.multimodal import PlaceholderRange, block_extra_keys, content_hash


def test_each_block_lists_the_hashes_of_the_images_overlapping_it():
    a, b = b"a" * 32, b"b" * 32
    keys = block_extra_keys([(PlaceholderRange(20, 8), b), (PlaceholderRange(3, 14), a)], 40, 8)
    assert keys == [(a,), (a,), (a, b), (b,), None]


def test_different_images_behind_equal_tokens_never_share_a_block_hash():
    ids = [1, 2, 3] + [9] * 20 + [4, 5, 6, 7, 8, 9, 10, 11, 12]
    run = PlaceholderRange(3, 20)
    h1 = content_hash(torch.ones(2, 3), (1, 2, 2), "settings")
    h2 = content_hash(torch.zeros(2, 3), (1, 2, 2), "settings")
    assert h1 != h2 and isinstance(h1, bytes) and len(h1) == 32
    first = hash_blocks(ids, 8, extra_keys=block_extra_keys([(run, h1)], len(ids), 8))
    second = hash_blocks(ids, 8, extra_keys=block_extra_keys([(run, h2)], len(ids), 8))
    again = hash_blocks(ids, 8, extra_keys=block_extra_keys([(run, h1)], len(ids), 8))
    assert first == again
    assert all(x != y for x, y in zip(first, second, strict=True))


def test_the_hash_covers_pixels_grid_and_settings():
    pixels = torch.arange(12, dtype=torch.float32).view(3, 4)
    base = content_hash(pixels, (1, 2, 2), "s")
    assert base == content_hash(pixels.clone(), (1, 2, 2), "s")
    assert base != content_hash(pixels, (1, 1, 4), "s")
    assert base != content_hash(pixels, (1, 2, 2), "t")
    assert base != content_hash(pixels.view(4, 3), (1, 2, 2), "s")
    assert base != content_hash(pixels.to(torch.bfloat16), (1, 2, 2), "s")
