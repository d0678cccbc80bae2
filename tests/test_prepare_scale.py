"""`data prepare` at scale: inputs read in pieces give the records of whole files, 1 and 4 Ray tasks write the same
bytes, and the driver and every task stay within data.prepare.max_memory_mb on a corpus larger than it."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypt.config import ConfigError, DataConfig, PrepareConfig
from raypt.data import inputs
from raypt.data.prepare import prepare

WORDS = ("def class return import yield lambda while for in if else elif try except finally with as pass break "
         "continue self value count total index name data result items keys").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def whole_file(path: Path) -> list[tuple[str, str]]:
    """(name, text or reason) of a .jsonl file as one read of the whole file sees it."""
    out = []
    for i, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            out.append((f"{path}:{i + 1}", "not a JSON line"))
            continue
        out.append((f"{path}:{i + 1}", doc["text"] if isinstance(doc, dict) and "text" in doc else "schema"))
    return out


def in_pieces(path: Path, chunk: int, block: int) -> list[tuple[str, str]]:
    """The same, read piece by piece (each numbered from the lines of the pieces before it), `block` bytes at a time."""
    out, first = [], 0
    for piece in inputs.cut(str(path), path.stat().st_size, chunk):
        last = -1
        for key, text, reason in inputs.records(piece, "text", None, block):
            last = key
            if text is not None or reason is not None:
                name = inputs.record_name(piece, key, first)
                out.append((name, text if reason is None else "schema" if "schema" in reason else reason))
        first += last + 1
    return out


def test_jsonl_and_parquet_read_in_pieces_give_the_records_of_the_whole_file(tmp_path):
    rng = random.Random(0)
    lines = []
    for i in range(300):
        doc = {"text": words(rng, rng.randint(0, 40)) + rng.choice(["", " é", " 日本語", "\u2028x", "\r"])}
        lines.append(rng.choice([json.dumps(doc), json.dumps(doc, ensure_ascii=False), "", "{broken", '{"body": 1}']))
    raw = "".join(line + rng.choice(["\n", "\r\n", "\n\n", "\x85"]) for line in lines).encode()
    path = tmp_path / "docs.jsonl"
    path.write_bytes(raw[:5000] + b"\xff\xfe" + raw[5000:] + b'{"text": "no final break"}')
    expected = whole_file(path)
    assert len(expected) > 200
    for chunk, block in ((64, 5), (1000, 7), (10 ** 6, 1 << 16)):
        assert in_pieces(path, chunk, block) == expected, (chunk, block)

    table = pa.table({"text": [words(rng, 20) if i % 7 else None for i in range(1000)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=64)
    size = (tmp_path / "t.parquet").stat().st_size
    pieces = inputs.cut(str(tmp_path / "t.parquet"), size, 1500)
    assert len(pieces) > 5
    got = [(key, text) for p in pieces for key, text, _ in inputs.records(p, "text", None, 1 << 16)]
    assert got == [(i, t or "") for i, t in enumerate(table.column("text").to_pylist())]


def test_a_recursive_glob_reads_other_files_as_plain_text_documents(tmp_path):
    rng = random.Random(1)
    for i, sub in enumerate(["a", "a/b", "c"]):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"m{i}.py").write_text(words(rng, 400))
        (tmp_path / sub / f"m{i}.txt").write_text("not matched by the glob")
    manifest = prepare(str(tmp_path / "out"), PrepareConfig(source="text", inputs=[f"{tmp_path}/**/*.py"], seq_len=16,
                                                            vocab_size=300, val_fraction=0.3))
    assert manifest["documents"] == 3 and manifest["bad_records"]["count"] == 0


def write_corpus(folder: Path) -> list[str]:
    """About 2.5 MB of mixed inputs: a .jsonl cut into many pieces (12 bad lines), a Parquet file of many row
    groups, a folder of small .txt files and nested .py files through a glob."""
    rng = random.Random(2)
    (folder / "notes").mkdir(parents=True)
    lines = [json.dumps({"text": words(rng, rng.randint(5, 200))}) for _ in range(3000)]
    for i in range(0, 3000, 250):
        lines[i] = "{not json"
    (folder / "big.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [words(rng, 60) for _ in range(1500)]}), folder / "rows.parquet",
                   row_group_size=100)
    for i in range(20):
        (folder / "notes" / f"note{i:02d}.txt").write_text(words(rng, 300))
    (folder / "pkg" / "sub").mkdir(parents=True)
    for i in range(10):
        (folder / "pkg" / ("sub" if i % 2 else "") / f"mod{i}.py").write_text(words(rng, 500))
    return [str(folder / "big.jsonl"), str(folder / "rows.parquet"), str(folder / "notes"), f"{folder}/pkg/**/*.py"]


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_one_and_four_tasks_write_the_same_bytes(ray_cluster, tmp_path):
    corpus = write_corpus(tmp_path / "in")
    policy = DataConfig(max_bad_fraction=0.01)
    cfg = PrepareConfig(source="text", inputs=corpus, seq_len=32, vocab_size=400, max_memory_mb=16, rows_per_group=50)
    outs = {}
    for parallel in (1, 4):
        memory: dict = {}
        manifest = prepare(str(tmp_path / f"p{parallel}"), cfg.model_copy(update={"parallel": parallel}), policy,
                           memory)
        outs[parallel] = files(tmp_path / f"p{parallel}")
        assert memory["tasks"] > 4  # the 512 KB pieces of 16 MB, twice (check, then tokenize)
    assert outs[1] == outs[4]
    assert manifest["bad_records"]["count"] == 12 and len(manifest["splits"]["train"]["files"]) > 1
    assert manifest["documents"] == 3000 - 12 + 1500 + 20 + 10

    # under `fail` both stop at the same record: the first bad one in input order
    errors = []
    for parallel in (1, 4):
        with pytest.raises(ConfigError) as err:
            prepare(str(tmp_path / f"f{parallel}"), cfg.model_copy(update={"parallel": parallel}),
                    DataConfig(on_bad_record="fail"))
        errors.append(str(err.value))
        assert not (tmp_path / f"f{parallel}" / "manifest.json").exists()
    assert errors[0] == errors[1] and f"{corpus[0]}:1:" in errors[0]


def test_the_driver_and_every_task_stay_within_max_memory_mb_on_a_larger_corpus(ray_cluster, tmp_path):
    rng = random.Random(3)
    pool = "\n".join(json.dumps({"text": words(rng, rng.randint(20, 400))}) for _ in range(2000)) + "\n"
    for folder, files, copies in (("small", 1, 1), ("large", 4, 5)):
        (tmp_path / folder).mkdir()
        for i in range(files):
            (tmp_path / folder / f"part{i}.jsonl").write_text(pool * copies)
    cfg = PrepareConfig(source="text", inputs=[str(tmp_path / "small")], seq_len=64, vocab_size=400, max_memory_mb=16,
                        parallel=2)
    # Once first: what the driver and the tasks' processes take on first use (libraries' code, allocators, Ray's
    # client) is start-up, not data.
    prepare(str(tmp_path / "warm"), cfg)
    memory: dict = {}
    manifest = prepare(str(tmp_path / "out"), cfg.model_copy(update={"inputs": [str(tmp_path / "large")]}),
                       DataConfig(), memory)
    corpus_mb = sum(p.stat().st_size for p in (tmp_path / "large").iterdir()) / 2 ** 20
    assert corpus_mb > 2.5 * cfg.max_memory_mb and manifest["documents"] == 4 * 5 * 2000
    # all at once would take the corpus many times over (its text, then ~100 bytes a token while tokenizing)
    assert memory["driver_added_mb"] < cfg.max_memory_mb, memory
    assert memory["task_added_mb"] < cfg.max_memory_mb, memory
