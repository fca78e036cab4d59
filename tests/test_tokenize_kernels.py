"""The fused tokenizer (gate, index, gather-embed-pack kernels) against its references, and a whole
MSViT with kernels="triton" against kernels="reference".

On a CPU-only machine the kernels run in the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``); on a GPU the same tests run them compiled. fp32 kernels use exact fp32
products, so they meet the fp32 rule (<= 1e-5 relative to a float64 oracle). GPU-only tests cover
fp16/bf16 with flash-attn's rule: kernel error <= 2x the error of the reference run in that dtype.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import msvit
from msvit.models.gate import MixedScaleGate, gumbel_sigmoid
from msvit_kernels import _triton, dispatch, fused_gate, gather_embed_pack, mixed_scale_index, triton_mixed_scale_index
from msvit_kernels.reference import gate_mlp_reference, pack_reference

from helpers import DEVICE, needs_triton, rel_err, tiny_vit

pytestmark = needs_triton


def make_mask(kind: str, batch: int, n_regions: int, seed: int = 0) -> torch.Tensor:
    if kind == "fine":
        return torch.ones(batch, n_regions, dtype=torch.bool, device=DEVICE)
    if kind == "coarse":
        return torch.zeros(batch, n_regions, dtype=torch.bool, device=DEVICE)
    return (torch.rand(batch, n_regions, generator=torch.Generator().manual_seed(seed)) < 0.4).to(DEVICE)


def grads(output, upstream, tensors):
    return torch.autograd.grad((output * upstream).sum(), tensors, allow_unused=True)


# ---------------------------------------------------------------------------------------------- gate


def gate_tensors(region, grid, hidden, dtype=torch.float64, chans=3):
    torch.manual_seed(0)
    gate = MixedScaleGate(region, grid, in_chans=chans, hidden=hidden, init_logit=0.5).to(DEVICE, dtype)
    torch.nn.init.normal_(gate.fc4.weight, std=0.3)  # logits spread around 0 so hard decisions vary
    return [
        t.detach().clone().requires_grad_() for t in gate._weights(torch.empty(1, chans, *(g * region for g in grid)))
    ]


@pytest.mark.parametrize(
    "batch, size, region, hidden, chans",
    [
        (1, (32, 48), 16, 106, 3),
        (3, (96, 160), 16, 20, 3),
        (2, (56, 28), 28, 33, 1),
    ],
)
@pytest.mark.parametrize("sample", [False, True])
def test_gate_kernel_matches_reference(batch, size, region, hidden, chans, sample):
    grid = (size[0] // region, size[1] // region)
    oracle = gate_tensors(region, grid, hidden, chans=chans)
    weights = [t.detach().float().requires_grad_() for t in oracle]
    images = torch.randn(batch, chans, *size, device=DEVICE, dtype=torch.float64)
    noise = torch.logit(torch.rand(batch, grid[0] * grid[1], device=DEVICE)) if sample else None
    out = fused_gate(images.float(), region, *weights, noise=noise, temperature=0.3)
    ref = gate_mlp_reference(images, region, *oracle)
    assert out.logits.shape == ref.shape and rel_err(out.logits, ref) <= 1e-5
    upstream = torch.randn(ref.shape, device=DEVICE, dtype=torch.float64)
    if sample:
        soft, hard, _ = gumbel_sigmoid(out.logits.detach(), 0.3, noise)
        assert torch.equal(out.hard, hard) and rel_err(out.soft, soft) <= 1e-6
        ref_soft = torch.sigmoid((ref + noise) / 0.3)
        got = grads(out.logits + out.soft, upstream.float(), weights)
        expected = grads(ref + ref_soft, upstream, oracle)
    else:
        assert out.soft is None and out.hard is None
        got, expected = grads(out.logits, upstream.float(), weights), grads(ref, upstream, oracle)
    for name, g, e in zip(["w1", "b1", "pos", "w2", "b2", "w3", "b3", "w4", "b4"], got, expected):
        assert rel_err(g, e) <= 1e-5, name


# ---------------------------------------------------------------------------------------------- index


@pytest.mark.parametrize(
    "batch, grid, ratio, prefix",
    [(3, (6, 10), 2, 1), (1, (7, 9), 2, 0), (2, (3, 5), 3, 2), (5, (1, 1), 2, 1), (2, (4, 3), 1, 3)],
)
@pytest.mark.parametrize("kind", ["fine", "coarse", "random"])
def test_index_kernel_equals_mixed_scale_index(batch, grid, ratio, prefix, kind):
    mask = make_mask(kind, batch, grid[0] * grid[1], seed=batch)
    got = triton_mixed_scale_index(mask, grid, ratio, prefix)
    expected = mixed_scale_index(mask, grid, ratio, prefix)
    for field, value in expected._asdict().items():
        other = getattr(got, field)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value), field
        else:
            assert other == value, field


def test_index_kernel_reads_a_strided_mask():
    mask = make_mask("random", 6, 60, seed=3)[::2]  # every other image: a strided view
    assert not mask.is_contiguous()
    got, expected = triton_mixed_scale_index(mask, (6, 10), 2, 1), mixed_scale_index(mask, (6, 10), 2, 1)
    assert torch.equal(got.rows, expected.rows) and torch.equal(got.fine_to_row, expected.fine_to_row)


# ---------------------------------------------------------------------------------------------- pack


def pack_inputs(batch, size, patch, ratio, prefix, dim, kind, bias=True, pos=True, st=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(batch + dim)
    grid = (size[0] // (patch * ratio), size[1] // (patch * ratio))
    mask = make_mask(kind, batch, grid[0] * grid[1], seed=dim)
    index = mixed_scale_index(mask, grid, ratio, prefix)
    n_fine = grid[0] * grid[1] * ratio * ratio

    def param(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()

    tensors = dict(
        weight=param(dim, 3 * patch * patch),
        bias=param(dim) if bias else None,
        pos_table=param(n_fine + grid[0] * grid[1], dim) if pos else None,
        st=mask.to(dtype).requires_grad_() if st else None,
        prefix=param(prefix, dim) if prefix else None,
    )
    images = torch.randn(batch, 3, *size, generator=gen).to(DEVICE, dtype)
    return images, index, tensors


@pytest.mark.parametrize(
    "batch, size, patch, ratio, prefix, dim",
    [
        (3, (96, 160), 8, 2, 1, 48),
        (1, (42, 56), 7, 2, 0, 20),
        (2, (48, 72), 8, 3, 2, 33),
        (2, (28, 28), 14, 1, 1, 16),
    ],
)
@pytest.mark.parametrize("kind", ["fine", "coarse", "random"])
def test_pack_kernel_matches_reference(batch, size, patch, ratio, prefix, dim, kind):
    images, index, oracle = pack_inputs(batch, size, patch, ratio, prefix, dim, kind)
    tensors = {k: v.detach().float().requires_grad_() if v is not None else None for k, v in oracle.items()}
    out = gather_embed_pack(images.float(), index, **tensors, fine_patch=patch, ratio=ratio)
    ref = pack_reference(images, index, **oracle, fine_patch=patch, ratio=ratio)
    assert out.shape == ref.shape and out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    upstream = torch.randn(ref.shape, device=DEVICE, dtype=torch.float64)
    names = [k for k, v in oracle.items() if v is not None]
    got = grads(out, upstream.float(), [tensors[k] for k in names])
    expected = grads(ref, upstream, [oracle[k] for k in names])
    for name, g, e in zip(names, got, expected):
        assert rel_err(g, e) <= 1e-5, name


def test_pack_kernel_optional_inputs_and_strided_images():
    images, index, oracle = pack_inputs(2, (64, 96), 8, 2, 0, 24, "random", bias=False, pos=False, st=False)
    tensors = {k: v.detach().float() if v is not None else None for k, v in oracle.items()}
    strided = images.float().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    out = gather_embed_pack(strided, index, **tensors, fine_patch=8, ratio=2)
    assert rel_err(out, pack_reference(images, index, **oracle, fine_patch=8, ratio=2)) <= 1e-5
    with pytest.raises(TypeError, match="same dtype"):
        gather_embed_pack(images, index, **tensors, fine_patch=8, ratio=2)


# ---------------------------------------------------------------------------------------------- model


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the model layer's calls into the three fused ops (so a silent torch fallback fails)."""
    import msvit.models.gate as gate_mod
    import msvit.models.tokenizer as tokenizer_mod

    calls = {}
    for module, name in [
        (gate_mod, "fused_gate"),
        (tokenizer_mod, "triton_mixed_scale_index"),
        (tokenizer_mod, "gather_embed_pack"),
    ]:

        def spy(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture(scope="module")
def model_pair():
    """(torch, triton) MSViTs with the same weights: tiny ViT, patch 8 / coarse 16, 96x160 images."""
    torch_model = msvit.from_timm(tiny_vit(img_size=(96, 160)), kernels="reference", init_logit=0.0).to(DEVICE)
    torch.nn.init.normal_(torch_model.gate.fc4.weight, std=0.3)
    triton_model = copy.deepcopy(torch_model)
    triton_model.kernels = "triton"
    return torch_model, triton_model


def assert_same_gradients(reference, model):
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        assert (p_ref.grad is None) == (p.grad is None), name
        if p_ref.grad is not None:
            assert rel_err(p.grad, p_ref.grad) <= 1e-5, name


@pytest.mark.parametrize("batch", [1, 3])
def test_model_logits_match_torch_kernels(model_pair, batch, fused_calls):
    torch_model, triton_model = (m.eval() for m in model_pair)
    images = torch.randn(batch, 3, 96, 160, device=DEVICE)
    with torch.no_grad():
        gate_mask = triton_model.gate_mask(images)
        assert torch.equal(gate_mask, torch_model.gate_mask(images)) and 0 < gate_mask.sum() < gate_mask.numel()
        for kind in ["fine", "coarse", "random", None]:  # None: the gate's own decisions
            mask = make_mask(kind, batch, 60, seed=batch) if kind else None
            assert rel_err(triton_model(images, mask=mask), torch_model(images, mask=mask)) <= 1e-5, kind
    assert fused_calls == {"fused_gate": 2, "triton_mixed_scale_index": 4, "gather_embed_pack": 4}


@pytest.mark.parametrize("batch", [1, 3])
def test_model_gradients_match_torch_kernels_with_a_given_mask(model_pair, batch):
    for model in model_pair:
        model.train().zero_grad(set_to_none=True)
    images = torch.randn(batch, 3, 96, 160, device=DEVICE)
    mask = make_mask("random", batch, 60, seed=7)
    for model in model_pair:
        model(images, mask=mask).square().sum().backward()
    assert_same_gradients(*model_pair)


def test_model_gradients_match_torch_kernels_with_the_sampling_gate(model_pair, fused_calls):
    """Seeded training steps: both paths draw the same Gumbel noise, so the same masks, and the
    gate's gradients arrive through the straight-through values and the soft outputs alike."""
    outputs = []
    images = torch.randn(3, 3, 96, 160, device=DEVICE)
    for model in model_pair:
        model.train().zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = model(images, return_gate=True)
        (out.logits.square().sum() + out.gate.soft.mean()).backward()
        outputs.append(out)
    assert torch.equal(outputs[0].gate.hard, outputs[1].gate.hard)
    assert 0 < outputs[0].gate.hard.sum() < outputs[0].gate.hard.numel()
    assert rel_err(outputs[1].logits, outputs[0].logits) <= 1e-5
    assert_same_gradients(*model_pair)
    assert model_pair[1].gate.fc1.weight.grad.abs().sum() > 0
    assert fused_calls == {"fused_gate": 1, "triton_mixed_scale_index": 1, "gather_embed_pack": 1}


@pytest.mark.parametrize(
    "variant, size, coarse",
    [
        (dict(init_values=0.1, reg_tokens=2), (96, 160), 16),
        (dict(class_token=False, global_pool="avg", pos_embed="none"), (96, 160), 16),
        (dict(no_embed_class=True), (96, 160), 16),
        (dict(), (48, 72), 24),
    ],
)
def test_model_variants_match_torch_kernels(variant, size, coarse, fused_calls):
    """Registers (P = 2), no prefix and no position embedding, prefix without position, factor 3."""
    reference = msvit.from_timm(tiny_vit(img_size=size, **variant), kernels="reference", coarse_patch_size=coarse)
    model = copy.deepcopy(reference)
    model.kernels = "triton"
    images = torch.randn(3, 3, *size, device=DEVICE)
    mask = make_mask("random", 3, (size[0] // coarse) * (size[1] // coarse), seed=5)
    for m in (reference.to(DEVICE).train(), model.to(DEVICE).train()):
        m(images, mask=mask).square().sum().backward()
    assert fused_calls["gather_embed_pack"] == 1
    assert_same_gradients(reference, model)


# ---------------------------------------------------------------------------------------------- dispatch


def test_kernel_choice_dispatch_and_fallbacks(monkeypatch):
    images = torch.randn(1, 3, 32, 32, device=DEVICE)
    assert dispatch.use_triton("auto", images) == (DEVICE.type == "cuda")
    assert dispatch.use_triton("triton", images) and not dispatch.use_triton("reference", images)
    with pytest.warns(DeprecationWarning, match="kernels 'torch' is deprecated, use 'reference'"):
        assert not dispatch.use_triton("torch", images)
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        dispatch.use_triton("cuda", images)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        dispatch.use_triton("triton", images.double())
    assert not dispatch.use_triton("auto", images.double())
    with pytest.warns(UserWarning, match="embed_norm"):
        model = msvit.from_timm(tiny_vit(img_size=32), kernels="triton").to(DEVICE)
        model.tokenizer.embed_norm = torch.nn.LayerNorm(48).to(DEVICE)
        model.eval()(images, mask=make_mask("random", 1, 4))
    with pytest.warns(UserWarning, match="no gradient to pixels"):
        model.tokenizer.embed_norm = torch.nn.Identity()
        model(images.requires_grad_(), mask=make_mask("random", 1, 4))
    monkeypatch.setattr(_triton, "triton", None)
    with pytest.raises(RuntimeError, match="needs triton"):
        msvit.from_timm(tiny_vit(img_size=32), kernels="triton")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    model = msvit.from_timm(tiny_vit(img_size=32), kernels="triton").eval()
    with pytest.raises(RuntimeError, match="runs on CUDA GPUs.*TRITON_INTERPRET=1"):
        model(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("patch", [8, 14, 16])
def test_gpu_low_precision_kernels(dtype, patch):
    """Compiled kernels in fp16/bf16: error vs the float64 oracle <= 2x that of the reference in dtype."""
    images, index, oracle = pack_inputs(4, (patch * 2 * 7, patch * 2 * 5), patch, 2, 1, 384, "random")

    def pack(fn, d):
        tensors = {k: v.detach().to(d) if v is not None else None for k, v in oracle.items()}
        return fn(images.to(d), index, **tensors, fine_patch=patch, ratio=2)

    ref = pack(pack_reference, torch.float64)
    assert rel_err(pack(gather_embed_pack, dtype), ref) <= 2 * rel_err(pack(pack_reference, dtype), ref) + 1e-6
    gate = gate_tensors(patch * 2, (7, 5), 106)

    def gate_logits(fn, d):
        return fn(images.to(d), patch * 2, *(t.detach().to(d) for t in gate))

    ref = gate_logits(gate_mlp_reference, torch.float64)
    got = gate_logits(fused_gate, dtype).logits
    assert rel_err(got, ref) <= 2 * rel_err(gate_logits(gate_mlp_reference, dtype), ref) + 1e-6


@pytest.mark.gpu
def test_gpu_auto_uses_the_fused_path_and_trains_under_autocast(monkeypatch):
    import msvit.models.tokenizer as tokenizer_mod

    calls = []
    monkeypatch.setattr(
        tokenizer_mod, "gather_embed_pack", lambda *a, **k: calls.append(1) or gather_embed_pack(*a, **k)
    )
    model = msvit.from_timm(tiny_vit(img_size=(96, 160)), init_logit=0.0).cuda().train()
    reference = copy.deepcopy(model)
    reference.kernels = "reference"
    images = torch.randn(8, 3, 96, 160, device="cuda")
    mask = make_mask("random", 8, 60)
    for m in (model, reference):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(images, mask=mask).float(), torch.zeros(8, dtype=torch.long, device="cuda"))
        loss.backward()
    assert calls, "kernels='auto' on CUDA did not run the fused tokenizer"
    for name in ("embed.weight", "embed.bias", "pos_embed", "prefix_tokens"):
        got = model.tokenizer.get_parameter(name).grad
        assert rel_err(got, reference.tokenizer.get_parameter(name).grad) <= 0.05, name
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, return_gate=True)
        (out.logits.float().square().mean() + out.gate.soft.float().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate.parameters())
