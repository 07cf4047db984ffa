"""S3 faults against a real endpoint (moto's server behind tests/s3_faults.py's proxy).

Transient faults during the write phase are ridden out by the S3 client's retries and
lose nothing; a fault that outlasts them ends the build with one line and the same
command resumes to the exact plan; permanent refusals (missing bucket, unknown key, wrong
secret, no permission to write) stop the build before any model loads, with one line
that names no credential, and write nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import ray
import requests
from conftest import TINY_BUILD
from s3_faults import build_through

from factory.core import storage
from factory.pipeline import pipeline
from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import recipe_from_args
from jobs import build_dataset, verify_dataset

REPO = Path(__file__).resolve().parents[2]


def planned_ids(args: list[str]) -> list[str]:
    return [s.sample_id for s in build_plan(recipe_from_args(build_dataset.parse_args(args)))]


def our_lines(stream: str) -> list[str]:
    return [line for line in stream.splitlines() if line.startswith("build_dataset:")]


def stored_ids(s3, bucket: str, prefix: str) -> list[str]:
    """Sample ids of every Parquet object under the prefix, read straight from the store."""
    ids = []
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/data/").get("Contents", [])
    for entry in listing:
        if entry["Key"].endswith("/"):  # the folder marker pyarrow leaves when it deletes a folder's last file
            continue
        body = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        ids += pq.read_table(io.BytesIO(body)).column("sample_id").to_pylist()
    return ids


def assert_exact(s3, bucket: str, prefix: str, args: list[str], capsys) -> None:
    """Every planned id exactly once, in the manifest and in the store, and verify_dataset agrees."""
    planned = sorted(planned_ids(args))
    assert sorted(stored_ids(s3, bucket, prefix)) == planned
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    assert manifest["counts"]["planned"] == len(planned) == manifest["counts"]["written"]
    commits = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/_commits/")["Contents"]
    assert len(commits) == len(manifest["files"])
    assert verify_dataset.main([f"s3://{bucket}/{prefix}"]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_transient_faults_while_writing_lose_nothing(ray_cluster, faulty_s3, bucket, s3_endpoint, tmp_path, capsys):
    prefix = "datasets/flaky"
    parts, commits = "/data/part-", "/_commits/part-"
    faulty_s3.error(503, "SlowDown", times=2, method="PUT", key=parts)          # throttled
    faulty_s3.outage(3, method="PUT", key=parts, after=3)                       # endpoint restarts mid-write
    faulty_s3.error(500, "InternalError", times=1, method="PUT", key=commits)
    faulty_s3.lose_response(times=1, method="PUT", key=commits)                 # applied, reply lost: rewritten
    faulty_s3.reset(times=2, method="PUT", key=commits, after=3)                # connection resets
    faulty_s3.reset(times=1, method="GET", key="list-type=2", after=1)          # the driver's resume scan
    faulty_s3.error(503, "SlowDown", times=2, method="PUT", key="/manifest.json")
    armed = faulty_s3.pending()

    done = build_through(faulty_s3, ["--out", f"s3://{bucket}/{prefix}", *TINY_BUILD], tmp_path / "cache",
                         ray.get_runtime_context().gcs_address)
    assert done.returncode == 0, done.stderr[-3000:]
    print("faults injected:", *faulty_s3.injected, sep="\n  ")  # the record the closing note cites
    assert len(faulty_s3.injected) == armed and faulty_s3.pending() == 0
    assert_exact(boto3.client("s3", endpoint_url=s3_endpoint), bucket, prefix, TINY_BUILD, capsys)


@pytest.mark.slow
def test_a_fault_outlasting_the_retries_fails_in_one_line_and_the_rerun_resumes(
        ray_cluster, faulty_s3, bucket, s3_endpoint, tmp_path, capsys):
    """Writes refused after the first commit (a policy changed mid-build, which no retry
    cures): one line, exit 2; once it is fixed, the same command finishes the plan exactly."""
    prefix = "datasets/interrupted"
    small = [*TINY_BUILD, "--num-samples", "4", "--writer.rows-per-file", "2"]  # two parts
    args = ["--out", f"s3://{bucket}/{prefix}", *small]
    faulty_s3.error(403, "AccessDenied", times=1000, method="PUT", key="/_commits/part-", after=1)
    address = ray.get_runtime_context().gcs_address

    failed = build_through(faulty_s3, args, tmp_path / "cache", address)
    assert failed.returncode == 2, failed.stderr[-3000:]
    (line,) = our_lines(failed.stderr)
    assert line.startswith(f"build_dataset: error: cannot write s3://{bucket}/{prefix}/_commits/part-")
    assert "ACCESS_DENIED" in line and line.endswith("(committed parts are kept; the same command resumes)")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    committed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/_commits/").get("Contents", [])
    assert len(committed) == 1 and not s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/manifest.json").get(
        "Contents")

    faulty_s3.clear()
    resumed = build_through(faulty_s3, args, tmp_path / "cache", address)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 samples were already done; 2 made now" in resumed.stdout
    assert_exact(s3, bucket, prefix, small, capsys)


@pytest.fixture
def enforced_credentials(s3_endpoint, bucket):
    """The session's S3 endpoint checking signatures and IAM policies (moto's auth mode), with a
    user who may read the bucket but not write to it; yields (bucket, reader's key)."""
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    user = f"reader-{bucket}"
    iam.create_user(UserName=user)
    # moto names HeadBucket's action s3:HeadBucket; on AWS s3:ListBucket covers it.
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:HeadBucket"], "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0").raise_for_status()
    try:
        yield bucket, key
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"inf").raise_for_status()
        storage.s3_filesystem.cache_clear()


def test_refused_credentials_and_permissions_stop_the_build_before_any_model_loads(
        enforced_credentials, s3_endpoint, monkeypatch, capsys):
    bucket, reader = enforced_credentials
    monkeypatch.setattr(pipeline, "stream_samples", lambda *a, **k: pytest.fail("the pipeline started"))
    cases = [  # (key id, secret, the message's start)
        ("AKIAEXAMPLEUNKNOWN01", "s3cr3t-that-must-not-be-printed-00000000",
         f"no access to bucket {bucket!r} with these credentials"),
        (reader["AccessKeyId"], "wrong-secret-that-must-not-be-printed-0000",
         f"no access to bucket {bucket!r} with these credentials"),
        (reader["AccessKeyId"], reader["SecretAccessKey"], f"no permission to write to s3://{bucket}/ds"),
    ]
    causes = []
    for key_id, secret, start in cases:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage.s3_filesystem.cache_clear()
        assert build_dataset.main(["--out", f"s3://{bucket}/ds", *TINY_BUILD]) == 2
        (line,) = our_lines(capsys.readouterr().err)
        assert line.startswith(f"build_dataset: error: {start}"), line
        assert key_id not in line and secret not in line
        causes.append(line)
    assert "INVALID_ACCESS_KEY_ID" in causes[0]
    assert "SIGNATURE_DOES_NOT_MATCH" in causes[1]
    assert "ACCESS_DENIED" in causes[2]

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader["SecretAccessKey"])
    storage.s3_filesystem.cache_clear()
    assert build_dataset.main(["--out", "s3://no-such-bucket-here/ds", *TINY_BUILD]) == 2
    assert our_lines(capsys.readouterr().err) == ["build_dataset: error: bucket 'no-such-bucket-here' does not exist"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=reader["AccessKeyId"],
                      aws_secret_access_key=reader["SecretAccessKey"])
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)  # nothing written
