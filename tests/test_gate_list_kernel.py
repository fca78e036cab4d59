"""The fused learned gate over a list of images of different sizes (issue 27 item 2,
docs/design.md section 11): the gate kernel's LIST mode (``gate_kernel.list_fused_gate``), one launch
per layer for the whole list, equals the torch list path (``reference.flat_cells`` + one MLP call)
forward and backward, in the interpreter, on odd sizes, border cells and a 1:5 image, two and
three scales; its launches do not grow with the number of images and it reads nothing back.
"""

import pytest
import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit.models.gate import MixedScaleGate
from msvit.models.list_gates import list_decision
from msvit.models.tree_gate import TreeGate
from msvit_kernels.gate_kernel import list_fused_gate
from msvit_kernels.reference import flat_cells, gate_mlp_patches
from msvit_kernels.tree_batch import TreeBatch

from helpers import counted_launches, needs_triton, redraw_parameters, tiny_vit

pytestmark = needs_triton

P, R = 4, 2  # a 4 px fine patch keeps the interpreter fast
# odd grids, border cells (not whole 8 / 16 px regions), 1:5
SIZES = {2: [(36, 20), (8, 40), (28, 28)], 3: [(36, 20), (16, 80), (48, 44)]}


def gate_of(scales: int, kernels: str, hidden: int = 106):
    """A learned gate built at a grid none of the images has (every position table is resampled),
    with re-drawn parameters (logits near 0: both decisions occur)."""
    torch.manual_seed(0)
    if scales == 2:
        gate = MixedScaleGate(P * R, (3, 3), hidden=hidden)
    else:
        gate = TreeGate.learned(P, R, scales, (8, 8), hidden=hidden)
    gate = redraw_parameters(gate, seed=2)
    gate.kernels = kernels
    return gate


