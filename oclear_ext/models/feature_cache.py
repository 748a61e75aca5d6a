"""A bounded, least-recently-used cache of frozen encoders' outputs, shared by the instances of one encoder."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from torch import Tensor


class FeatureCache:
    """key -> CPU tensor, evicting the least recently used entries beyond max_bytes.

    A frozen encoder's outputs are memoised so that it runs once per distinct input over a training run;
    the bound keeps a large catalogue (millions of titles or images) from filling the host's memory:
    beyond it the least recently used features are recomputed when next needed.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        if max_bytes < 0:
            raise ValueError(f"FeatureCache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, Tensor] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Tensor:
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: Hashable, value: Tensor) -> None:
        value = value.detach().cpu()
        if key in self._entries:
            self.bytes -= self._entries.pop(key).nbytes
        self._entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and self._entries:
            self.bytes -= self._entries.popitem(last=False)[1].nbytes

    def fetch(self, keys: Sequence[Hashable], compute: Callable[[list[int]], Sequence[Tensor]]) -> list[Tensor]:
        """The value of every key: cached ones as they are, the others from compute(positions) (the first
        position of each distinct missing key; it returns their values in that order), which are then
        cached. The returned values stay whole even when the cache cannot hold them all."""
        found = {k: self.get(k) for k in set(keys) if k in self}
        first: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            if key not in found:
                first.setdefault(key, i)
        if first:
            for key, value in zip(first, compute(list(first.values()))):
                found[key] = value.detach().cpu().clone()  # its own storage: a view would keep its batch alive
                self.put(key, found[key])
        return [found[k] for k in keys]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
