"""The one seam for user data: local folders and buckets read and write alike, and every
problem is a line that names the URI (a real S3 API server on loopback, moto's)."""

from __future__ import annotations

import json

import pytest

from pixfleet import storage
from pixfleet.config import ConfigError
from pixfleet.storage import Location, StorageError, check_readable, check_writable, redact
from tests.conftest import _free_port, start_s3_server

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_files_are_written_whole_listed_read_and_deleted_alike(kind, bucket, tmp_path):
    root = Location.of(bucket if kind == "s3" else str(tmp_path)) / "job"
    (root / "images" / "b.png").write_bytes(b"bb")
    (root / "images" / "a.png").write_bytes(b"a")
    (root / "images" / "sub" / "c.PNG").write_bytes(b"ccc")
    (root / ".hidden" / "d.png").write_bytes(b"d")
    (root / "notes.txt").write_text("hello")

    assert [f.relative_to(root) for f in root.files((".png",))] == ["images/a.png", "images/b.png", "images/sub/c.PNG"]
    assert [f.name for f in (root / "images").files(recursive=False)] == ["a.png", "b.png"]
    assert [f.name for f in root.subfolders()] == [".hidden", "images"]
    assert (root / "images" / "b.png").read_bytes() == b"bb" and (root / "notes.txt").read_text() == "hello"
    assert (root / "images" / "sub" / "c.PNG").read_range(1, 10) == b"cc"
    assert root.is_dir() and (root / "notes.txt").is_file() and not (root / "gone").exists()
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []  # local writes leave no temp file behind

    (root / "notes.txt").delete()
    (root / "notes.txt").delete()  # a missing file is fine
    assert not (root / "notes.txt").exists()
    with pytest.raises(StorageError, match=r"job/notes\.txt: no such file"):
        (root / "notes.txt").read_bytes()


def test_a_relative_path_is_made_absolute_where_it_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = Location.of("outputs/run")
    assert location.is_local and location.uri == str(tmp_path / "outputs" / "run")
    assert Location.of("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert Location.of("s3://bucket/a").resolve("x/y.png").uri == "s3://bucket/a/x/y.png"
    assert Location.of("s3://bucket/a").resolve("s3://other/z.png").uri == "s3://other/z.png"
    assert Location.of(str(tmp_path)).resolve("/abs/p.png").uri == "/abs/p.png"


def test_credentials_stay_out_of_uris_and_messages():
    assert redact("s3://KEY:SECRET@bucket/key") == "s3://bucket/key"
    with pytest.raises(StorageError, match=r"s3://bucket/key: put credentials in the environment") as raised:
        Location.of("s3://KEY:SECRET@bucket/key")
    assert "SECRET" not in str(raised.value)


def test_a_missing_bucket_or_key_is_named_before_any_work(bucket):
    with pytest.raises(ConfigError, match=r"^source\.path: s3://no-such-bucket-here/rows\.jsonl: no such bucket$"):
        check_readable("s3://no-such-bucket-here/rows.jsonl", "source.path")
    with pytest.raises(ConfigError, match=rf"^source\.path: {bucket}/missing\.jsonl: no such file or folder$"):
        check_readable(f"{bucket}/missing.jsonl", "source.path")
    with pytest.raises(ConfigError, match=r"^sink\.output_dir: s3://no-such-bucket-here/out/\.pixfleet-write-check"):
        check_writable("s3://no-such-bucket-here/out", "sink.output_dir")
    assert check_writable(f"{bucket}/out", "sink.output_dir").files() == []  # the probe is gone again


def test_a_read_only_key_cannot_be_an_output(monkeypatch):
    """A second S3 server that checks every request against its IAM users: one user may only
    read. With that user's key a job's output check fails naming the URI and the reason."""
    import boto3

    endpoint = f"http://127.0.0.1:{_free_port()}"
    server = start_s3_server(endpoint, {"INITIAL_NO_AUTH_ACTION_COUNT": "5"})
    try:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        boto3.client("s3", **admin).create_bucket(Bucket="guarded")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        read_only = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [read_only]}
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]

        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        storage._s3.cache_clear()
        check_readable("s3://guarded", "source.path")
        with pytest.raises(ConfigError, match=r"^sink\.output_dir: s3://guarded/out/.*cannot write \(access denied"):
            check_writable("s3://guarded/out", "sink.output_dir")
    finally:
        storage._s3.cache_clear()
        server.terminate()
        server.wait(timeout=30)


def test_missing_credentials_are_refused_with_the_reason(bucket, monkeypatch):
    (Location.of(bucket) / "rows.jsonl").write_text("{}\n")
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    storage._s3.cache_clear()
    try:
        with pytest.raises(ConfigError, match=rf"^source\.path: {bucket}/rows\.jsonl: access denied \(check the"):
            check_readable(f"{bucket}/rows.jsonl", "source.path")
    finally:
        storage._s3.cache_clear()


def test_a_store_folder_is_fetched_once_per_node_for_libraries_that_need_paths(bucket):
    model = Location.of(bucket) / "models" / "tiny"
    (model / "config.json").write_text('{"a": 1}')
    (model / "unet" / "weights.bin").write_bytes(b"w" * 100)
    first = model.cached_copy()
    assert (first / "config.json").read_text() == '{"a": 1}' and (first / "unet" / "weights.bin").stat().st_size == 100
    assert model.cached_copy() == first  # the same files: the same folder, not fetched again
    (model / "config.json").write_text('{"a": 22}')  # changed: fetched again
    assert (model.cached_copy() / "config.json").read_text() == '{"a": 22}'
