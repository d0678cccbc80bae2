"""What `data prepare` reads: inputs (files, folders, globs, local or s3://) listed in a stable order, cut into
pieces of bounded size, and each piece's records read as a stream, so no process holds more than a piece.

A piece of a .jsonl file holds the lines that start in its byte range (its edges move forward to the next line
break), a piece of a .parquet file the row groups that start in it; any other file is one record. Pieces tile their
file exactly, so reading them one after another gives the records of the whole file, in order.
"""
from __future__ import annotations

import codecs
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypt import storage
from raypt.data import corpora
from raypt.schema import ConfigError

EXTENSIONS = {"text": (".txt", ".jsonl", ".parquet"), "images": (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp",
              ".tif", ".tiff", ".parquet"), "audio": (".wav", ".flac", ".aiff", ".au")}  # what a folder yields
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines breaks
PARQUET_ROWS = 1024  # rows decoded at once from a Parquet row group


@dataclass(frozen=True)
class Piece:
    uri: str
    reader: str  # "lines" (.jsonl), "column" (.parquet), "file" (the whole file), "source" (a file of a corpus)
    size: int  # of the whole file
    start: int = 0
    end: int = 0
    name: str = field(default="")  # of a whole-file record: its URI, or a corpus file's path in the corpus

    @property
    def bytes(self) -> int:
        return self.end - self.start


def glob_regex(pattern: str) -> re.Pattern:
    """`**/` spans any number of folders (none included), `*` and `?` stay within one, `[...]` is a class."""
    out = []
    for token in re.split(r"(\*\*/|\*|\?|\[!?[^]]+\])", pattern):
        if token in ("**/", "*", "?"):
            out.append({"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}[token])
        elif len(token) > 2 and token[0] == "[" and token[-1] == "]":
            out.append("[^" + re.escape(token[2:-1]) + "]" if token[1] == "!" else "[" + re.escape(token[1:-1]) + "]")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out) + r"\Z")


def expand(inputs: list[str], extensions: tuple[str, ...], bad: Any) -> list[tuple[str, int]]:
    """(URI, size) of the files that inputs name: files, folders (recursively, files of `extensions`) and globs,
    local or s3://, in a stable order; an input that names none is a bad record."""
    found = []
    for item in inputs:
        fs, path = storage.resolve(item)
        prefix = item.split("://", 1)[0] + "://" if "://" in item else ""
        parts = path.split("/")
        wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
        base = "/".join(parts[:wild]) if wild is not None else path
        try:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.File:
                found.append((item, info.size))
                continue
            if info.type == pafs.FileType.NotFound:
                bad.add(item, "missing file or folder")
                continue
            # a glob lists its folder alone unless a wildcard names folders too (e.g. src/**/*.py)
            listed = fs.get_file_info(pafs.FileSelector(base, recursive=wild is None or wild < len(parts) - 1))
        except OSError as e:
            raise ConfigError(f"data.prepare.inputs: {storage.explain(item, e)}") from None
        match = glob_regex(path).match if wild is not None else None
        files = sorted((i.path, i.size) for i in listed if i.type == pafs.FileType.File
                       and (match(i.path) if match else i.path.lower().endswith(extensions)))
        if not files:
            bad.add(item, f"matches no {'/'.join(extensions)} file")
        found += [(prefix + f, size) for f, size in files]
    return found


def cut(uri: str, size: int, chunk: int) -> list[Piece]:
    """A file's pieces: byte ranges of about `chunk` bytes for .jsonl and .parquet, else the whole file."""
    reader = "lines" if uri.endswith(".jsonl") else "column" if uri.endswith(".parquet") else "file"
    if reader == "file":
        return [Piece(uri, reader, size, 0, size, uri)]
    edges = list(range(0, size, chunk)) + [size]
    return [Piece(uri, reader, size, a, b, uri) for a, b in zip(edges, edges[1:])] or [Piece(uri, reader, 0, 0, 0, uri)]


def corpus_pieces(source: str) -> list[Piece]:
    """Every file of a code corpus of the install, one piece each, in its sorted order."""
    root, files = corpora.source_files(source)
    sizes = [f.stat().st_size for f in files]
    return [Piece(str(f), "source", n, 0, n, str(f.relative_to(root))) for f, n in zip(files, sizes)]


def group(pieces: list[Piece], chunk: int) -> list[list[Piece]]:
    """Consecutive pieces in tasks of up to `chunk` bytes (a larger piece alone), so small files share a task."""
    tasks: list[list[Piece]] = []
    held = chunk
    for piece in pieces:
        if held + piece.bytes > chunk:
            tasks.append([])
            held = 0
        tasks[-1].append(piece)
        held += piece.bytes
    return tasks


