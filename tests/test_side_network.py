"""The side networks against the paper's equations written out plainly, one sample and one layer at a time."""
import pytest
import torch
import torch.nn.functional as F

from unipt_scale.config import ConfigError, UniPTConfig
from unipt_scale.side_network import (UniPTFeatureMapSideNetwork, UniPTSideNetwork, pool_tokens, resolve_layers,
                                      token_positions)


def _randomise(module):
    """Non-trivial values everywhere (zero-init up-projection and unit norms would hide mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def l1norm(x, eps=1e-6):
    return x / x.abs().sum(-1, keepdim=True).clamp(min=eps)


def paper_token_unipt(net: UniPTSideNetwork, hs, mask, final, alphas=None):
    """UniPT for one batch, written from the equations: every sample, every layer, separately."""
    cfg = net.cfg
    outs = []
    for b in range(hs[0].shape[0]):
        real = mask[b].bool()
        n_real = int(real.sum())
        T = []
        for i, h in enumerate(hs):
            x = h[b]
            if cfg.down_activation == "relu":
                x = torch.relu(x)
            t = x @ net.down[i].weight.T + net.down[i].bias
            if cfg.down_norm == "layernorm":
                t = F.layer_norm(t, t.shape[-1:], net.down_norms[i].weight, net.down_norms[i].bias,
                                 net.down_norms[i].eps)
            T.append(t)
        if cfg.anchor == "last_layer":
            A, targets = T[-1], T[:-1]
        else:
            x = final[b]
            A = (torch.relu(x) if cfg.down_activation == "relu" else x) @ net.anchor_proj.weight.T + net.anchor_proj.bias
            targets = T
        idx = real.nonzero().flatten()
        if cfg.anchor_pooling == "mean":
            a = A[real].sum(0) / max(n_real, 1)
        elif cfg.anchor_pooling == "first":
            a = A[idx[0]]
        else:
            a = A[idx[-1]]
        merged, scores = [], []
        for t in targets:
            S = A @ t.T
            S = S * real[None, :].float()  # padding keys → 0
            W = l1norm(torch.relu(S), cfg.eps)
            if cfg.add_identity:
                W = W + torch.eye(W.shape[0])
            M = W @ t
            if cfg.add_target_token:
                M = M + t[idx[-1] if cfg.anchor_pooling == "last" else idx[0]]
            merged.append(M)
            mean_t = t[real].sum(0) / max(n_real, 1)
            scores.append((a * mean_t) @ net.gate.weight[0] + net.gate.bias[0])
        alpha = torch.softmax(torch.stack(scores), 0)
        if alphas is not None:
            alphas.append(alpha)
        Mx = sum(al * m for al, m in zip(alpha, merged))
        if cfg.output == "project":
            out = A + F.layer_norm(Mx @ net.proj.weight.T + net.proj.bias, Mx.shape[-1:], net.proj_norm.weight,
                                   net.proj_norm.bias, net.proj_norm.eps)
        else:
            out = Mx
        y = torch.relu(out) @ net.up.weight.T + net.up.bias
        if cfg.residual:
            y = y + final[b]
        outs.append(y)
    return torch.stack(outs)


VARIANTS = {
    "vse_infty": dict(),
    "vse_no_residual": dict(residual=False, zero_init_up=False),
    "clip4clip": dict(down_activation="relu", down_norm="none", anchor="separate", anchor_pooling="first",
                      add_identity=False, add_target_token=True, output="direct"),
    "decoder_last": dict(anchor_pooling="last", add_target_token=True),
}


def _inputs(B=3, N=7, sizes=(12, 12, 12, 12), out=12, lengths=(7, 4, 1)):
    hs = [torch.randn(B, N, D) for D in sizes]
    final = torch.randn(B, N, out)
    mask = torch.zeros(B, N, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return hs, mask, final


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sizes", [(12, 12, 12, 12), (5, 9, 12)])
def test_token_variant_matches_equations(variant, sizes):
    cfg = UniPTConfig(mapping_dim=6, kernels="reference", **VARIANTS[variant])
    net = _randomise(UniPTSideNetwork(cfg, list(sizes), 12)).double()
    hs, mask, final = _inputs(sizes=sizes)
    hs, final = [h.double() for h in hs], final.double()
    got = net(hs, mask, final)
    want = paper_token_unipt(net, hs, mask, final)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_does_not_change_real_tokens(variant):
    """Appending padding (with garbage hidden states) changes no output of a real token."""
    cfg = UniPTConfig(mapping_dim=6, kernels="reference", **VARIANTS[variant])
    net = _randomise(UniPTSideNetwork(cfg, [10, 10, 10], 10)).double()
    hs, mask, final = _inputs(B=2, N=5, sizes=(10, 10, 10), out=10, lengths=(5, 3))
    hs, final = [h.double() for h in hs], final.double()
    pad = 4
    hs_p = [torch.cat([h, 1e3 * torch.randn(2, pad, 10, dtype=h.dtype)], 1) for h in hs]
    final_p = torch.cat([final, torch.randn(2, pad, 10, dtype=final.dtype)], 1)
    # Garbage also in the padded slots of the shorter row.
    hs_p[0][1, 3:5] = 77.0
    final_p[1, 3:5] = -5.0
    mask_p = torch.cat([mask, torch.zeros(2, pad, dtype=mask.dtype)], 1)
    hs2 = [h.clone() for h in hs]
    hs2[0][1, 3:5] = 77.0
    final2 = final.clone()
    final2[1, 3:5] = -5.0
    a = net(hs2, mask, final2)
    b = net(hs_p, mask_p, final_p)
    real = mask.bool()
    torch.testing.assert_close(b[:, :5][real], a[real], rtol=1e-10, atol=1e-10)


def test_left_padding_equals_right_padding():
    cfg = UniPTConfig(mapping_dim=6, kernels="reference", anchor_pooling="last", add_target_token=True)
    net = _randomise(UniPTSideNetwork(cfg, [8, 8], 8)).double()
    x = [torch.randn(1, 3, 8, dtype=torch.float64) for _ in range(2)]
    fin = torch.randn(1, 3, 8, dtype=torch.float64)
    right = net([torch.cat([h, torch.zeros(1, 2, 8, dtype=h.dtype)], 1) for h in x], torch.tensor([[1, 1, 1, 0, 0]]),
                torch.cat([fin, torch.zeros(1, 2, 8, dtype=fin.dtype)], 1))
    left = net([torch.cat([torch.zeros(1, 2, 8, dtype=h.dtype), h], 1) for h in x], torch.tensor([[0, 0, 1, 1, 1]]),
               torch.cat([torch.zeros(1, 2, 8, dtype=fin.dtype), fin], 1))
    torch.testing.assert_close(right[:, :3], left[:, 2:])


def test_fully_padded_row_is_finite():
    net = _randomise(UniPTSideNetwork(UniPTConfig(mapping_dim=4, kernels="reference"), [6, 6], 6))
    hs, mask, final = _inputs(B=2, N=3, sizes=(6, 6), out=6, lengths=(3, 0))
    assert torch.isfinite(net(hs, mask, final)).all()


def test_zero_init_starts_at_backbone_output():
    net = UniPTSideNetwork(UniPTConfig(mapping_dim=4), [6, 6, 6], 6)
    hs, mask, final = _inputs(B=2, N=3, sizes=(6, 6, 6), out=6, lengths=(3, 2))
    torch.testing.assert_close(net(hs, mask, final), final)


def test_gradients_reach_every_side_parameter():
    net = _randomise(UniPTSideNetwork(UniPTConfig(mapping_dim=4, kernels="reference"), [6, 6, 6], 6))
    hs, mask, final = _inputs(B=2, N=3, sizes=(6, 6, 6), out=6, lengths=(3, 2))
    net(hs, mask, final).pow(2).sum().backward()
    for name, p in net.named_parameters():
        if name == "gate.bias":  # one bias shared by every layer's score: the softmax over layers cancels it
            assert p.grad is not None and p.grad.abs().max() < 1e-6, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_confidences_sum_to_one():
    net = _randomise(UniPTSideNetwork(UniPTConfig(mapping_dim=4), [6, 6, 6, 6], 6))
    hs, mask, final = _inputs(B=3, N=4, sizes=(6, 6, 6, 6), out=6, lengths=(4, 2, 1))
    alpha = net.layer_confidences(hs, mask, final)
    assert alpha.shape == (3, 3)
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))


def test_resolve_layers():
    assert resolve_layers("all", 5) == [0, 1, 2, 3, 4]
    assert resolve_layers("every:2", 7) == [0, 2, 4, 6]
    assert resolve_layers("every:3", 7) == [0, 3, 6]
    assert resolve_layers("every:4", 7) == [2, 6]  # the final layer is always tapped
    assert resolve_layers("last:3", 7) == [4, 5, 6]
    assert resolve_layers([0, -1, 3], 7) == [0, 3, 6]
    for bad in ([9], [1, 1], "some", "every:0", 3):
        with pytest.raises(ConfigError):
            resolve_layers(bad, 7)


def test_single_layer_with_last_layer_anchor_is_refused():
    with pytest.raises(ConfigError, match="at least 2 tapped layers"):
        UniPTSideNetwork(UniPTConfig(), [8], 8)


def test_pooling_positions_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert token_positions(mask, "first", 3, 4, "cpu").tolist() == [0, 1, 3]
    assert token_positions(mask, "last", 3, 4, "cpu").tolist() == [2, 3, 0]
    x = torch.arange(24.0).reshape(3, 4, 2)
    torch.testing.assert_close(pool_tokens(x, mask, "mean")[0], x[0, :3].mean(0))
    torch.testing.assert_close(pool_tokens(x, mask, "last")[1], x[1, 3])


# ---------------------------------------------------------------- feature-map variant

def paper_feature_map_unipt(net: UniPTFeatureMapSideNetwork, stages):
    """The CNN adapter from the equations: per-patch weighting written with explicit loops over patches."""
    cfg = net.cfg
    last = stages[-1]
    B, _, hl, wl = last.shape

    def conv1x1(x, conv):
        return torch.einsum("bchw,oc->bohw", x, conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]

    def bn(x, m):
        if isinstance(m, torch.nn.Identity):
            return x
        return (x - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var[None, :, None, None] + m.eps) \
            * m.weight[None, :, None, None] + m.bias[None, :, None, None]

    A_map = bn(conv1x1(last, net.down[-1][0]), net.down[-1][1])
    A = A_map.flatten(2).transpose(1, 2)
    a = A.mean(1)
    merged, scores = [], []
    for i, s in enumerate(stages[:-1]):
        r = net.ratios[i]
        e = torch.relu(conv1x1(last, net.identity[i][0]))
        e_up = e.repeat_interleave(r, 2).repeat_interleave(r, 3)
        g = (e_up * s).sum(1)  # (B, H, W)
        target = torch.zeros(B, s.shape[1], hl, wl, dtype=s.dtype)
        for y in range(hl):
            for x in range(wl):
                patch = g[:, y * r:(y + 1) * r, x * r:(x + 1) * r].reshape(B, -1)
                w = l1norm(torch.relu(patch)) + 1.0 / (r * r)
                feats = s[:, :, y * r:(y + 1) * r, x * r:(x + 1) * r].reshape(B, s.shape[1], -1)
                target[:, :, y, x] = (feats * w[:, None, :]).sum(-1)
        T = bn(conv1x1(target, net.down[i][0]), net.down[i][1]).flatten(2).transpose(1, 2)
        W = l1norm(torch.relu(A @ T.transpose(1, 2)), cfg.eps) + torch.eye(A.shape[1])
        merged.append(W @ T)
        scores.append((a * T.mean(1)) @ net.gate.weight[0] + net.gate.bias[0])
    alpha = torch.softmax(torch.stack(scores, 1), 1)
    M = sum(alpha[:, k, None, None] * merged[k] for k in range(len(merged)))
    M_map = M.transpose(1, 2).reshape(B, -1, hl, wl)
    out = A_map + bn(conv1x1(M_map, net.proj[0]), net.proj[1])
    y = conv1x1(torch.relu(out), net.up).flatten(2).transpose(1, 2)
    if cfg.residual:
        y = y + last.flatten(2).transpose(1, 2)
    return y


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_feature_map_variant_matches_equations(norm):
    chans, sizes = [3, 5, 7, 4], [(8, 8), (4, 4), (4, 4), (2, 2)]
    cfg = UniPTConfig(mapping_dim=3, down_norm=norm, kernels="reference")
    net = _randomise(UniPTFeatureMapSideNetwork(cfg, chans, sizes)).double().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    stages = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip(chans, sizes)]
    torch.testing.assert_close(net(stages), paper_feature_map_unipt(net, stages), rtol=1e-9, atol=1e-9)


def test_feature_map_rejects_non_integer_ratio():
    with pytest.raises(ConfigError, match="integer multiple"):
        UniPTFeatureMapSideNetwork(UniPTConfig(), [4, 4], [(6, 6), (4, 4)])


def test_feature_map_trains_and_starts_at_backbone_output():
    chans, sizes = [4, 6], [(4, 4), (2, 2)]
    net = UniPTFeatureMapSideNetwork(UniPTConfig(), chans, sizes)
    stages = [torch.randn(2, c, h, w) for c, (h, w) in zip(chans, sizes)]
    y = net(stages)
    torch.testing.assert_close(y, stages[-1].flatten(2).transpose(1, 2))
    _randomise(net)
    net(stages).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reported_confidences_are_the_ones_forward_uses(variant):
    cfg = UniPTConfig(mapping_dim=6, kernels="reference", **VARIANTS[variant])
    net = _randomise(UniPTSideNetwork(cfg, [12, 12, 12], 12)).double()
    hs, mask, final = _inputs(sizes=(12, 12, 12))
    hs, final = [h.double() for h in hs], final.double()
    alphas = []
    paper_token_unipt(net, hs, mask, final, alphas)
    torch.testing.assert_close(net.layer_confidences(hs, mask, final), torch.stack(alphas))


def test_feature_map_refuses_token_only_options():
    with pytest.raises(ConfigError, match="unipt.anchor"):
        UniPTFeatureMapSideNetwork(UniPTConfig(anchor="separate"), [4, 4], [(4, 4), (2, 2)])


@pytest.mark.parametrize("kernels", ["efficient", "reference"])
@pytest.mark.parametrize("how", ["mean", "first", "last"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pooled_equals_pooling_the_tokens(variant, how, kernels):
    """pooled() skips the tokens pooling drops (the up-projection before the mean, the other query rows for
    first/last): the same values and gradients as pooling forward()'s tokens, left or right padding, a row with
    no real token included."""
    cfg = UniPTConfig(mapping_dim=6, kernels=kernels, **VARIANTS[variant])
    net = _randomise(UniPTSideNetwork(cfg, [5, 9, 12], 12)).double()
    hs, mask, final = _inputs(sizes=(5, 9, 12), lengths=(7, 4, 0))
    hs, final = [h.double() for h in hs], final.double()
    for m in (mask, mask.flip(-1)):  # right, then left padding
        want = pool_tokens(net(hs, m, final), m.bool(), how)
        got = net.pooled(hs, m, final, how)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        params = [p for p in net.parameters()]
        for a, b in zip(torch.autograd.grad(want, params, g, allow_unused=True),
                        torch.autograd.grad(got, params, g, allow_unused=True)):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(b, a)
