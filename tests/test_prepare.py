"""`raypt data prepare` on real files: text, images and audio, bad records by policy, local and S3 (moto's server).

Every input is a real file written here (images: scikit-image's own; audio: sine tones through soundfile), and
every S3 case talks to the real S3 API of moto's server from the `s3_endpoint` fixture.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from raypt import config, storage
from raypt.config import ConfigError, DataConfig, PrepareConfig
from raypt.data import corpora, decode
from raypt.data.prepare import prepare

PARAGRAPH = ("The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
             "Every morning the baker opens the shop and the smell of fresh bread fills the narrow street. ") * 6
IMAGES = ["astronaut.png", "coffee.png", "rocket.jpg"]


def skimage_folder() -> str:
    import skimage.data

    return os.path.dirname(skimage.data.__file__)


def text_cfg(inputs: list[str], **kw) -> PrepareConfig:
    return PrepareConfig(source="text", inputs=inputs, seq_len=16, vocab_size=300, max_bytes=10000,
                         val_fraction=0.3, **kw)


def write_text_inputs(folder: Path) -> dict[str, str]:
    """A .txt, a .jsonl with 4 good documents and 3 bad lines, a .parquet with 2 documents; the bad lines' names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(PARAGRAPH)
    lines = [json.dumps({"text": f"{PARAGRAPH} document {i}"}) for i in range(4)]
    lines.insert(1, json.dumps({"text": "   \n  "}))          # line 2: empty text
    lines.insert(2, '{"text": "no closing quote}')           # line 3: not JSON
    lines.insert(3, json.dumps({"body": PARAGRAPH}))           # line 4: lacks the text field
    lines.insert(5, "")                                        # blank lines are not records at all
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [f"{PARAGRAPH} parquet one", f"{PARAGRAPH} parquet two"]}),
                   folder / "c.parquet")
    jsonl = str(folder / "b.jsonl")
    return {"empty": f"{jsonl}:2", "json": f"{jsonl}:3", "schema": f"{jsonl}:4"}


def check_shards(out: str, manifest: dict) -> None:
    """Every shard the manifest lists exists with the listed size, checksum, rows and running sample ids."""
    fs, root = storage.resolve(out)
    for split in ("train", "val"):
        start = 0
        for entry in manifest["splits"][split]["files"]:
            with fs.open_input_stream(f"{root}/{entry['path']}") as f:
                data = f.read()
            assert len(data) == entry["bytes"]
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
            table = pq.read_table(io.BytesIO(data))
            assert table.num_rows == entry["rows"] == sum(entry["row_groups"])
            assert table.column("sample_id").to_pylist() == list(range(start, start + entry["rows"]))
        assert sum(e["rows"] for e in manifest["splits"][split]["files"]) == manifest["splits"][split]["rows"]


def read_split(out: str, manifest: dict, split: str) -> pa.Table:
    fs, root = storage.resolve(out)
    tables = []
    for entry in manifest["splits"][split]["files"]:
        with fs.open_input_stream(f"{root}/{entry['path']}") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    return pa.concat_tables(tables)


def by_name(manifest: dict) -> dict[str, str]:
    return {r["name"]: r["reason"] for r in manifest["bad_records"]["records"]}


# ------------------------------------------------------------------------------------------------------- text


