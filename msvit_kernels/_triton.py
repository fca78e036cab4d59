"""Launch plumbing every Triton kernel of the package shares: the guarded import, the interpreter
flag, per-GPU config lists, and a recorder the ahead-of-time compile report replays.

A :class:`TritonKernel` wraps one ``@triton.jit`` function and the tile configs its launcher may
choose. ``configs_for(capability, meta)`` keeps only the configs that compile clean on that GPU
generation (no register spills, shared memory within the per-block limit: the compile report,
``python -m msvit_kernels.compile_report``, proves it for sm_70 .. sm_90), so a V100 or a T4 never
autotunes a config that cannot run there. One config launches directly; several are autotuned
(one autotuner per capability and config set, keyed like the kernel's autotune key).

Under :func:`record_launches` a launch is recorded instead of run: the compile report calls the
real launchers on small CPU stand-in tensors and compiles exactly the arguments and constexprs a
GPU launch would bind. Nothing here touches a GPU or a driver.

On CPU the kernels run only under ``TRITON_INTERPRET=1``, set before this package is imported
(``triton.jit`` decides at decoration time); the interpreter then takes each kernel's
``interpret_meta`` tiles (few, large programs: it pays per program, not per FLOP).
It also holds what the kernels share: the dtypes they take, ``triton_support`` (can they run on
this tensor, and if not, why), ``patch_features`` (a patch's (C, p, p) feature order, used by the
gate and pack kernels), the dot precision per dtype.

The gate's exact GELU uses ``tl.math.erf``, a core Triton op: the compiler lowers it to the
libdevice that ships inside Triton (``__nv_erff``) and the interpreter to ``math.erf``, so the
kernel matches ``F.gelu`` (erf form) and needs no tanh approximation on either side. Portability
(Triton 3.6 to 3.9, sm_70+): pointer arithmetic with masks (no ``tl.make_block_ptr``), no inline
asm, no explicit libdevice import.
"""

import contextlib
import functools
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional off Linux; the torch paths serve every device then
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Per-block shared memory (bytes) each target may give one program (CUDA's opt-in maximum).
SHARED_MEMORY_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}

# A config that may run only where ``fits(capability, meta)`` says so (meta: the launch's constexprs).
Fits = Callable[[int, dict], bool]


def everywhere(capability: int, meta: dict) -> bool:
    return True


def half_on_ampere(capability: int, meta: dict) -> bool:
    """fp16/bf16 dots on sm_80+: the big tiles. fp32 (IEEE dots, FMA, no tensor cores) and sm_70/75
    (mma.m8n8k4 / m16n8k8 layouts) spill them in the compile report."""
    return capability >= 80 and meta.get("DOT_PRECISION") != "ieee"


class LaunchRecord(NamedTuple):
    """One recorded launch: the kernel, its positional arguments and the launcher's constexprs."""

    kernel: "TritonKernel"
    args: tuple
    meta: dict


_recording: List[Optional[List[LaunchRecord]]] = [None]


@contextlib.contextmanager
def record_launches():
    """Within the block, kernel launches are recorded (yielded list), not run; device checks pass."""
    previous = _recording[0]
    _recording[0] = records = []
    try:
        yield records
    finally:
        _recording[0] = previous


def recording() -> bool:
    return _recording[0] is not None


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


# The oldest target of the compile report (sm_70), whose configs a launch takes where no CUDA driver
# answers: a program traced for inspection under fake CUDA tensors. It is not the configs of every
# GPU (the fp32 backward's 32x32 attention tile spills 8 B on sm_75/80, and a newer GPU has bigger
# tiles): AOTInductor compiles a package on the GPU, where a traced launch asks the device.
PORTABLE_CAPABILITY = min(SHARED_MEMORY_LIMIT)


def launch_capability(device: torch.device) -> int:
    """The GPU generation a launch on ``device`` chooses its configs for: the device's, or, where no
    CUDA driver answers (``torch.export`` under fake CUDA tensors), ``PORTABLE_CAPABILITY``, so
    tracing never asks CUDA a question it cannot answer."""
    if cuda_driver():
        return device_capability(device.index or 0)
    return PORTABLE_CAPABILITY


@functools.lru_cache(maxsize=None)
def cuda_driver() -> bool:
    """``torch.cuda.is_available()``, asked once (it costs ~5 us without a driver; launches ask it each time)."""
    return torch.cuda.is_available()


