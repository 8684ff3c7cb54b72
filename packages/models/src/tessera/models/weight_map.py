"""Checkpoint names -> the layer that loads each tensor. A model declares its parameters here
under their HF and GGUF names; loading checks every name and shape and reports what is missing,
for any architecture alike."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tessera.formats import FormatError

from .parallel import shape_of


@dataclass
class _Slot:
    key: str  # the parameter, whichever name supplied it
    shape: tuple[int, ...]
    load: Callable
    required: bool
    style: str  # "hf" | "gguf"


class WeightMap:
    def __init__(self, architecture: str) -> None:
        self.architecture = architecture
        self._slots: dict[str, _Slot] = {}
        self._keys: dict[str, dict[str, str]] = {}  # key -> style -> name
        self._ignored: list[re.Pattern] = []

    def add(
        self,
        shape: tuple[int, ...],
        load: Callable,
        hf: str,
        gguf: str | None = None,
        *,
        gguf_load: Callable | None = None,
        required: bool = True,
    ) -> None:
        """A parameter of ``shape`` (``[out, in]`` as torch holds it) named ``hf`` in HF
        checkpoints and ``gguf`` in GGUF files; ``load(tensor)`` (``gguf_load`` for GGUF, where
        the converter changed the tensor) receives it."""
        names = {"hf": hf} | ({"gguf": gguf} if gguf else {})
        self._keys[hf] = names
        for style, name in names.items():
            fn = gguf_load if style == "gguf" and gguf_load is not None else load
            self._slots[name] = _Slot(hf, tuple(shape), fn, required, style)

    def add_linear(self, layer, hf: str, gguf: str | None, shard=None, gguf_load: Callable | None = None):
        """A linear layer's weight (and bias, if it has one) under ``<name>.weight`` / ``.bias``."""
        self.add(
            layer.weight_shape(shard),
            lambda t: layer.load_weight(t, shard),
            f"{hf}.weight",
            f"{gguf}.weight" if gguf else None,
            gguf_load=None if gguf_load is None else lambda t: layer.load_weight(gguf_load(t), shard),
        )
        if layer.has_bias:
            self.add(
                layer.bias_shape(shard),
                lambda t: layer.load_bias(t, shard),
                f"{hf}.bias",
                f"{gguf}.bias" if gguf else None,
                gguf_load=None if gguf_load is None else lambda t: layer.load_bias(gguf_load(t), shard),
            )

    def add_norm(self, norm, hf: str, gguf: str | None, gguf_load: Callable | None = None) -> None:
        self.add(
            norm.weight_shape(),
            norm.load_weight,
            f"{hf}.weight",
            f"{gguf}.weight" if gguf else None,
            gguf_load=gguf_load,
        )

    def shapes(self, style: str = "hf") -> dict[str, tuple[int, ...]]:
        """The required tensors' names (in ``style``: "hf" or "gguf") and shapes."""
        out = {}
        for names in self._keys.values():
            slot = self._slots[names["hf"]]
            if slot.required and style in names:
                out[names[style]] = slot.shape
        return out

    def ignore(self, pattern: str) -> None:
        """Tensors some checkpoints carry that the model recomputes or does not use."""
        self._ignored.append(re.compile(pattern))

    def load(self, weights: Iterable, progress: Callable[[int, int], None] | None = None) -> None:
        total = sum(1 for names in self._keys.values() if self._slots[names["hf"]].required)
        done: set[str] = set()
        styles: set[str] = set()
        for name, value in weights:
            slot = self._slots.get(name)
            if slot is None:
                if any(p.fullmatch(name) for p in self._ignored):
                    continue
                raise FormatError(f"unexpected tensor {name} for a {self.architecture} model")
            if slot.key in done:
                raise FormatError(f"tensor {name} appears twice")
            if shape_of(value) != slot.shape:
                got, want = list(shape_of(value)), list(slot.shape)
                raise FormatError(f"tensor {name} has shape {got}, expected {want} from the config")
            slot.load(value)
            done.add(slot.key)
            styles.add(slot.style)
            if progress is not None:
                progress(len(done), total)
        style = "gguf" if styles == {"gguf"} else "hf"
        missing = [
            names.get(style, names["hf"])
            for key, names in self._keys.items()
            if key not in done and self._slots[names["hf"]].required
        ]
        if missing:
            raise FormatError(f"tensor {missing[0]} is missing ({len(missing)} missing)")