def images_of(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


def batch_of(sizes, scales):
    return TreeBatch.of([(h // P, w // P) for h, w in sizes], R, scales)


def decide(gate, images, scales, sample, budget=None, seed=5):
    torch.manual_seed(seed)  # the same noise on both paths: one draw per scale, in the same order
    return list_decision(gate, images, batch_of([im.shape[1:] for im in images], scales), P, sample, budget)


def gradients(gate, decision, seed=3):
    """Every gate parameter's gradient (pos_embed included) of a loss on the logits and on the
    straight-through values (the soft sample's path)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(decision.logits.shape, generator=generator)
    loss = (decision.logits * weights).sum() + (decision.st * weights.flip(0)).sum()
    names, params = zip(*gate.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("scales", [2, 3])
@pytest.mark.parametrize("count", [1, 3])
def test_list_kernel_equals_the_torch_list_path_in_training(scales, count):
    """Sampled decisions (same noise): logits, soft, hard and st equal; every parameter's gradient
    (each level's fc1..fc4 weights and biases, its position table) equal."""
    images = images_of(SIZES[scales][-count:])
    fused, torch_gate = gate_of(scales, "triton"), gate_of(scales, "reference")
    got, expected = decide(fused, images, scales, sample=True), decide(torch_gate, images, scales, sample=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.soft, expected.soft, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.hard, expected.hard) and torch.equal(got.st, expected.st)
    assert got.hard.any() and not got.hard.all()  # both decisions occur: the comparison sees each
    got_grads, expected_grads = gradients(fused, got), gradients(torch_gate, expected)
    assert len(got_grads) == 9 * (scales - 1)
    for name, grad in got_grads.items():
        scale = expected_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("scales", [2, 3])
@pytest.mark.parametrize("budget", [None, 0.4])
def test_list_kernel_equals_the_torch_list_path_in_eval(scales, budget):
    images = images_of(SIZES[scales])
    with torch.no_grad():
        got = decide(gate_of(scales, "triton"), images, scales, sample=False, budget=budget)
        expected = decide(gate_of(scales, "reference"), images, scales, sample=False, budget=budget)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.hard, expected.hard)


@pytest.mark.parametrize("with_noise", [False, True])
def test_the_op_equals_the_mlp_on_gathered_cells_forward_and_backward(with_noise):
    """``list_fused_gate`` on one scale of a list == ``gate_mlp_patches(flat_cells(...))`` (a narrow
    hidden width, padded in the kernel), gradients of the nine tensors included."""
    sizes = SIZES[3]
    batch = batch_of(sizes, 3)
    pixels = torch.cat([image.reshape(-1) for image in images_of(sizes)])
    node_pixels, starts = batch.node_pixels(P, 3), batch.scale_starts
    nodes = range(starts[2], starts[3])  # the 16 px regions
    gate = gate_of(2, "reference", hidden=20)
    size = P * R * R
    generator = torch.Generator().manual_seed(4)
    w1 = torch.randn(20, 3 * size * size, generator=generator) * 0.05
    pos = torch.randn(len(nodes), 20, generator=generator) * 0.3
    weights = [
        w1,
        gate.fc1.bias,
        pos,
        gate.fc2.weight,
        gate.fc2.bias,
        gate.fc3.weight,
        gate.fc3.bias,
        gate.fc4.weight,
        gate.fc4.bias,
    ]
    weights = [w.detach().clone().requires_grad_() for w in weights]
    noise = torch.randn(len(nodes), generator=generator) if with_noise else None
    out = list_fused_gate(pixels, node_pixels, nodes, size, P, *weights, noise=noise, temperature=0.3)
    cells = flat_cells(pixels, node_pixels, torch.arange(nodes.start, nodes.stop), size, 3, P).flatten(1)
    logits = gate_mlp_patches(cells, *weights)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    loss, expected_loss = out.logits.square().sum(), logits.square().sum()
    if with_noise:
        soft = torch.sigmoid((logits + noise) / 0.3)
        torch.testing.assert_close(out.soft, soft, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.hard, soft > 0.5)
        loss, expected_loss = loss + out.soft.sum(), expected_loss + soft.sum()
    for got, expected in zip(torch.autograd.grad(loss, weights), torch.autograd.grad(expected_loss, weights)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scales", [2, 3])
def test_gate_launches_do_not_grow_with_the_number_of_images(monkeypatch, scales):
    """Three launches (one per hidden layer) per gated scale, for 1 image as for 4."""
    images = images_of(SIZES[scales] + SIZES[scales][:1])
    gate = gate_of(scales, "triton")
    names = counted_launches(monkeypatch)
    for count in (1, 4):
        names.clear()
        with torch.no_grad():
            decide(gate, images[:count], scales, sample=True)
        assert names == ["_gate_layer_kernel"] * 3 * (scales - 1), (count, names)


@pytest.mark.parametrize("sample, budget", [(False, 0.5), (True, None)])
def test_no_host_read(sample, budget):
    """Eval with a budget and a training sample: the list gate reads nothing back."""
    images = images_of(SIZES[3])
    gate = gate_of(3, "triton")
    with torch.no_grad():
        decide(gate, images, 3, sample, budget)  # builds the layout maps (host metadata) once
        with count_host_reads() as reads:
            decide(gate, images, 3, sample, budget)
    assert reads.count == 0, reads.report()


def test_bad_arguments_are_refused():
    batch = batch_of([(16, 24)], 2)
    pixels, node_pixels = torch.rand(3 * 16 * 24), batch.node_pixels(P, 3)
    nodes = range(batch.scale_starts[1], batch.scale_starts[2])
    gate = gate_of(2, "triton", hidden=20)
    weights = [w.detach() for w in gate._weights_at(torch.zeros(len(nodes), 20))]
    with pytest.raises(TypeError, match="flat float pixel buffer"):
        list_fused_gate(pixels.view(3, -1), node_pixels, nodes, 8, P, *weights)
    with pytest.raises(ValueError, match="node_pixels must be int64"):
        list_fused_gate(pixels, node_pixels.int(), nodes, 8, P, *weights)
    with pytest.raises(ValueError, match="nodes must be a range"):
        list_fused_gate(pixels, node_pixels, range(nodes.start, nodes.stop + 1), 8, P, *weights)
    with pytest.raises(ValueError, match=r"pos must be the flat position table \[6, hidden\]"):
        list_fused_gate(pixels, node_pixels, nodes, 8, P, *weights[:2], torch.zeros(5, 20), *weights[3:])
    with pytest.raises(ValueError, match=r"noise must be \[6\]"):
        list_fused_gate(pixels, node_pixels, nodes, 8, P, *weights, noise=torch.zeros(5))
    with pytest.raises(TypeError, match="same dtype"):
        list_fused_gate(pixels.double(), node_pixels, nodes, 8, P, *weights)


def test_the_list_op_traces_under_torch_compile():
    """One graph (fullgraph) through the op's fake, forward and backward equal to eager."""
    sizes = SIZES[2]
    batch = batch_of(sizes, 2)
    pixels = torch.cat([image.reshape(-1) for image in images_of(sizes)])
    node_pixels, starts = batch.node_pixels(P, 3), batch.scale_starts
    nodes = range(starts[1], starts[2])
    gate = gate_of(2, "triton", hidden=20)
    weights = [w.detach().clone().requires_grad_() for w in gate._weights_at(torch.randn(len(nodes), 20))]
    noise = torch.randn(len(nodes))

    def loss(flat):
        out = list_fused_gate(flat, node_pixels, nodes, P * R, P, *weights, noise=noise)
        return out.logits.square().sum() + out.soft.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got, expected = compiled(pixels), loss(pixels)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, weights), torch.autograd.grad(expected, weights)):
        torch.testing.assert_close(a, b)


def test_a_training_forward_of_a_list_equals_the_torch_gate():
    """``MSViT`` in training on a list, its gate's kernels='triton' (the fused LIST gate) ==
    kernels='reference' with the same seed: logits, the gate's sample, and every gate parameter's
    gradient through the straight-through path of the tokens."""
    vit = tiny_vit(img_size=32, patch_size=P, embed_dim=24, depth=1, num_heads=2, num_classes=3)
    model = msvit.from_timm(redraw_parameters(vit), scales=[P, P * R, P * R * R]).train()
    redraw_parameters(model.gate, seed=2)
    images = images_of(SIZES[3])
    results = []
    model.kernels = "reference"  # the tokenizer and attention in torch: the gate is the only difference
    for kernels in ("triton", "reference"):
        model.gate.kernels = kernels
        torch.manual_seed(7)
        out = model(images, return_gate=True)
        names, params = zip(*model.gate.named_parameters())
        results.append((out, torch.autograd.grad(out.logits.square().sum(), params)))
    (got, got_grads), (expected, expected_grads) = results
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.gate.hard, expected.gate.hard)
    torch.testing.assert_close(got.gate.soft, expected.gate.soft, rtol=1e-5, atol=1e-6)
    for name, grad, other in zip(names, got_grads, expected_grads):  # small (a saturated sample): relative to each
        assert other.abs().sum() > 0, name
        torch.testing.assert_close(grad, other, rtol=1e-4, atol=1e-4 * other.abs().max().item(), msg=name)