def record_name(piece: Piece, key: int | None, first_line: int) -> str:
    """What names a record in bad-record lists and decides its split: a file's own name, `uri:line` (from 1) of a
    .jsonl line, `uri#row` (from 0) of a Parquet row; key None names the whole file."""
    if key is None or piece.reader in ("file", "source"):
        return piece.name
    return f"{piece.uri}:{first_line + key + 1}" if piece.reader == "lines" else f"{piece.uri}#{key}"


def is_validation(name: str, fraction: float) -> bool:
    """A stable, content-independent split by record name, so re-preparing never leaks val into train."""
    return zlib.crc32(name.encode()) % 10_000 < fraction * 10_000


def records(piece: Piece, text_field: str, binary_field: str | None, block: int) -> Iterator[tuple]:
    """(key, value, reason) of a piece's records in order: reason None for a good value, value None and a reason
    for a bad one, both None for a line that holds no record (blank). Text unless `binary_field` names the
    Parquet column of encoded media; keys are line numbers in the piece, rows of the file, or 0 for a file."""
    if piece.reader == "source":
        text = corpora.read_source(Path(piece.uri))
        if text is not None:
            yield 0, text, None
        return
    fs, path = storage.resolve(piece.uri)
    if piece.reader == "column":
        yield from column(fs, path, piece, binary_field or text_field, "binary" if binary_field else "string")
        return
    if piece.reader == "file":
        with fs.open_input_stream(path) as f:
            data = f.read()
        yield 0, data if binary_field else data.decode("utf-8", errors="replace"), None
        return
    for i, line in enumerate(lines(fs, path, piece, block)):
        if not line.strip():
            yield i, None, None
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            yield i, None, "not a JSON line"
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
            yield i, None, f"schema mismatch: no string field '{text_field}'"
            continue
        yield i, doc[text_field], None


def line_start(f: pa.NativeFile, offset: int, size: int, block: int) -> int:
    """Where the first line that starts at or after `offset` begins (right after a b'\\n'; `size` if none does)."""
    if offset in (0, size):
        return offset
    f.seek(offset - 1)
    at = offset - 1
    while data := f.read(block):
        hit = data.find(b"\n")
        if hit >= 0:
            return at + hit + 1
        at += len(data)
    return size


def lines(fs: pafs.FileSystem, path: str, piece: Piece, block: int) -> Iterator[str]:
    """The lines (as str.splitlines cuts them) of a .jsonl piece, read `block` bytes at a time. Edges sit right
    after a b'\\n', which no UTF-8 character or line break spans, so decoding and cutting each piece alone gives
    what the whole file would."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with fs.open_input_file(path) as f:
        begin, stop = (line_start(f, edge, piece.size, block) for edge in (piece.start, piece.end))
        f.seek(begin)
        carry, left = "", stop - begin
        while left > 0:
            data = f.read(min(block, left))
            left -= len(data)
            parts = (carry + decoder.decode(data, final=left <= 0 or not data)).splitlines(keepends=True)
            last = parts[-1] if parts else ""
            # a last line without its break continues in the next block (so may a '\r' of '\r\n')
            carry = parts.pop() if data and left > 0 and (last[-1:] not in LINE_BREAKS or last[-1:] == "\r") else ""
            yield from (p.splitlines()[0] for p in parts)
            if not data:
                break


def column(fs: pafs.FileSystem, path: str, piece: Piece, name: str, kind: str) -> Iterator[tuple]:
    """(row, value, reason) of a Parquet piece's string or binary column; an unreadable file or one without
    such a column is one bad record, named by its first piece alone."""
    first = piece.start == 0
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except pa.ArrowException as e:
        if first:
            yield None, None, f"unreadable Parquet ({piece.size} bytes): {str(e).splitlines()[0]}"
        return
    checks: tuple[Callable, ...] = (pa.types.is_string, pa.types.is_large_string) if kind == "string" else (
        pa.types.is_binary, pa.types.is_large_binary)
    schema = pf.schema_arrow
    ftype = schema.field(name).type if name in schema.names else None
    if ftype is None or not any(check(ftype) for check in checks):
        if first:
            yield None, None, f"schema mismatch: no {kind} column '{name}' (has {schema})"
        return
    row, groups = 0, []
    for i in range(pf.metadata.num_row_groups):
        meta = pf.metadata.row_group(i)
        chunk = meta.column(0)
        begins = min((o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o), default=0)
        if piece.start <= begins < piece.end:
            groups.append((i, row))
        row += meta.num_rows
    for i, row in groups:
        for batch in pf.iter_batches(PARQUET_ROWS, row_groups=[i], columns=[name]):
            for value in batch.column(0).to_pylist():
                yield row, value or ("" if kind == "string" else b""), None
                row += 1
