"""Bad data input fails at construction with one clear line that names the problem and the fix."""
import json
import os
import shutil

import pytest

from unipt_scale.config import DataConfig
from unipt_scale.data import build_data, num_classes_of, shards, stream
from unipt_scale.data.stream import make_loader, read_index


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(12)))
    out = root / "shards"
    shards.write_shards(shards.ShardSpec(source="jsonl", out=out, input=root / "d.jsonl", fractions=[1.0],
                                         samples_per_shard=4))
    return out


@pytest.fixture
def copy(text_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(text_shards, out)
    return out


def shards_cfg(**kw):
    return DataConfig(source="shards", **kw)


def one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture
def no_reads(monkeypatch):
    """Construction-time checks must not open shards for reading samples."""
    def refuse(*a, **k):
        raise AssertionError("a shard was read at construction")

    monkeypatch.setattr(stream, "ShardReader", refuse)


@pytest.mark.parametrize("name", ["../x.tar", "/tmp/x.tar", "sub/x.tar", ".."])
def test_index_names_must_stay_in_the_directory(copy, name, no_reads):
    index = json.loads((copy / "sizes.json").read_text())
    first = index["splits"]["train"]["shards"][0]
    index["shards"][name] = index["shards"].pop(first)
    index["splits"]["train"]["shards"][0] = name
    (copy / "sizes.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a file name inside") as err:
        make_loader(str(copy), batch_size=2, rank=0, world_size=1)
    assert repr(name) in one_line(err)
    with pytest.raises(ValueError, match="not a file name inside"):
        build_data(shards_cfg(path=str(copy)))


def test_index_entry_linking_outside_is_refused(copy, tmp_path, no_reads):
    index = json.loads((copy / "sizes.json").read_text())
    first = index["splits"]["train"]["shards"][0]
    elsewhere = tmp_path / "elsewhere.tar"
    shutil.copy(copy / first, elsewhere)
    os.unlink(copy / first)
    os.symlink(elsewhere, copy / first)
    with pytest.raises(ValueError, match="a link to .*elsewhere.tar outside") as err:
        read_index(copy)
    one_line(err)


@pytest.mark.parametrize("body, problem", [(b"", "is empty"), (b"not a tar at all\n" * 40, "is not a tar file")])
def test_non_tar_listed_in_index_fails_at_construction(copy, body, problem, no_reads):
    name = json.loads((copy / "sizes.json").read_text())["splits"]["train"]["shards"][1]
    (copy / name).write_bytes(body)
    with pytest.raises(ValueError, match=problem) as err:
        make_loader(str(copy), batch_size=2, rank=0, world_size=1)
    assert name in one_line(err)
    with pytest.raises(ValueError, match=problem):
        build_data(shards_cfg(path=str(copy)))


def test_glob_of_non_tar_files(copy, tmp_path, no_reads):
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.txt").write_text("hello")
    (other / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="matches no tar file") as err:
        make_loader(str(other / "*"), batch_size=2, rank=0, world_size=1, fields=("text",))
    assert "README.txt" in one_line(err)
    with pytest.raises(ValueError, match="matches no tar file"):
        build_data(shards_cfg(train_shards=str(other / "*")))
    with pytest.warns(UserWarning, match="ignoring 1 match"):  # sizes.json beside the tars is not a shard
        loader = make_loader(str(copy / "*"), batch_size=2, rank=0, world_size=1)
    assert [os.path.basename(u) for u in loader.dataset.cfg.sources[0].urls] == sorted(
        json.loads((copy / "sizes.json").read_text())["shards"])


def test_shard_directory_without_index(copy, no_reads):
    os.unlink(copy / "sizes.json")
    with pytest.raises(FileNotFoundError, match="data.path=.*no sizes.json.*data.train_shards") as err:
        build_data(shards_cfg(path=str(copy)))
    assert "samples_per_epoch" not in one_line(err)
    with pytest.raises(FileNotFoundError, match="no sizes.json"):
        num_classes_of(shards_cfg(path=str(copy)))
    with pytest.raises(FileNotFoundError, match="no sizes.json"):
        make_loader(str(copy), batch_size=2, rank=0, world_size=1)


def test_shards_without_index_cannot_size_an_epoch(copy, no_reads):
    os.unlink(copy / "sizes.json")
    with pytest.raises(ValueError, match=r"data.train_shards=.*no sizes.json beside them.*unipt shards") as err:
        build_data(shards_cfg(train_shards=str(copy / "train-{000000..000002}.tar")), needs_labels=False,
                   needs_image=True)
    assert "samples_per_epoch" not in one_line(err)


@pytest.mark.parametrize("kw, exc, message", [
    ({}, ValueError, "needs data.path .* or data.train_shards"),
    ({"path": "/nonexistent/shards"}, FileNotFoundError, "data.path='/nonexistent/shards' does not exist"),
    ({"train_shards": "/nonexistent/train-{0..3}.tar"}, FileNotFoundError, "shard not found"),
])
def test_shard_config_errors(kw, exc, message, no_reads):
    with pytest.raises(exc, match=message) as err:
        build_data(shards_cfg(**kw))
    one_line(err)


def test_unreadable_index(copy, no_reads):
    (copy / "sizes.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable shard index") as err:
        build_data(shards_cfg(path=str(copy)))
    one_line(err)
    (copy / "sizes.json").write_text(json.dumps({"shards": {"train-000000.tar": -3}, "splits": {}}))
    with pytest.raises(ValueError, match="counts are integers >= 0"):
        read_index(copy)


def test_csv_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='.*nope.csv' does not exist"):
        build_data(DataConfig(source="csv", path=str(tmp_path / "nope.csv")))
    (tmp_path / "d.csv").write_text("sentence,y\nhello,1\n")
    with pytest.raises(ValueError, match="no text column 'text'.*set data.text_column"):
        build_data(DataConfig(source="csv", path=str(tmp_path / "d.csv")))
    with pytest.raises(ValueError, match="no label column 'label'.*set data.label_column"):
        build_data(DataConfig(source="csv", path=str(tmp_path / "d.csv"), text_column="sentence"))
    (tmp_path / "e.csv").write_text("text,label\nhello,1\nworld,\n")
    with pytest.raises(ValueError, match="1 row\\(s\\) without a label"):
        build_data(DataConfig(source="csv", path=str(tmp_path / "e.csv")))
