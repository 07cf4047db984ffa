"""Model start-up failures: bounded retries in the actor, then one clear line, never a hang.

Without them Ray Data 2.60 ends the build at the first actor whose constructor raises
(it replaces none: ``max_consecutive_actor_init_deaths`` is 0) and the driver prints
Ray's multi-page traceback; a transient failure (a download refused once) kills the build.
"""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import ray
from conftest import TINY_BUILD
from s3_faults import build_through
from safetensors.torch import save_file

from factory.core.conventions import TINY
from factory.core.loading import ModelLoadError, load_with_retries, pipeline_failure
from factory.detection.maskrcnn import build_maskrcnn
from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import recipe_from_args
from jobs import build_dataset

REPO = Path(__file__).resolve().parents[2]


def test_a_transient_failure_is_retried_and_a_permanent_one_named_in_one_line():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset\nsecond line")
        return "model"

    assert load_with_retries("generator x", flaky, attempts=3, backoff=0) == "model" and len(calls) == 3

    calls.clear()
    with pytest.raises(ModelLoadError) as raised:
        load_with_retries("generator s3://b/sd", flaky, attempts=2, backoff=0)
    assert str(raised.value) == "cannot load generator s3://b/sd (2 attempt(s)): OSError: connection reset"
    assert len(calls) == 2


def test_a_failure_that_would_fail_again_is_not_retried():
    calls = []

    def wrong_shape():
        calls.append(1)
        raise ValueError("the weights do not fit tiny: 26 tensors differ\n...")

    with pytest.raises(ModelLoadError) as raised:
        load_with_retries("labeler tiny weights /w", wrong_shape, attempts=3, backoff=60)
    assert str(raised.value) == "cannot load labeler tiny weights /w: ValueError: the weights do not fit tiny: 26 " \
                                "tensors differ"
    assert len(calls) == 1


def test_the_driver_finds_the_line_in_rays_error_text():
    text = ("The actor died because of an error raised in its creation task, ray::MapWorker(...)\n"
            '  File "factory/generate.py", line 136, in __init__\n'
            "factory.loading.ModelLoadError: cannot load generator /m (3 attempt(s)): OSError: bad header")
    found = pipeline_failure(RuntimeError(text))
    assert isinstance(found, ModelLoadError) and str(found) == "cannot load generator /m (3 attempt(s)): OSError: bad header"
    assert pipeline_failure(RuntimeError("ValueError: a bug")) is None  # others keep their traceback


def our_lines(stream: str) -> list[str]:
    return [line for line in stream.splitlines() if line.startswith("build_dataset:")]


def detector_weights(path: Path) -> Path:
    """The tiny detector's weights as a safetensors file: a real checkpoint the labeler loads."""
    state = build_maskrcnn(TINY, 64).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


# The labeler's weights are the model that fails here: a build with a real generator
# asks for a GPU, which this machine does not have.
@pytest.mark.slow
def test_a_model_that_never_loads_fails_the_build_in_one_line(ray_cluster, faulty_s3, tmp_path):
    """Weights corrupt on disk (the prepare-time check sees only that the file exists)."""
    weights = tmp_path / "detector.safetensors"
    weights.write_bytes(b"\x00" * 64)
    out = tmp_path / "ds"
    failed = build_through(faulty_s3, ["--out", str(out), *TINY_BUILD, "--labeler.weights", str(weights),
                                       "--pool.load-attempts", "2"],
                           tmp_path / "cache", ray.get_runtime_context().gcs_address, timeout=240)
    assert failed.returncode == 2, failed.stderr[-3000:]
    (line,) = our_lines(failed.stderr)
    assert line.startswith(f"build_dataset: error: cannot load labeler tiny weights {weights}: "), line  # not retried
    assert failed.stderr.strip().splitlines()[-1] == line  # the last thing printed (Ray logs its trace above)
    assert not list(out.glob("data/*.parquet")) and not (out / "manifest.json").exists()


@pytest.mark.slow
def test_a_model_download_refused_once_is_retried_and_the_build_completes(
        ray_cluster, faulty_s3, bucket, s3_endpoint, tmp_path):
    """The labeler's weights come from S3; their first download is refused with an error the
    S3 client does not retry (expired temporary credentials): the actor loads again and the
    build ends with every planned sample."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.upload_file(str(detector_weights(tmp_path / "detector.safetensors")), bucket, "models/detector.safetensors")
    faulty_s3.error(400, "ExpiredToken", times=1, method="GET", key="/models/detector.safetensors")
    args = ["--out", f"s3://{bucket}/ds", *TINY_BUILD, "--labeler.weights", f"s3://{bucket}/models/detector.safetensors"]

    done = build_through(faulty_s3, args, tmp_path / "cache", ray.get_runtime_context().gcs_address, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert faulty_s3.injected == [f"400 ExpiredToken on GET /{bucket}/models/detector.safetensors"]
    ids = []
    for entry in s3.list_objects_v2(Bucket=bucket, Prefix="ds/data/")["Contents"]:
        ids += pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read())
                             ).column("sample_id").to_pylist()
    planned = build_plan(recipe_from_args(build_dataset.parse_args(args)))
    assert sorted(ids) == sorted(s.sample_id for s in planned)
