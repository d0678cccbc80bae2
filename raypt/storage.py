"""One way to reach a path, local or s3://, so every module reads and writes storage the same way."""
from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from typing import Iterator

import pyarrow.fs as pafs


S3_ATTEMPTS = 3


class StorageError(OSError):
    """Storage that cannot be reached or refuses us, said in words a user can act on (never with a secret)."""


class S3(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled with every option it was made with. pyarrow's own pickling drops the
    retry strategy (apache/arrow#47348, still so in pyarrow 26), and Ray Train pickles the filesystem the driver
    hands it (RunConfig.storage_filesystem) to its controller and workers."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.options = options

    def __reduce__(self) -> tuple:
        return functools.partial(S3, **self.options), ()


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None, bucket: str) -> S3:
    """Bounded retries and timeouts: an unreachable endpoint or refused credentials fail in seconds, never hang."""
    scheme, _, host = endpoint.partition("://") if endpoint else ("https", "", "")
    if not region and not endpoint:
        region = pafs.resolve_s3_region(bucket)
    return S3(endpoint_override=host or None, scheme=scheme, region=region or "us-east-1", connect_timeout=5,
              request_timeout=30, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


@contextmanager
def settings(env: dict[str, str]) -> Iterator[None]:
    """A job's S3 settings (its `s3:` section as AWS variables) for the duration of a check, leaving this
    process's environment as it was; the driver sets them for good when it runs the job."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; s3:// honours the standard AWS environment."""
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        env = os.environ
        return _s3(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                   env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"), path.split("/", 1)[0]), path
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def explain(uri: str, error: OSError) -> StorageError:
    """Turn the AWS SDK's error into what went wrong and what to check."""
    text = str(error)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Couldn't connect" in text:
        why = f"cannot reach the S3 endpoint {endpoint} (gave up after {S3_ATTEMPTS} attempts)"
    elif any(k in text for k in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        why = (f"{endpoint} refused the credentials; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or s3.profile")
    elif "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text or ("Bucket '" in text and "' not found" in text):
        why = f"the bucket does not exist at {endpoint}"
    else:
        why = text.splitlines()[0]
    return StorageError(f"'{uri}': {why}")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def copy_tree(src: str, dst: str) -> None:
    """A folder (or one file) from one place to another, local or s3://, replacing files of the same name.
    pyarrow's threaded copy deadlocked when it wrote more files to S3 than it has I/O threads (apache/arrow#15233,
    fixed by #44897 in pyarrow 19: pyproject.toml asks for 19 or newer)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    try:
        if isinstance(dst_fs, pafs.LocalFileSystem):  # pyarrow makes the folders below the top one, not the top
            folder = src_fs.get_file_info(src_path).type == pafs.FileType.Directory
            os.makedirs(dst_path if folder else os.path.dirname(dst_path), exist_ok=True)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise explain(src if "://" in src else dst, e) from None


def read_text(uri: str) -> str:
    """A file's text; FileNotFoundError when it is not there."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(uri) from None
        raise explain(uri, e) from None


def read_json(uri: str) -> dict:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: dict) -> None:
    write_text(uri, json.dumps(obj, indent=2))


def write_text(uri: str, text: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
