"""The model runner's multimodal side: each input's encoder output, computed when the scheduler
says (``SchedulerOutput.scheduled_encoder_inputs``), kept per request until it finishes, shared
across requests through a content-keyed cache, and merged into the step's input embeddings.

The engine registers a request's processed inputs (``add_inputs``) before the scheduler sees
the request; the scheduler decides when each input's encoder runs (once, before the first step
whose tokens touch its placeholders, and again after a preemption); the runner asks this class
for the step's embeddings whenever a scheduled chunk overlaps placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.multimodal import EncoderCache
from tessera.scheduler import MultiModalFeature

from .multimodal_prompt import EncoderInput


@dataclass
class _RequestInputs:
    inputs: list[EncoderInput]  # per input (the request's mm_features, in order)
    mrope: tuple[torch.Tensor, int] | None = None  # M-RoPE: the prompt's [3, n] positions, delta
    features: list[MultiModalFeature] = field(default_factory=list)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # encoded, by input index


class EncoderRunner:
    def __init__(self, model, cache_bytes: int) -> None:
        self.model = model
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        self.cache = EncoderCache(cache_bytes)
        self.requests: dict[str, _RequestInputs] = {}
        self.encoder_runs = 0  # inputs encoded (cache misses)
        self.encoder_cache_hits = 0

    def add_inputs(
        self, request_id: str, inputs: list[EncoderInput], mrope: tuple[torch.Tensor, int] | None = None
    ) -> None:
        self.requests[request_id] = _RequestInputs(list(inputs), mrope)

    def start(self, request_id: str, features: list[MultiModalFeature]) -> None:
        """The request (re)enters the runner: its inputs' placeholder runs; outputs start over."""
        req = self.requests.get(request_id)
        if features and req is None:
            raise RuntimeError(f"request {request_id} has images but the runner was given none")
        if req is not None:
            if len(features) != len(req.inputs):
                raise RuntimeError(
                    f"request {request_id}: {len(features)} placeholder runs for {len(req.inputs)} inputs"
                )
            req.features, req.outputs = list(features), {}

    def stop(self, request_id: str, finished: bool) -> None:
        """A preempted request drops its outputs (the cache may keep them); a finished one goes."""
        if finished:
            self.requests.pop(request_id, None)
        elif request_id in self.requests:
            self.requests[request_id].outputs = {}

    def encode(self, scheduled: dict[str, list[int]]) -> None:
        """Each scheduled input's encoder output, from the cache or the model."""
        for rid, indices in scheduled.items():
            req = self.requests[rid]
            for i in indices:
                f = req.features[i]
                out = self.cache.get(f.identifier)
                if out is None:
                    inp = req.inputs[i]
                    pixels = inp.pixels.to(device=self.model.device, dtype=self.model.dtype)
                    if inp.grid_thw is None:
                        (out,) = self.model.embed_multimodal(pixels)
                    else:
                        (out,) = self.model.embed_multimodal(pixels, inp.grid_thw.to(self.model.device))
                    if out.shape[0] != f.length:
                        raise RuntimeError(
                            f"request {rid}: input {i} encodes to {out.shape[0]} rows for its {f.length} "
                            "placeholder tokens"
                        )
                    self.cache.put(f.identifier, out)
                    self.encoder_runs += 1
                else:
                    self.encoder_cache_hits += 1
                req.outputs[i] = out

    def embeds(self, ids: list[int], chunks: list[tuple[str, int, int]], device) -> torch.Tensor | None:
        """The step's input embeddings where a chunk overlaps placeholders, else None (the ids
        path: nothing built). ``chunks``: per scheduled request in row order, (id, first token,
        tokens)."""
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        row0 = 0
        for rid, start, n in chunks:
            req = self.requests.get(rid)
            for i, f in enumerate(req.features if req is not None else ()):
                lo, hi = max(start, f.offset), min(start + n, f.offset + f.length)
                if lo >= hi:
                    continue
                out = req.outputs.get(i)
                if out is None:
                    raise RuntimeError(f"request {rid}: input {i} was not encoded before its tokens ran")
                parts.append(out[lo - f.offset : hi - f.offset])
                rows.extend(range(row0 + lo - start, row0 + hi - start))
            row0 += n
        if not parts:
            return None
        mask = torch.zeros(len(ids), dtype=torch.bool, device=device)
        mask[torch.tensor(rows, device=device)] = True
        return self.model.embed_input_ids(torch.tensor(ids, dtype=torch.int64, device=device), parts, mask)

    def positions(
        self, chunks: list[tuple[str, int, int]], flat: torch.Tensor, prompt_lens: dict
    ) -> torch.Tensor:
        """An M-RoPE model's [3, T] positions for the step: a prompt token with vision inputs
        takes its row of the prompt's positions, every later token (output, draft) j + delta;
        requests without inputs (``flat``: token j at j) the same j in all three."""
        pos = flat.unsqueeze(0).repeat(3, 1)
        row0 = 0
        for rid, start, n in chunks:
            req = self.requests.get(rid)
            if req is not None and req.mrope is not None:
                prompt, delta = req.mrope
                p_end = min(start + n, prompt_lens[rid])
                if p_end > start:
                    pos[:, row0 : row0 + p_end - start] = prompt[:, start:p_end].to(pos.device)
                if start + n > p_end:
                    lo = row0 + max(p_end - start, 0)
                    pos[:, lo : row0 + n] += delta
            row0 += n
        return pos