def traced(tensor: Tensor) -> bool:
    """True when a launch is being traced (``torch.compile``, ``torch.export``, Inductor tracing into
    a ``triton_op``) rather than run: ``tensor`` (any argument of the launch) is fake, or a compiler
    is tracing. A traced launch goes through ``torch.library.wrap_triton``, which records it in the
    graph; an eager one calls the kernel straight (the wrapper's dispatch costs ~1 ms).
    """
    return torch.compiler.is_compiling() or fake(tensor)


def fake(tensor: Tensor) -> bool:
    """Whether ``tensor`` carries no data (a FakeTensor, or a functional wrapper of one). A plain,
    unwrapped tensor is answered first: ``is_fake`` costs ~9 us, a launch's host budget."""
    if type(tensor) is Tensor and not torch._is_functional_tensor(tensor):
        return False
    return is_fake(tensor)


def kernel_op(name: str, kernels: Sequence["TritonKernel"], *, mutates_args=()):
    """The ``torch.library`` decorator for a launcher of ``kernels``: ``triton_op`` where Triton
    compiles, so ``torch.compile`` and ``torch.export`` see its ``wrap_triton`` launches and an
    AOTInductor package carries the kernels (docs/design.md section 14); ``custom_op`` under the
    interpreter (it reads data pointers, so no fake tensor may reach it: the op stays opaque) or
    without triton.

    Either way the body is the op's fake implementation (a launch on fake tensors records or skips
    the kernel, ``TritonKernel``), unless the op registers a cheaper one of its own."""

    def register(body):
        if triton is not None and not INTERPRET:
            return _triton_op(name, body, [kernel.fn for kernel in kernels], mutates_args)
        op = torch.library.custom_op(name, mutates_args=mutates_args)(body)
        op.register_fake(body)
        return op

    return register


def _triton_op(name: str, body, kernels: list, mutates_args):
    """``torch.library.triton_op(name)(body)``, told its kernels instead of scanning for them: its
    scan of the body's source imports ``torch._inductor`` (``import msvit`` went from 0.9 s to 8 s
    at load 10) and finds none of ours (they launch through ``TritonKernel``, not a literal
    ``wrap_triton(kernel)``). The list keys AOTAutograd's cache on the kernels' source."""
    from torch._library import triton as library

    scan = getattr(library, "get_inner_triton_kernels", None)
    if scan is None:  # another torch: its own way
        return torch.library.triton_op(name, mutates_args=mutates_args)(body)
    library.get_inner_triton_kernels = lambda fn: kernels
    try:
        return torch.library.triton_op(name, mutates_args=mutates_args)(body)
    finally:
        library.get_inner_triton_kernels = scan


