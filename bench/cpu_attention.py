"""Which packed attention the CPU should run (docs/design.md section 13): the backends that can take
a dynamic layout on CPU, on the layouts of the high-resolution and 224 px benchmarks, interleaved.

    PYTHONPATH=. python bench/cpu_attention.py [--repeats 15] [--threads 2]

Backends: ``grouped_sdpa`` as a model's blocks call it (``grouped_sdpa_block_attention``), as
``packed_attention`` calls it (with the NaN-row restoration), ``reference``, ``padded_sdpa``, and a
jagged nested tensor through ``F.scaled_dot_product_attention``; against one batched SDPA over
the same number of rows cut into equal lengths (what a ViT at equal tokens runs). Prints the
minimum and median ms of each (the minimum is the least disturbed by a shared machine) and the
load average; nothing is written.
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from msvit_kernels import cu_seqlens_from_lengths
from msvit_kernels.attention import BACKENDS
from msvit_kernels.grouped_attention import grouped_sdpa_block_attention

# tokens per image: ViT-S/16 at 512 px, the first four photos, three scales (APT's thresholds);
# one photo; 32 images of about 100 tokens (the 224 px suite's spread masks)
LAYOUTS = {
    "512 px, batch 4": [758, 689, 917, 389],
    "512 px, batch 1": [758],
    "224 px, batch 32": [50 + 3 * (i % 24) + (i % 5) for i in range(32)],
}
HEADS, DIM = 6, 64


def nested_sdpa(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """A jagged nested tensor over the packed rows, one SDPA call (``[B, j, H, D]`` -> ``[B, H, j, D]``)."""
    offsets = cu_seqlens.long()
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).values()


def runs(lengths):
    """Every contender on one layout: q, k, v views of a fused ``[T, 3, H, D]`` projection."""
    qkv = torch.randn(sum(lengths), 3, HEADS, DIM)
    q, k, v = qkv.unbind(1)
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    longest = max(lengths)
    equal = qkv[: len(lengths) * (sum(lengths) // len(lengths))].view(len(lengths), -1, 3, HEADS, DIM)
    eq = [t.transpose(1, 2) for t in equal.unbind(2)]
    return {
        "batched SDPA, equal lengths (the ViT)": lambda: F.scaled_dot_product_attention(*eq),
        "grouped_sdpa (blocks)": lambda: grouped_sdpa_block_attention(q, k, v, cu, longest),
        "grouped_sdpa (packed_attention)": lambda: BACKENDS["grouped_sdpa"].fn(q, k, v, cu, longest),
        "reference": lambda: BACKENDS["reference"].fn(q, k, v, cu, longest),
        "padded_sdpa": lambda: BACKENDS["padded_sdpa"].fn(q, k, v, cu, longest),
        "nested jagged SDPA": lambda: nested_sdpa(q, k, v, cu, longest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, load average {os.getloadavg()}")
    with torch.inference_mode():
        for name, lengths in LAYOUTS.items():
            contenders = runs(lengths)
            for label, fn in list(contenders.items()):
                try:
                    fn()
                except Exception as exc:  # the jagged nested tensor's SDPA on a CPU-only CUDA build of torch
                    print(f"  {label}: fails, {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    del contenders[label]
            times = {label: [] for label in contenders}
            for _ in range(args.repeats):  # interleaved: every contender once per round
                for label, fn in contenders.items():
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
            print(f"\n{name}: {sum(lengths)} rows, {len(set(lengths))} distinct lengths")
            for label, seconds in times.items():
                print(
                    f"  {label:40s} min {min(seconds) * 1e3:8.2f} ms  median {statistics.median(seconds) * 1e3:8.2f} ms"
                )
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
