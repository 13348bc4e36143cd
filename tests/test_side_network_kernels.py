"""The whole side network with the fused (Triton) and efficient kernels vs the reference ops, on the kernel
tests' device (CUDA when there is a GPU, else CPU with the Triton interpreter)."""
import copy

import pytest
import torch

from unipt_scale.config import UniPTConfig
from unipt_scale.side_network import UniPTFeatureMapSideNetwork, UniPTSideNetwork

from kernel_cases import DEV

pytestmark = pytest.mark.usefixtures("poison_empty")

VARIANTS = {
    "vse_infty": dict(),
    "clip4clip": dict(down_activation="relu", down_norm="none", anchor="separate", anchor_pooling="first",
                      add_identity=False, add_target_token=True, output="direct"),
    "decoder_last": dict(anchor_pooling="last", add_target_token=True, residual=False, zero_init_up=False),
}


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _with_backend(net, backend):
    other = copy.deepcopy(net)
    other.cfg = copy.deepcopy(net.cfg)
    other.cfg.kernels = backend
    return other


def _compare(nets, run, dtype, tol):
    outs, grads = {}, {}
    for backend, net in nets.items():
        y = run(net)
        outs[backend] = y
        loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype, device=y.device)).square().sum()
        grads[backend] = dict(zip([n for n, _ in net.named_parameters()],
                                  torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)))
    ref = outs.pop("reference")
    ref_g = grads.pop("reference")
    for backend, y in outs.items():
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol, msg=lambda m: f"{backend} output: {m}")
        for name, g in grads[backend].items():
            r = ref_g[name]
            if r is None:
                assert g is None or (g == 0).all(), f"{backend}: {name}"
                continue
            torch.testing.assert_close(g, r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()),
                                       msg=lambda m: f"{backend} grad {name}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sizes", [(12, 12, 12), (5, 9, 12)])
def test_token_side_network_backends_agree(variant, sizes, dtype, tol):
    cfg = UniPTConfig(mapping_dim=8, kernels="reference", **VARIANTS[variant])
    net = _randomise(UniPTSideNetwork(cfg, list(sizes), 12)).to(DEV, dtype)
    nets = {b: _with_backend(net, b) for b in ("reference", "triton", "efficient")}
    B, N = 3, 11
    hs = [torch.randn(B, N, D, dtype=dtype).to(DEV) for D in sizes]  # frozen backbone: no grad
    final = torch.randn(B, N, 12, dtype=dtype).to(DEV)
    mask = torch.zeros(B, N, dtype=torch.long, device=DEV)
    for b, n in enumerate((11, 6, 1)):
        mask[b, :n] = 1
    _compare(nets, lambda m: m(hs, mask, final), dtype, tol)


def test_token_side_network_without_mask_and_auto():
    cfg = UniPTConfig(mapping_dim=8, kernels="reference")
    net = _randomise(UniPTSideNetwork(cfg, [10, 10], 10)).to(DEV, torch.float64)
    nets = {b: _with_backend(net, b) for b in ("reference", "auto", "triton")}
    hs = [torch.randn(2, 7, 10, dtype=torch.float64).to(DEV) for _ in range(2)]
    final = torch.randn(2, 7, 10, dtype=torch.float64).to(DEV)
    _compare(nets, lambda m: m(hs, None, final), torch.float64, 1e-9)


@pytest.mark.parametrize("add_identity", [True, False])
def test_feature_map_side_network_backends_agree(add_identity):
    cfg = UniPTConfig(mapping_dim=6, kernels="reference", add_identity=add_identity)
    net = _randomise(UniPTFeatureMapSideNetwork(cfg, [4, 6, 8], [(8, 8), (4, 4), (2, 2)])).to(DEV, torch.float64)
    net = net.eval()
    nets = {b: _with_backend(net, b) for b in ("reference", "triton", "efficient")}
    stages = [torch.randn(2, c, s, s, dtype=torch.float64).to(DEV) for c, s in ((4, 8), (6, 4), (8, 2))]
    _compare(nets, lambda m: m(stages), torch.float64, 1e-9)


@pytest.mark.parametrize("backend", ["efficient", "triton"])
def test_bf16_backbone_states_feed_an_fp32_side_network(backend):
    """A bf16 backbone's states go in uncast; the result matches the reference on fp32 copies."""
    from unipt_scale.config import UniPTConfig
    from unipt_scale.side_network import UniPTSideNetwork

    torch.manual_seed(0)
    hs = [torch.randn(2, 5, 16).bfloat16().to(DEV) for _ in range(3)]
    final = hs[-1]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device=DEV)
    nets = {}
    for be in ("reference", backend):
        torch.manual_seed(1)
        nets[be] = UniPTSideNetwork(UniPTConfig(mapping_dim=8, zero_init_up=False, kernels=be), [16, 16, 16],
                                    16).to(DEV)
    want = nets["reference"](hs, mask, final)
    got = nets[backend](hs, mask, final)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
