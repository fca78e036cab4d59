"""Count the host reads of a forward: every place the host waits for a tensor's value.

On a GPU a host read (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing, ``bincount``,
``repeat_interleave`` without ``output_size`` ...) synchronises: the host stops queueing work
until the device has caught up, the device then idles while the host queues again, and a CUDA
graph cannot contain it. docs/design.md section 9 fixes the budget: none in a packed forward with
a static shape (a token budget or a capacity), exactly one (the token count) without.

The counter sees the calls on any device, so the rule is tested on CPU. Two kinds of calls are
caught: aten ops whose output size or value the host must read (through a dispatch mode), and
``Tensor.tolist`` / ``Tensor.numpy``, which bypass the dispatcher (patched while counting). Reads
made by the Triton interpreter itself (it runs kernels on host copies under
``TRITON_INTERPRET=1``) are not counted: on a GPU a launch reads nothing back.

    with count_host_reads() as reads:
        model(images, budget=20)
    assert reads.count == 0, reads.report()
"""

import contextlib
import traceback
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose result needs a value on the host: a scalar, or an output size that depends on data
_READ_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t), if t: ...
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
_BYPASSING = ("tolist", "numpy")  # Tensor methods that read without a dispatched op
# Scalar reads: they dispatch aten._local_scalar_dense, except on inference tensors under
# torch.inference_mode, where torch reads a CPU scalar without any dispatched op (every runner
# enters inference mode: a counter blind there would pass a forward that reads). Patched while
# counting; the read is recorded once, by the method, and not again by the dispatch mode inside it.
_SCALAR = ("item", "__int__", "__float__", "__bool__", "__index__")
_INTERPRETER_FILES = ("triton/runtime/interpreter", "triton/runtime/jit", "triton\\runtime\\interpreter")


def _boolean_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_read(func, args, kwargs) -> bool:
    if func in _READ_OPS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None and (len(args) < 3 or args[2] is None)
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return _boolean_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    return False


class HostReads(TorchDispatchMode):
    """The reads seen so far: ``count``, ``events`` (op name and the line of user code)."""

    def __init__(self):
        super().__init__()
        self.events: List[str] = []
        self.in_scalar_read = 0  # inside a patched scalar method: its _local_scalar_dense is that read

    @property
    def count(self) -> int:
        return len(self.events)

    def record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(any(name in frame.filename for name in _INTERPRETER_FILES) for frame in stack):
            return
        user = [f for f in stack if "/torch/" not in f.filename and "host_reads" not in f.filename]
        here = user[-1] if user else None
        self.events.append(f"{what} at {here.filename}:{here.lineno}" if here else what)

    def report(self) -> str:
        return f"{self.count} host read(s)" + "".join(f"\n  {event}" for event in self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_read(func, args, kwargs) and not (self.in_scalar_read and func is aten._local_scalar_dense.default):
            self.record(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads():
    """Within the block, count host reads (yields a ``HostReads``)."""
    reads = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in _BYPASSING}

    def patched(name):
        def method(self, *args, **kwargs):
            reads.record(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)

        return method

    def scalar(name):
        def method(self, *args, **kwargs):
            reads.record(f"Tensor.{name.strip('_')}")
            reads.in_scalar_read += 1
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                reads.in_scalar_read -= 1

        return method

    originals.update({name: getattr(torch.Tensor, name) for name in _SCALAR})
    for name in _BYPASSING:
        setattr(torch.Tensor, name, patched(name))
    for name in _SCALAR:
        setattr(torch.Tensor, name, scalar(name))
    try:
        with reads:
            yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
