"""Tables derived from parameters once per input size, not once per forward (docs/design.md section 9).

The tokenizer's position tables (the fine embedding resampled to an image's grid, the coarse one
resampled from it) and RoPE's sin/cos tables depend only on parameters and the image size, yet a
forward used to rebuild them every call: about a dozen small ops of host time that buy nothing at
inference. A ``TableCache`` keeps the latest tables per key while no gradient is being recorded
for the parameters. It rebuilds when a parameter changes: in place (an optimizer step or
``load_state_dict`` bumps ``Tensor._version``) or by replacement (``model.to(...)`` gives new storage).
It never caches inside ``torch.compile`` tracing or a CUDA-graph capture: there the tables are
built in the graph, so a replay always sees the current weights.
"""

from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor

MAX_ENTRIES = 8  # image sizes x dtypes a model alternates between; old entries are dropped first


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TableCache:
    """Latest tables per key, valid while their parameters are unchanged."""

    def __init__(self):
        self._entries = {}

    def get(self, key: Hashable, params: Sequence[Tensor], build: Callable[[], object]):
        """``build()``, or the table it gave for ``key`` and the same parameter values."""
        params = [p for p in params if p is not None]
        if torch.compiler.is_compiling() or _capturing():
            return build()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()  # training: the table must carry the gradient graph of this forward
        if any(p.is_inference() for p in params):
            return build()  # made under inference_mode: no version counter to notice a change by
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        table = build()
        self._entries.pop(key, None)
        self._entries[key] = (stamp, table)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        return table

    def clear(self) -> None:
        self._entries.clear()
