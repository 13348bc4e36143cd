"""Backbone views over one shared frozen backbone: each reads its own layers, one forward serves every view inside a
block, rows of one batch can be handed to different models, and incremental decoding reads the view's layers."""
import pytest
import torch

from tiny_models import tiny_causal_lm_dir, tiny_vit_dir
from unipt_scale.backbone import load_backbone
from unipt_scale.config import BackboneConfig
from unipt_scale.shared_forward import SharedBackbone


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_causal_lm_dir(str(tmp_path_factory.mktemp("sf")), layers=3)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _tapped(llama, layers):
    bb = load_backbone(BackboneConfig(path=llama))
    bb.tap(layers)
    return bb


def _alone(llama, layers, batch):
    return _tapped(llama, layers)(batch)


def test_views_read_their_own_layers_from_one_forward(llama):
    shared = SharedBackbone(load_backbone(BackboneConfig(path=llama)))
    a, b = shared.view(), shared.view()
    a.tap([1, 3])
    b.tap([0, 2, 3])
    batch = _batch()
    with shared.batch():
        out_a, out_b = a(batch), b(batch)
        assert b(dict(batch)) is not None  # a new dict over the same tensors: still the block's forward
    assert shared.forwards == 1
    for view, out in ((a, out_a), (b, out_b)):
        ref = _alone(llama, view.layer_indices, batch)
        assert len(out.hidden_states) == len(view.layer_indices)
        assert all(torch.equal(x, y) for x, y in zip(out.hidden_states, ref.hidden_states))
        assert torch.equal(out.final, ref.final) and torch.equal(out.mask, ref.mask)
    assert a.hidden_sizes == [32, 32] and a.kind == "decoder" and a.num_hidden_states == 4
    outside = a(batch)  # outside a block: a forward of its own layers
    assert shared.forwards == 2 and all(torch.equal(x, y) for x, y in zip(outside.hidden_states, out_a.hidden_states))


def test_rows_split_from_one_forward(llama):
    shared = SharedBackbone(load_backbone(BackboneConfig(path=llama)))
    v = shared.view()
    v.tap([2, 3])
    batch = _batch()
    with shared.batch():
        first, second = shared.split(batch, [torch.tensor([0, 2]), torch.tensor([1, 3])])
        got = v(second)
    assert shared.forwards == 1
    whole = _alone(llama, [2, 3], batch)
    assert all(torch.equal(x, y[[1, 3]]) for x, y in zip(got.hidden_states, whole.hidden_states))
    assert torch.equal(second["input_ids"], batch["input_ids"][[1, 3]])


def test_incremental_decoding_reads_the_views_layers(llama):
    shared = SharedBackbone(load_backbone(BackboneConfig(path=llama)))
    a, b = shared.view(), shared.view()
    a.tap([1, 3])
    b.tap([0, 1, 2, 3])
    batch = _batch()
    with shared.batch():
        b(batch)  # the backbone now taps the union
    out, _cache = a.forward_cached(batch["input_ids"], batch["attention_mask"])
    ref, _ = _tapped(llama, [1, 3]).forward_cached(batch["input_ids"], batch["attention_mask"])
    assert len(out.hidden_states) == 2
    assert all(torch.equal(x, y) for x, y in zip(out.hidden_states, ref.hidden_states))


def test_two_batches_in_one_block_get_a_forward_each(llama):
    shared = SharedBackbone(load_backbone(BackboneConfig(path=llama)))
    v = shared.view()
    v.tap([3])
    one, two = _batch(), {k: t.flip(0).contiguous() for k, t in _batch().items()}
    with shared.batch():
        a, b = v(one), v(two)
    assert shared.forwards == 2 and not torch.equal(a.final, b.final)


def test_an_image_tower_is_keyed_by_its_pixels_not_the_caption(tmp_path):
    """A retrieval batch carries captions and images: the image tower's memo and cache read its pixels alone."""
    from unipt_scale.feature_cache import TappedStateCache

    vit = load_backbone(BackboneConfig(path=tiny_vit_dir(str(tmp_path))))
    shared = SharedBackbone(vit, cache=lambda layers: TappedStateCache(str(tmp_path / "c"), {"layers": layers},
                                                                        "float32"))
    assert shared.inputs == ("pixel_values",)
    v = shared.view()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 1, 16, 16, generator=g)
    same_caption = {"input_ids": torch.tensor([[5, 6, 0], [5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]] * 2),
                    "pixel_values": pixels}
    with shared.batch():
        first = v(same_caption)
    assert len(shared.cache) == 2, "two images, two samples, though their captions are the same"
    ref = vit(same_caption)
    assert all(torch.equal(x, y) for x, y in zip(first.hidden_states, ref.hidden_states)) and first.mask is None
    with shared.batch():
        again = v({**same_caption, "input_ids": torch.tensor([[7, 8, 9], [9, 8, 7]])})
    assert shared.forwards == 1 and shared.cache.hits == 2
    assert all(torch.equal(x, y) for x, y in zip(again.hidden_states, ref.hidden_states))