class TritonKernel:
    """A jitted kernel and the configs its launcher can choose.

    fn: the ``@triton.jit`` function. configs: ``(triton.Config, fits)`` pairs, or None when the
    launcher fixes every constexpr itself (tiles and ``num_warps`` then come in ``meta``). key: the
    autotune key (constexpr or argument names). interpret_meta: tiles for the CPU interpreter.
    """

    def __init__(
        self,
        fn,
        configs: Optional[Sequence] = None,
        key: Sequence[str] = (),
        interpret_meta: Optional[Dict[str, int]] = None,
    ):
        self.fn = fn
        self.name = fn.fn.__name__ if hasattr(fn, "fn") else getattr(fn, "__name__", repr(fn))
        self.configs = None if configs is None else [(c, f or everywhere) for c, f in configs]
        self.key = list(key)
        self.interpret_meta = dict(interpret_meta or {})
        self._tuners = {}

    def configs_for(self, capability: int, meta: dict) -> list:
        """The configs a launch with constexprs ``meta`` may use on ``sm_<capability>``
        (``[None]`` for a kernel whose launcher fixes everything)."""
        if self.configs is None:
            return [None]
        chosen = [c for c, fits in self.configs if fits(capability, meta)]
        if not chosen:
            raise RuntimeError(f"{self.name}: no tile config fits sm_{capability} for {meta}")
        return chosen

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **meta):
        if recording():
            _recording[0].append(LaunchRecord(self, args, meta))
            return
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        if INTERPRET:
            if not fake(tensor):  # a fake tensor (an op's fake implementation) has no data to compute on
                self.fn[grid](*args, **meta, **self.interpret_meta)
            return
        configs = self.configs_for(launch_capability(tensor.device), meta)
        kernel = self.fn
        if len(configs) == 1 and configs[0] is not None:  # its tiles, warps and stages (wrap_triton refuses num_ctas)
            config = configs[0]
            meta = {**meta, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        elif len(configs) > 1:
            kernel = self._tuners.get(tuple(map(id, configs)))
            if kernel is None:  # every launcher only writes what it never reads: timing in place is harmless
                kernel = self._tuners[tuple(map(id, configs))] = triton.autotune(configs, key=self.key)(self.fn)
        if traced(tensor):
            kernel = torch.library.wrap_triton(kernel)
        kernel[grid](*args, **meta)


def bfloat16_reason(tensor: torch.Tensor) -> str:
    """'' unless ``tensor`` is bfloat16 on a GPU older than sm_80, else a sentence naming the GPU."""
    if tensor.dtype != torch.bfloat16 or tensor.device.type != "cuda" or not cuda_driver():
        return ""  # no driver: an export under fake CUDA tensors; the compile on the GPU decides
    index = tensor.device.index or 0
    capability = device_capability(index)  # cached: this runs on every tokenizer call
    if capability >= 80:
        return ""
    return bfloat16_gpu_reason(capability, torch.cuda.get_device_name(index))


def bfloat16_gpu_reason(capability: int, name: str) -> str:
    """V100 and T4 (sm_70/75) have no bfloat16 tensor cores and Triton's bfloat16 dots are not
    supported there: the launchers refuse bfloat16 with this message instead of a compiler crash."""
    if capability >= 80:
        return ""
    return f"bfloat16 needs an sm_80 (Ampere) or newer GPU; this {name} is sm_{capability}: use float16"


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def patch_features(k0, K: tl.constexpr, PATCH: tl.constexpr, BLOCK_K: tl.constexpr):
        """Features ``k0 .. k0 + BLOCK_K`` of a flattened patch in (C, p, p) order (patchify's, a conv
        weight's): returns (offsets, in-range mask, channel, row, column) with
        ``k = (c * p + y) * p + x``."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return offs_k, offs_k < K, offs_k // (PATCH * PATCH), (offs_k // PATCH) % PATCH, offs_k % PATCH

else:
    patch_features = None


def triton_support(tensor: Tensor, what: str = "the Triton tokenizer") -> str:
    """'' when ``what`` (a kernel, named in the message) can run on ``tensor``'s device and dtype,
    else a sentence saying why not."""
    if triton is None:
        return "triton is not installed: pip install triton (or pip install .[triton])"
    if tensor.dtype not in KERNEL_DTYPES:
        return f"{what} takes float16, bfloat16 or float32 tensors, not {tensor.dtype}"
    if tensor.device.type == "cuda":
        return bfloat16_reason(tensor)
    if (tensor.device.type == "cpu" and INTERPRET) or recording():
        return ""
    return (
        f"{what} runs on CUDA GPUs, not on {tensor.device.type}; on CPU it runs only under "
        "TRITON_INTERPRET=1 set before importing msvit_kernels (slow, meant for tests)"
    )


def skips_custom_op(*tensors: Optional[Tensor]) -> bool:
    """True when a launcher may be called directly instead of through its ``torch.library`` op:
    eager inference (no tensor needs a gradient, nothing is being traced by ``torch.compile``).
    The op's Python dispatch costs ~10-20 us per call on CPU (bench/results/<cpu>/host_overhead.md),
    a quarter of an attention call's host time; the op stays for training and compiled graphs."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def check_flat_nodes(pixels: Tensor, node_pixels: Tensor, nodes: range) -> None:
    """TypeError/ValueError naming what is wrong with the arguments every kernel's ``LIST`` mode takes:
    the list's flat pixel buffer (1-D float), its ``TreeBatch.node_pixels`` (int64 ``[4, n_nodes]`` on
    the pixels' device) and a contiguous range of global nodes inside it."""
    if not isinstance(pixels, Tensor) or pixels.dim() != 1 or not pixels.is_floating_point():
        raise TypeError("pixels must be the list's flat float pixel buffer, a 1-D float tensor")
    if (
        not isinstance(node_pixels, Tensor)
        or node_pixels.dtype != torch.int64
        or node_pixels.dim() != 2
        or node_pixels.shape[0] != 4
        or node_pixels.device != pixels.device
    ):
        raise ValueError("node_pixels must be int64 [4, n_nodes] on the pixels' device (TreeBatch.node_pixels)")
    if not isinstance(nodes, range) or nodes.step != 1 or nodes.start < 0 or nodes.stop > node_pixels.shape[1]:
        raise ValueError(f"nodes must be a range of global nodes inside 0 .. {node_pixels.shape[1]}, got {nodes!r}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact fp32 products ("ieee", no TF32) so results track the fp32 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_launchable(images: Tensor) -> None:
    """Raise the ``triton_support`` reason for ``images`` if the kernels cannot run on it."""
    reason = triton_support(images)
    if reason:
        raise RuntimeError(reason)
