"""The patch-entropy kernel (APT's gate) against its torch reference, on real photos and on pixels
placed on the bin edges; its torch.library op under torch.compile; no host reads; bad input.

On a CPU-only machine the kernel runs in the Triton interpreter (tests/conftest.py), so the
shapes stay small: a 96x160 photo has 15 regions of 32 px.
"""

import math

import pytest
import torch

from msvit.data import IMAGENET_MEAN, IMAGENET_STD, normalize, sample_photos
from msvit.host_reads import count_host_reads
from msvit_kernels.entropy_kernel import patch_entropy
from msvit_kernels.reference import ENTROPY_LUMA, entropy_bins_reference, entropy_reference

from helpers import DEVICE, needs_triton

pytestmark = needs_triton
TOL = 1e-5  # bits


@pytest.fixture(scope="module")
def photos():
    """The bundled photos at 96x160, ImageNet-normalised: [8, 3, 96, 160]."""
    return normalize(sample_photos((96, 160))[1]).to(DEVICE)


def check_against_reference(images, patch, threshold, **options):
    """Kernel entropies within TOL of the reference; decisions equal except within TOL of the threshold."""
    out = patch_entropy(images, patch, threshold=threshold, **options)
    ref = entropy_reference(images, patch, options.get("mean"), options.get("std"), options.get("bins", 512))
    assert out.entropy.dtype == torch.float32 and out.entropy.shape == ref.shape
    assert (out.entropy - ref).abs().max().item() <= TOL
    if threshold is not None:
        clear = (ref - threshold).abs() > TOL
        assert torch.equal(out.fine[clear], (ref > threshold)[clear])
    return out, ref


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bins", [512, 256])
def test_kernel_matches_reference_on_real_photos(photos, batch, bins):
    images = photos[:batch] if batch == 1 else photos[[0, 3, 7]]  # astronaut; astronaut, rocket, camera
    out, ref = check_against_reference(images, 32, 6.5, mean=IMAGENET_MEAN, std=IMAGENET_STD, bins=bins)
    assert out.fine.dtype == torch.bool and out.fine.shape == (batch, 15)
    assert ref.min() < 6.5 < ref.max() or batch == 1  # the photos give both decisions


def test_kernel_matches_reference_on_odd_layouts(photos):
    """fp16 pixels, a channels-last view, 16 px patches (a finer scale), a grey image."""
    images = photos[[1, 4]]
    check_against_reference(images.half(), 32, 6.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    check_against_reference(
        images.contiguous(memory_format=torch.channels_last), 16, 5.0, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    grey = images[:, :1] * 0.5 + 0.4  # one channel, already in [0, 1]-ish
    check_against_reference(grey, 32, 5.5, bins=1024)


@pytest.mark.gpu
def test_bfloat16_pixels_on_a_gpu(photos):
    """bf16 is garbage in the interpreter (docs/design.md section 6): compiled kernels only."""
    check_against_reference(photos[:3].bfloat16(), 32, 6.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@pytest.mark.parametrize("patch, size", [(14, (28, 42)), (80, (80, 160))])
def test_patches_that_are_not_a_whole_number_of_slices(patch, size):
    """14 px: 196 pixels in a 256-lane slice; 80 px: 6400 pixels over two 4096-lane slices in the
    interpreter (1024 on a GPU). The padding lanes must not count."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, *size, device=DEVICE)
    check_against_reference(images, patch, 5.0)


def test_known_entropies():
    """A constant cell (0 bits), two bins half and half (1 bit), pixels outside [0, 1] (clamped into
    the end bins: 1 bit)."""
    half = (8, 16)
    cells = [
        torch.full((16, 16), 0.3),
        torch.cat([torch.full(half, 0.25), torch.full(half, 0.75)]),
        torch.cat([torch.full(half, -3.0), torch.full(half, 7.0)]),
    ]
    images = torch.cat(cells, 1)[None, None].to(DEVICE)  # [1, 1, 16, 48], pixels in [0, 1] but the last cell
    out, _ = check_against_reference(images, 16, 0.5, bins=256)
    assert out.entropy[0].tolist() == [0.0, 1.0, 1.0] and out.fine[0].tolist() == [False, True, True]
    levels = entropy_bins_reference(images, bins=256)[0, :, 32:]
    assert levels.unique().tolist() == [0, 255]


def test_pixels_on_the_bin_edges_get_the_reference_bins():
    """Grey pixels within 3 ulp of every bin edge, as normalised RGB: the kernel must un-normalise,
    sum the luma and floor with the reference's roundings: summing the luma of these 1785 grey values
    in another order moves 66 of them to the neighbouring bin (measured in torch), and each moved
    pixel shifts its cell's entropy by ~3e-3 bit; a fused multiply-add does the same on a GPU."""
    luma = torch.tensor(ENTROPY_LUMA)
    x = torch.arange(1, 256, dtype=torch.float32) / 255 / luma.sum()  # grey on the 255 edges of 256 bins
    around = [x]
    for _ in range(3):
        around = [torch.nextafter(around[0], around[0] - 1), *around, torch.nextafter(around[-1], around[-1] + 1)]
    grey = torch.cat([torch.stack(around).T.flatten(), torch.full((7,), 0.5)])  # 1792 pixels: 7 cells of 16 px
    cells = grey.reshape(7, 16, 16).permute(1, 0, 2).reshape(16, 112)
    images = normalize(cells.expand(1, 3, 16, 112)).to(DEVICE)
    check_against_reference(images, 16, 6.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, bins=256)


def test_the_op_traces_under_torch_compile_and_passes_opcheck():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 64, device=DEVICE)
    op = torch.ops.msvit.patch_entropy.default
    torch.library.opcheck(op, (images, 32, [0.0] * 3, [1.0] * 3, 64, 4.0, "apt"))

    def entropy_and_fine(x):
        return patch_entropy(x, 32, bins=64, threshold=4.0)

    compiled = torch.compile(entropy_and_fine, backend="aot_eager", fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled(images), entropy_and_fine(images)))


def test_no_host_reads_and_no_autograd(photos):
    images = photos[:1].clone().requires_grad_()
    with count_host_reads() as reads:
        out = patch_entropy(images, 32, mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=5.5)
    assert reads.count == 0, reads.report()
    assert not out.entropy.requires_grad and out.fine is not None
    assert patch_entropy(images, 32).fine is None  # no threshold, no decisions


@pytest.mark.parametrize(
    "images, kwargs, error, match",
    [
        (torch.zeros(1, 2, 32, 32), {}, ValueError, "RGB .3 channels. or grey"),
        (torch.zeros(1, 3, 48, 32), {}, ValueError, "multiple of the patch size 32"),
        (torch.zeros(1, 3, 32, 32), {"bins": 300}, ValueError, "power of two from 2 to 1024"),
        (torch.zeros(1, 3, 32, 32), {"bins": 2048}, ValueError, "power of two from 2 to 1024"),
        (torch.zeros(1, 3, 32, 32), {"mean": (0.5,)}, ValueError, "mean must hold 3 finite numbers"),
        (torch.zeros(1, 3, 32, 32), {"std": (1.0, 1.0, math.nan)}, ValueError, "std must hold 3 finite"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), {}, TypeError, "float tensor"),
    ],
)
def test_bad_input_is_refused_clearly(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        patch_entropy(images.to(DEVICE), 32, **kwargs)