def test_text_skips_and_names_each_bad_record(tmp_path):
    bad = write_text_inputs(tmp_path / "in")
    missing = str(tmp_path / "nowhere" / "more.jsonl")
    out = str(tmp_path / "out")
    manifest = prepare(out, text_cfg([str(tmp_path / "in"), missing]),
                       DataConfig(on_bad_record="skip", max_bad_fraction=0.9))

    reasons = by_name(manifest)
    assert manifest["bad_records"]["count"] == 4
    assert set(reasons) == {missing, bad["empty"], bad["json"], bad["schema"]}
    assert "missing" in reasons[missing]
    assert "empty" in reasons[bad["empty"]]
    assert "JSON" in reasons[bad["json"]]
    assert "schema" in reasons[bad["schema"]] and "'text'" in reasons[bad["schema"]]
    assert manifest["documents"] == 1 + 4 + 2            # txt, the good jsonl lines, the parquet rows
    assert manifest["bad_records"]["total"] == 7 + 4

    assert manifest["splits"]["train"]["rows"] >= 1 and manifest["splits"]["val"]["rows"] >= 1
    check_shards(out, manifest)
    train = read_split(out, manifest, "train")
    ids = np.array(train.column("input_ids").to_pylist())
    assert ids.shape == (manifest["splits"]["train"]["rows"], 16)
    assert 0 <= ids.min() and ids.max() < manifest["vocab_size"] <= 300
    assert (ids == manifest["eos_id"]).any()              # documents are separated by EOS
    assert storage.read_json(storage.join(out, "manifest.json")) == manifest
    assert (Path(out) / "tokenizer" / "tokenizer.json").is_file()
    tok = hashlib.sha256((Path(out) / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    assert tok == manifest["tokenizer_sha256"]


def test_text_fail_policy_stops_at_the_first_bad_record_and_names_it(tmp_path):
    bad = write_text_inputs(tmp_path / "in")
    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(ConfigError) as err:
        prepare(str(tmp_path / "out"), text_cfg([str(tmp_path / "in"), missing]),
                DataConfig(on_bad_record="fail", max_bad_fraction=0.9))
    assert "data.on_bad_record" in str(err.value) and missing in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()

    with pytest.raises(ConfigError) as err:  # inputs that all exist: the first bad line of the jsonl
        prepare(str(tmp_path / "out2"), text_cfg([str(tmp_path / "in")]),
                DataConfig(on_bad_record="fail", max_bad_fraction=0.9))
    assert "data.on_bad_record" in str(err.value) and bad["empty"] in str(err.value)
    assert "empty" in str(err.value)
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_text_too_many_bad_records_names_the_limit_and_the_records_before_writing_shards(tmp_path):
    bad = write_text_inputs(tmp_path / "in")
    missing = str(tmp_path / "nowhere.txt")
    inputs = [str(tmp_path / "in"), missing]
    with pytest.raises(ConfigError) as err:
        prepare(str(tmp_path / "out"), text_cfg(inputs), DataConfig(on_bad_record="skip", max_bad_fraction=0.01))
    message = str(err.value)
    assert "data.max_bad_fraction" in message and "4 of 11" in message
    for name in (missing, bad["empty"], bad["json"], bad["schema"]):
        assert name in message
    assert list((tmp_path / "out").iterdir()) == []      # checked before any shard or tokenizer is written

    # the limit is inclusive: 4 bad of 11 is 36.4 %
    with pytest.raises(ConfigError, match="data.max_bad_fraction"):
        prepare(str(tmp_path / "o1"), text_cfg(inputs), DataConfig(max_bad_fraction=0.36))
    assert prepare(str(tmp_path / "o2"), text_cfg(inputs), DataConfig(max_bad_fraction=4 / 11))[
        "bad_records"]["count"] == 4


def test_parquet_of_the_wrong_schema_is_a_bad_record(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.txt").write_text(PARAGRAPH)
    (folder / "more.txt").write_text(PARAGRAPH + " more")
    pq.write_table(pa.table({"body": [PARAGRAPH]}), folder / "no_text.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), folder / "int_text.parquet")
    manifest = prepare(str(tmp_path / "out"), text_cfg([str(folder)]), DataConfig(max_bad_fraction=0.9))
    reasons = by_name(manifest)
    assert set(reasons) == {str(folder / "no_text.parquet"), str(folder / "int_text.parquet")}
    assert all("schema mismatch" in r and "'text'" in r for r in reasons.values())
    assert manifest["documents"] == 2

    # another column named by text_field is read instead
    manifest = prepare(str(tmp_path / "out2"), text_cfg([str(folder / "no_text.parquet"), str(folder / "good.txt")],
                                                        text_field="body"), DataConfig(max_bad_fraction=0.9))
    assert manifest["bad_records"]["count"] == 0 and manifest["documents"] == 2


def test_parquet_large_string_text_column_is_read(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(PARAGRAPH)
    (folder / "b.txt").write_text(PARAGRAPH + " b")
    pq.write_table(pa.table({"text": pa.array([PARAGRAPH + " large"], pa.large_string())}), folder / "l.parquet")
    manifest = prepare(str(tmp_path / "out"), text_cfg([str(folder)]), DataConfig(max_bad_fraction=0.9))
    assert manifest["bad_records"]["count"] == 0, manifest["bad_records"]


def test_corrupt_parquet_is_a_bad_record(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(PARAGRAPH)
    (folder / "b.txt").write_text(PARAGRAPH + " b")
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    manifest = prepare(str(tmp_path / "out"), text_cfg([str(folder)]), DataConfig(max_bad_fraction=0.9))
    assert list(by_name(manifest)) == [str(folder / "broken.parquet")]


# ------------------------------------------------------------------------------- offline corpora, tokenizers


def decoded(out: str, manifest: dict) -> str:
    """The training split's tokens, decoded with the tokenizer the dataset carries."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(out) / manifest["tokenizer"]))
    return tok.decode(np.array(read_split(out, manifest, "train").column("input_ids").to_pylist()).reshape(-1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_code_corpora_are_whole_files_named_relative_in_sorted_order_up_to_max_bytes():
    for source, suffixes in (("cpp-headers", (".h", ".hpp", ".cuh")), ("site-python", (".py",))):
        docs = corpora.text_documents(source, 50_000)
        names = [Path(n) for n, _ in docs]
        assert names == sorted(names) and all(n.suffix in suffixes and not n.is_absolute() for n in names)
        sizes = [len(text) for _, text in docs]
        assert sum(sizes[:-1]) < 50_000 <= sum(sizes)
    assert names[0].parts[0] == corpora.SITE_PACKAGES[0]


@pytest.mark.parametrize("source, max_bytes, marks", [("cpp-headers", 200_000, ("#include", "namespace")),
                                                     ("site-python", 100_000, ("def ", "import "))])
def test_installed_code_corpora_reuse_the_stdlib_tokenizer(tiny_data, tmp_path, source, max_bytes, marks):
    cfg = PrepareConfig(source=source, max_bytes=max_bytes, seq_len=32, tokenizer=tiny_data)
    out = str(tmp_path / "out")
    manifest = prepare(out, cfg)
    stdlib = storage.read_json(storage.join(tiny_data, "manifest.json"))
    assert manifest["source"] == source and manifest["modality"] == "text"
    for key in ("tokenizer_sha256", "vocab_size", "eos_id"):
        assert manifest[key] == stdlib[key], key
    assert sha256(Path(out) / "tokenizer" / "tokenizer.json") == stdlib["tokenizer_sha256"]
    check_shards(out, manifest)
    assert all(mark in decoded(out, manifest) for mark in marks)
    assert prepare(str(tmp_path / "again"), cfg)["splits"] == manifest["splits"]  # the same shards, byte for byte


def test_a_hugging_face_folder_tokenizer_gives_its_vocabulary_eos_and_ids(tiny_data, tmp_path):
    from transformers import AutoTokenizer

    from raypt.data.prepare import split
    from raypt.preflight import check_prepare

    tok = AutoTokenizer.from_pretrained(str(Path(tiny_data) / "tokenizer"))
    tok.add_special_tokens({"eos_token": "</s>"})  # a vocabulary and an eos unlike any raypt-trained tokenizer's
    export = tmp_path / "export"
    tok.save_pretrained(export)
    (export / "model.safetensors").write_bytes(b"stands for the weights beside the tokenizer")
    check_prepare(config.load(None, [f"data.path={tmp_path / 'out'}", f"data.prepare.tokenizer={export}"],
                              check_data=False))

    out = str(tmp_path / "out")
    manifest = prepare(out, PrepareConfig(source="cpp-headers", max_bytes=100_000, seq_len=32,
                                          tokenizer=str(export)))
    assert manifest["vocab_size"] == len(tok) == 513 and manifest["eos_id"] == tok.eos_token_id == 512
    assert manifest["tokenizer_sha256"] == sha256(Path(out) / "tokenizer" / "tokenizer.json")
    assert manifest["tokenizer_sha256"] == sha256(export / "tokenizer.json")
    docs = split(corpora.text_documents("cpp-headers", 100_000), PrepareConfig().val_fraction)["train"]
    ids = [t for _, text in docs for t in (*tok(text, add_special_tokens=False)["input_ids"], 512)]
    stored = np.array(read_split(out, manifest, "train").column("input_ids").to_pylist()).reshape(-1)
    assert stored.tolist() == ids[: len(stored)] and len(ids) - len(stored) < 32


def test_a_tokenizer_location_without_a_tokenizer_or_an_eos_is_refused_naming_the_field(tiny_data, tmp_path):
    from transformers import AutoTokenizer

    from raypt.preflight import check_prepare

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("no tokenizer here")
    expected = r"data.prepare.tokenizer: '.*' holds neither a prepared text dataset .* nor a Hugging Face tokenizer"
    for location in (neither, tmp_path / "missing"):
        with pytest.raises(ConfigError, match=expected):
            prepare(str(tmp_path / "out"), PrepareConfig(source="cpp-headers", tokenizer=str(location)))
        with pytest.raises(ConfigError, match=expected):
            check_prepare(config.load(None, [f"data.path={tmp_path / 'out'}", f"data.prepare.tokenizer={location}"],
                                      check_data=False))

    tok = AutoTokenizer.from_pretrained(str(Path(tiny_data) / "tokenizer"))
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(ConfigError, match="data.prepare.tokenizer: .* has no eos_token"):
        prepare(str(tmp_path / "out"), PrepareConfig(source="cpp-headers", tokenizer=str(tmp_path / "no-eos")))
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------------- images


def write_image_inputs(folder: Path) -> list[str]:
    """3 real images, a garbage .png and the first half of a real .jpg; returns the bad files' paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        shutil.copy(os.path.join(skimage_folder(), name), folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    jpg = Path(skimage_folder(), "rocket.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "notes.txt").write_text("not an image; not picked up from a folder")
    return [str(folder / "corrupt.png"), str(folder / "truncated.jpg")]


def test_images_skip_exactly_the_undecodable_ones(tmp_path):
    bad = write_image_inputs(tmp_path / "img")
    out = str(tmp_path / "out")
    manifest = prepare(out, PrepareConfig(source="images", inputs=[str(tmp_path / "img")], val_fraction=0.3),
                       DataConfig(max_bad_fraction=0.9))
    reasons = by_name(manifest)
    assert sorted(reasons) == sorted(bad)
    assert all("undecodable image" in r for r in reasons.values())
    assert "truncated" in reasons[bad[1]]
    assert manifest["modality"] == "image" and manifest["documents"] == len(IMAGES)
    rows = manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"]
    assert rows == len(IMAGES) and min(manifest["splits"][s]["rows"] for s in ("train", "val")) >= 1
    check_shards(out, manifest)
    stored = pa.concat_tables([read_split(out, manifest, s) for s in ("train", "val")])
    names = stored.column("name").to_pylist()
    assert sorted(names) == sorted(str(tmp_path / "img" / n) for n in IMAGES)
    for name, data in zip(names, stored.column("image").to_pylist()):
        assert data == Path(name).read_bytes()            # stored still encoded, byte for byte
        image = decode.decode_image(data)
        assert image.mode == "RGB" and min(image.size) > 0


def test_mixing_text_sources_of_other_vocabularies_or_lengths_is_refused(tmp_path):
    write_text_inputs(tmp_path / "in")
    inputs, ok = [str(tmp_path / "in")], DataConfig(max_bad_fraction=0.9)
    prepare(str(tmp_path / "a"), text_cfg(inputs), ok)
    prepare(str(tmp_path / "same"), text_cfg(inputs, tokenizer=str(tmp_path / "a")), ok)
    prepare(str(tmp_path / "own"), PrepareConfig(source="text", inputs=inputs, seq_len=16, vocab_size=290,
                                                 val_fraction=0.3), ok)
    prepare(str(tmp_path / "long"), PrepareConfig(source="text", inputs=inputs, seq_len=8, vocab_size=300,
                                                  val_fraction=0.3, tokenizer=str(tmp_path / "a")), ok)

    def mix(other: str):
        return config.load(None, [f"data.sources=[{{name: a, path: {tmp_path / 'a'}}}, "
                                  f"{{name: b, path: {tmp_path / other}}}]"])

    assert [s.name for s in mix("same").data.sources] == ["a", "b"]
    with pytest.raises(ConfigError, match="data.sources: .*different tokenizers"):
        mix("own")
    with pytest.raises(ConfigError, match=r"data.sources: .*different lengths \[8, 16\]"):
        mix("long")


def test_images_shrunk_to_image_max_side_keep_their_aspect(tmp_path):
    write_image_inputs(tmp_path / "img")
    out = str(tmp_path / "out")
    manifest = prepare(out, PrepareConfig(source="images", inputs=[str(tmp_path / "img")], val_fraction=0.3,
                                          image_max_side=64), DataConfig(max_bad_fraction=0.9))
    stored = pa.concat_tables([read_split(out, manifest, s) for s in ("train", "val")])
    for name, data in zip(stored.column("name").to_pylist(), stored.column("image").to_pylist()):
        original, small = decode.decode_image(Path(name).read_bytes()), decode.decode_image(data)
        assert max(small.size) == 64 < max(original.size)
        assert abs(small.size[0] / small.size[1] - original.size[0] / original.size[1]) < 0.05


def test_images_from_a_parquet_column_and_its_bad_entries(tmp_path):
    good = [Path(skimage_folder(), n).read_bytes() for n in IMAGES]
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": pa.array([good[0], b"garbage", good[1], None, good[2]], pa.binary())}), path)
    manifest = prepare(str(tmp_path / "out"), PrepareConfig(source="images", inputs=[str(path)], val_fraction=0.3),
                       DataConfig(max_bad_fraction=0.9))
    assert sorted(by_name(manifest)) == [f"{path}#1", f"{path}#3"]
    assert manifest["documents"] == 3

    pq.write_table(pa.table({"pixels": pa.array(good, pa.binary())}), tmp_path / "other.parquet")
    manifest = prepare(str(tmp_path / "out2"), PrepareConfig(source="images", inputs=[str(path),
                       str(tmp_path / "other.parquet")], val_fraction=0.3), DataConfig(max_bad_fraction=0.9))
    assert "schema mismatch" in by_name(manifest)[str(tmp_path / "other.parquet")]


def test_image_parquet_with_an_int_column_is_a_bad_record(tmp_path):
    write_image_inputs(tmp_path / "img")
    pq.write_table(pa.table({"image": [1, 2]}), tmp_path / "img" / "ints.parquet")
    manifest = prepare(str(tmp_path / "out"), PrepareConfig(source="images", inputs=[str(tmp_path / "img")],
                                                            val_fraction=0.3), DataConfig(max_bad_fraction=0.9))
    assert "schema mismatch" in by_name(manifest)[str(tmp_path / "img" / "ints.parquet")]


# ----------------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("digits") / "out")
    return out, prepare(out, PrepareConfig(source="digits"))


def test_digits_keep_their_labels_and_every_class_in_both_splits(digits_data):
    out, manifest = digits_data
    assert manifest["modality"] == "image" and manifest["source"] == "digits" and manifest["labels"] == 10
    assert manifest["documents"] == manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 1797
    check_shards(out, manifest)
    tables = {s: read_split(out, manifest, s) for s in ("train", "val")}
    for table in tables.values():
        assert table.schema.field("label").type == pa.int64()
        assert sorted(set(table.column("label").to_pylist())) == list(range(10))
    names = {s: t.column("name").to_pylist() for s, t in tables.items()}
    assert not set(names["train"]) & set(names["val"])
    assert names["val"] == sorted(names["val"]) and names["train"] == sorted(names["train"])  # the set's order
    assert 0.01 < len(names["val"]) / 1797 < 0.04  # val_fraction 0.02 within each class, at least one each
    for data in tables["val"].column("image").to_pylist():
        image = decode.decode_image(data)
        assert image.size == (32, 32)
        assert np.array_equal(np.asarray(image)[..., 0], np.asarray(image)[..., 2])  # grey digits stored as RGB


def test_digits_prepare_again_byte_for_byte_at_the_configured_side(digits_data, tmp_path):
    out, manifest = digits_data
    again = prepare(str(tmp_path / "again"), PrepareConfig(source="digits"))
    assert again["splits"] == manifest["splits"]
    for entry in manifest["splits"]["train"]["files"] + manifest["splits"]["val"]["files"]:
        assert Path(out, entry["path"]).read_bytes() == (tmp_path / "again" / entry["path"]).read_bytes()
    small = prepare(str(tmp_path / "small"), PrepareConfig(source="digits", image_max_side=20, val_fraction=0.3))
    val = read_split(str(tmp_path / "small"), small, "val")
    assert decode.decode_image(val.column("image")[0].as_py()).size == (20, 20)
    assert 0.28 < val.num_rows / 1797 < 0.32


def window_batches(stream, count: int) -> list[dict]:
    """A stream's micro-batches of global batches 0..count-1, read and cut in this process (no Ray)."""
    packed = stream.mix.read_window(0, count, stream.batch_split.ranks, stream.rank)
    with np.load(io.BytesIO(packed), allow_pickle=False) as window:
        return list(stream.micro_batches(dict(window)))


def test_validation_batches_carry_the_labels_beside_the_images_and_training_batches_do_not(digits_data, tmp_path):
    import torch

    from raypt.config import AudioConfig, ImageConfig
    from raypt.data.manifest import read_manifest
    from raypt.data.mix import MixPlan
    from raypt.data.split import Split
    from raypt.data.stream import SOURCE_BITS, RankStream

    write_image_inputs(tmp_path / "img")
    prepare(str(tmp_path / "photos"), PrepareConfig(source="images", inputs=[str(tmp_path / "img")],
                                                    val_fraction=0.3), DataConfig(max_bad_fraction=0.9))
    out, _ = digits_data
    manifests = [read_manifest(out), read_manifest(str(tmp_path / "photos"))]  # labelled digits, unlabelled photos
    val = read_split(out, manifests[0], "val")
    label_of = dict(zip(val.column("sample_id").to_pylist(), val.column("label").to_pylist()))
    image_of = dict(zip(val.column("sample_id").to_pylist(), val.column("image").to_pylist()))
    image_cfg = ImageConfig(views=2)

    def stream(split: str, train: bool) -> RankStream:
        return RankStream(manifests, MixPlan([(0, np.array([3.0, 1.0]))], 8, np.zeros(2)), split, 0, train,
                          Split(8, 2, 2), 1, 0, image_cfg, AudioConfig())

    batches = window_batches(stream("val", False), 3)
    assert len(batches) == 6
    for batch in batches:
        assert batch["label"].dtype == torch.int64 and len(batch["label"]) == len(batch["pixel_values"])
        for sid, label, views in zip(batch["sample_id"].tolist(), batch["label"].tolist(), batch["pixel_values"]):
            if sid >> SOURCE_BITS:  # a photo: no label
                assert label == -1
                continue
            assert label == label_of[sid]
            assert np.array_equal(views.numpy(), decode.image_views(image_of[sid], image_cfg, None))
    assert {-1} < set(torch.cat([b["label"] for b in batches]).tolist())
    assert all("label" not in b for b in window_batches(stream("train", True), 1))


# ------------------------------------------------------------------------------------------------------ audio


def test_audio_skips_exactly_the_broken_and_the_empty_file(tmp_path):
    folder = tmp_path / "aud"
    folder.mkdir()
    t = np.arange(1600) / 8000.0
    lengths = {}
    for i, (name, fmt) in enumerate([("a.wav", "WAV"), ("b.flac", "FLAC"), ("c.wav", "WAV")]):
        tone = (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t[: 800 * (i + 1)])).astype(np.float32)
        sf.write(folder / name, tone, 8000, format=fmt)
        lengths[str(folder / name)] = len(tone)
    (folder / "broken.wav").write_bytes(b"RIFF" + os.urandom(120))
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 8000, format="WAV")
    assert sf.info(folder / "empty.wav").frames == 0      # a valid wav, just without samples

    out = str(tmp_path / "out")
    manifest = prepare(out, PrepareConfig(source="audio", inputs=[str(folder)], val_fraction=0.3),
                       DataConfig(max_bad_fraction=0.9))
    reasons = by_name(manifest)
    assert sorted(reasons) == [str(folder / "broken.wav"), str(folder / "empty.wav")]
    assert "undecodable audio" in reasons[str(folder / "broken.wav")]
    assert "no samples" in reasons[str(folder / "empty.wav")]
    assert manifest["modality"] == "audio"
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 3
    check_shards(out, manifest)
    stored = pa.concat_tables([read_split(out, manifest, s) for s in ("train", "val")])
    for name, data in zip(stored.column("name").to_pylist(), stored.column("audio").to_pylist()):
        samples, rate = decode.decode_audio(data)
        assert rate == 8000 and len(samples) == lengths[name]


# --------------------------------------------------------------------------------------------------------- S3


def new_bucket() -> str:
    name = f"raypt-prep-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def upload(folder: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for f in sorted(folder.iterdir()):
        s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


@pytest.fixture
def fresh_s3(s3_endpoint):
    """The S3 filesystems are cached per (endpoint, region, bucket): start and end each test without any."""
    storage._s3.cache_clear()
    yield s3_endpoint
    storage._s3.cache_clear()


def test_prepare_reads_s3_inputs_and_writes_s3_output_like_local(fresh_s3, tmp_path):
    bucket = new_bucket()
    bad = write_text_inputs(tmp_path / "text")
    (tmp_path / "text" / "a.txt").unlink()
    (tmp_path / "text" / "c.parquet").unlink()
    write_image_inputs(tmp_path / "img")
    upload(tmp_path / "text", bucket, "raw/text")
    upload(tmp_path / "img", bucket, "raw/img")
    policy = DataConfig(max_bad_fraction=0.9)

    # images: the folder form, and the glob form
    local = prepare(str(tmp_path / "local-img"), PrepareConfig(source="images", inputs=[str(tmp_path / "img")],
                                                               val_fraction=0.3), policy)
    for inputs in ([f"s3://{bucket}/raw/img"], [f"s3://{bucket}/raw/img/*.png", f"s3://{bucket}/raw/img/*.jpg"]):
        out = f"s3://{bucket}/out/img-{len(inputs)}"
        remote = prepare(out, PrepareConfig(source="images", inputs=inputs, val_fraction=0.3), policy)
        manifest = storage.read_json(f"{out}/manifest.json")
        assert manifest == remote
        assert sorted(by_name(manifest)) == [f"s3://{bucket}/raw/img/corrupt.png",
                                             f"s3://{bucket}/raw/img/truncated.jpg"]
        assert manifest["documents"] == local["documents"] == len(IMAGES)
        check_shards(out, manifest)
        stored = pa.concat_tables([read_split(out, manifest, s) for s in ("train", "val")])
        assert sorted(stored.column("name").to_pylist()) == sorted(f"s3://{bucket}/raw/img/{n}" for n in IMAGES)
        local_rows = pa.concat_tables([read_split(str(tmp_path / "local-img"), local, s) for s in ("train", "val")])
        assert sorted(stored.column("image").to_pylist()) == sorted(local_rows.column("image").to_pylist())

    # text: a glob and a single object; the same bad records, named by their s3:// URI
    local = prepare(str(tmp_path / "local-text"), text_cfg([str(tmp_path / "text" / "b.jsonl")]), policy)
    out = f"s3://{bucket}/out/text"
    remote = prepare(out, text_cfg([f"s3://{bucket}/raw/text/*.jsonl"]), policy)
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest == remote
    assert manifest["documents"] == local["documents"] == 4
    assert sorted(by_name(manifest).values()) == sorted(by_name(local).values())
    assert set(by_name(manifest)) == {n.replace(str(tmp_path / "text"), f"s3://{bucket}/raw/text")
                                      for n in bad.values()}
    check_shards(out, manifest)
    fs, root = storage.resolve(out)
    with fs.open_input_stream(f"{root}/tokenizer/tokenizer.json") as f:
        assert hashlib.sha256(f.read()).hexdigest() == manifest["tokenizer_sha256"]
    single = prepare(f"s3://{bucket}/out/text1", text_cfg([f"s3://{bucket}/raw/text/b.jsonl"]), policy)
    assert single["documents"] == 4 and by_name(single) == by_name(manifest)
    # and a training job finds it
    assert config.load(None, [f"data.path={out}"]).data.path == out


def test_an_s3_hugging_face_folder_lends_its_tokenizer_files_not_its_weights(fresh_s3, tiny_data, tmp_path,
                                                                              monkeypatch):
    from transformers import AutoTokenizer

    bucket = new_bucket()
    export = tmp_path / "export"
    AutoTokenizer.from_pretrained(str(Path(tiny_data) / "tokenizer")).save_pretrained(export)
    (export / "model.safetensors").write_bytes(b"stands for gigabytes of weights")
    upload(export, bucket, "export")
    copied, copy = [], storage.copy_tree
    monkeypatch.setattr(storage, "copy_tree", lambda src, dst: (copied.append(src.rsplit("/", 1)[1]), copy(src, dst)))

    manifest = prepare(str(tmp_path / "out"), PrepareConfig(source="site-python", max_bytes=50_000, seq_len=16,
                                                            tokenizer=f"s3://{bucket}/export"))
    assert "tokenizer.json" in copied and "model.safetensors" not in copied
    assert manifest["tokenizer_sha256"] == storage.read_json(f"{tiny_data}/manifest.json")["tokenizer_sha256"]


def test_s3_folder_input_with_a_trailing_slash(fresh_s3, tmp_path):
    bucket = new_bucket()
    write_image_inputs(tmp_path / "img")
    upload(tmp_path / "img", bucket, "raw/img")
    manifest = prepare(str(tmp_path / "out"), PrepareConfig(source="images", inputs=[f"s3://{bucket}/raw/img/"],
                                                            val_fraction=0.3), DataConfig(max_bad_fraction=0.9))
    assert manifest["documents"] == len(IMAGES)


def test_s3_bucket_that_does_not_exist(fresh_s3, tmp_path):
    bucket = f"raypt-none-{uuid.uuid4().hex[:12]}"
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path=s3://{bucket}/data"])
    assert str(err.value).startswith("data.path:") and f"s3://{bucket}/data" in str(err.value)
    # as an input it is a bad record that names it; under `fail` it stops the run
    with pytest.raises(ConfigError) as err:
        prepare(str(tmp_path / "out"), text_cfg([f"s3://{bucket}/raw/b.jsonl"]),
                DataConfig(on_bad_record="fail"))
    assert "data.on_bad_record" in str(err.value) and f"s3://{bucket}/raw/b.jsonl" in str(err.value)


def test_s3_output_bucket_that_does_not_exist_is_a_config_error(fresh_s3, tmp_path):
    write_text_inputs(tmp_path / "in")
    bucket = f"raypt-none-{uuid.uuid4().hex[:12]}"
    with pytest.raises(ConfigError, match=bucket):
        prepare(f"s3://{bucket}/out", text_cfg([str(tmp_path / "in")]), DataConfig(max_bad_fraction=0.9))


@contextmanager
def moto_checks_credentials(endpoint: str):
    """moto's server accepts any credentials unless told otherwise: /moto-api/reset-auth with 0 makes it check
    every request against its IAM users from now on; 'inf' turns that off again (the server is shared)."""
    def set_count(value: bytes) -> None:
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=value, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"

    set_count(b"0")
    try:
        yield
    finally:
        set_count(b"inf")


def test_refused_credentials_are_named_without_the_secret(fresh_s3, tmp_path, monkeypatch):
    bucket = new_bucket()
    write_text_inputs(tmp_path / "in")
    upload(tmp_path / "in", bucket, "raw")
    out = f"s3://{bucket}/data"
    prepare(out, text_cfg([f"s3://{bucket}/raw/b.jsonl"]), DataConfig(max_bad_fraction=0.9))
    iam = boto3.client("iam")
    user = f"raypt-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    wrong_secret = f"wrong-secret-{uuid.uuid4().hex}"

    with moto_checks_credentials(fresh_s3):
        # the real key works: the refusals below are about the credentials, nothing else
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        storage._s3.cache_clear()
        assert config.load(None, [f"data.path={out}"]).data.path == out

        for key_id, secret in ((key["AccessKeyId"], wrong_secret), ("AKIAWRONGWRONGWRONG0", wrong_secret)):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            storage._s3.cache_clear()
            with pytest.raises(ConfigError) as err:
                config.load(None, [f"data.path={out}"])
            message = str(err.value)
            assert message.startswith("data.path:") and out in message
            assert "refused the credentials" in message and "AWS_SECRET_ACCESS_KEY" in message
            assert secret not in message and key["SecretAccessKey"] not in message

            with pytest.raises(ConfigError) as err:
                prepare(str(tmp_path / "local-out"), text_cfg([f"s3://{bucket}/raw"]), DataConfig())
            assert str(err.value).startswith("data.prepare.inputs:")
            assert "refused the credentials" in str(err.value) and secret not in str(err.value)


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast_with_the_field_and_no_secret(monkeypatch, tmp_path):
    endpoint = f"http://127.0.0.1:{free_closed_port()}"
    secret = f"never-print-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "raypt-unreachable-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._s3.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError) as err:
            config.load(None, ["data.path=s3://nobucket/data"])
        assert time.monotonic() - start < 60  # a hang guard, not a speed target
        message = str(err.value)
        assert message.startswith("data.path:") and "s3://nobucket/data" in message
        assert "cannot reach the S3 endpoint" in message and endpoint in message
        assert secret not in message

        start = time.monotonic()
        with pytest.raises(ConfigError) as err:
            prepare(str(tmp_path / "out"), text_cfg(["s3://nobucket/raw"]), DataConfig())
        assert time.monotonic() - start < 60
        assert str(err.value).startswith("data.prepare.inputs:")
        assert "cannot reach the S3 endpoint" in str(err.value) and secret not in str(err.value)
    finally:
        storage._s3.cache_clear()
