"""Reading bytes from local paths and s3:// URIs, with one set of S3 settings.

The settings are conf's `storage.s3` as a plain dict (endpoint, region, access_key_id,
secret_access_key, allow_http); the same dict gives Lance its `storage_options`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _credentials(s3: dict) -> tuple[str | None, str | None]:
    return (s3.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID"),
            s3.get("secret_access_key") or os.environ.get("AWS_SECRET_ACCESS_KEY"))


def lance_storage_options(s3: dict) -> dict[str, str]:
    """conf's storage.s3 as Lance/LanceDB `storage_options` (object_store keys)."""
    key, secret = _credentials(s3)
    opts = {"aws_region": s3.get("region") or "us-east-1"}
    if s3.get("endpoint"):
        opts["aws_endpoint"] = s3["endpoint"]
    if s3.get("allow_http"):
        opts["allow_http"] = "true"
    if key:
        opts["aws_access_key_id"] = key
    if secret:
        opts["aws_secret_access_key"] = secret
    return opts


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint, region, key, secret, allow_http) -> pafs.S3FileSystem:
    kwargs = dict(region=region or "us-east-1", access_key=key, secret_key=secret)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or ("http" if allow_http else "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str, s3: dict | None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or an s3:// URI."""
    if is_s3(uri):
        s3 = s3 or {}
        key, secret = _credentials(s3)
        fs = _s3_filesystem(s3.get("endpoint"), s3.get("region"), key, secret, bool(s3.get("allow_http")))
        return fs, uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def read_bytes(uri: str, s3: dict | None) -> bytes:
    fs, path = filesystem(uri, s3)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, s3: dict | None) -> None:
    fs, path = filesystem(uri, s3)
    if not is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def copy_dir(src: str, dst: str, s3: dict | None) -> None:
    """Copies a folder between local paths and s3:// URIs (either side), replacing files of the same name."""
    sfs, spath = filesystem(src, s3)
    dfs, dpath = filesystem(dst, s3)
    if not is_s3(dst):
        os.makedirs(dpath, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def local_copy(uri: str, s3: dict | None, cache_dir: str) -> str:
    """A local folder holding `uri`'s files: the path itself when local, else a download
    into `cache_dir` (from_pretrained reads local folders only)."""
    if not is_s3(uri):
        return uri
    dst = os.path.join(cache_dir, uri[len("s3://"):].replace("/", "_"))
    copy_dir(uri, dst, s3)
    return dst


def read_json(uri: str, s3: dict | None):
    """A small JSON file (run state, checkpoint configs), or None when there is none."""
    import json

    try:
        return json.loads(read_bytes(uri, s3))
    except (FileNotFoundError, OSError):
        return None


def create_exclusive(uri: str, data: bytes, s3: dict | None) -> bool:
    """Writes `uri` only if it does not exist yet, atomically; False if it existed.

    Locally an O_EXCL create; on S3 a conditional PUT (If-None-Match: *), which S3 and
    MinIO honour: of two writers racing, exactly one wins.
    """
    if is_s3(uri):
        import boto3
        from botocore.exceptions import ClientError

        s3 = s3 or {}
        key, secret = _credentials(s3)
        client = boto3.client(
            "s3",
            endpoint_url=s3.get("endpoint"),
            region_name=s3.get("region") or "us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )
        bucket, _, name = uri[len("s3://") :].partition("/")
        try:
            client.put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                return False
            raise
        return True
    path = os.path.abspath(uri.removeprefix("file://"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def delete_file(uri: str, s3: dict | None) -> None:
    fs, path = filesystem(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
