"""Shared fixtures: one local Ray cluster and one S3 endpoint (moto, loopback) per session."""

from __future__ import annotations

import os
import uuid

import pytest

from factory import storage


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server on 127.0.0.1, reached through the same client code as AWS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION")}
    # Set before Ray starts so that its workers inherit them, as nodes of a real cluster
    # inherit their instance credentials.
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    storage.s3_filesystem.cache_clear()
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.s3_filesystem.cache_clear()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A local Ray cluster shared by the end-to-end tests (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
