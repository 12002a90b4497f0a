"""Checkpoints in S3: moto's S3 server (Debian 13's python3-moto), started on loopback by
the tests and checking every request's SigV4 signature, staged and checked with boto3.
Skipped where moto is not installed (Debian 12 has no package): the Debian 13 phase of
.ci/run runs them."""
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers  # noqa: E402

try:
    import boto3  # noqa: F401
    import moto.server  # noqa: F401
    import flask_cors  # noqa: F401
except ImportError:
    pytest.skip("moto's S3 server is not installed (Debian 13: python3-moto python3-flask-cors)",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.environ.get("TENSORMAP_CLI", os.path.join(ROOT, "build", "tensormap"))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "torch_save", "state_dict.pt")
BUCKET = servers.Moto.BUCKET


def cli(store, *args, env=None, drop=()):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full.update(store.env, TENSORMAP_REMOTE_CHUNK_BYTES=str(64 << 10), TENSORMAP_REMOTE_RETRIES="1")
    full.update(env or {})
    for name in drop:
        full.pop(name, None)
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=full, timeout=120)


def one_line_error(r, kind, *words):
    lines = r.stderr.strip().splitlines()
    return (r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"tensormap: {kind}: ")
            and all(w in lines[0] for w in words))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    local = tmp_path_factory.mktemp("s3")
    store = servers.Moto()
    made = []
    for dst, extra in (("sd.tmap", []), ("sd.safetensors", []), ("sd.tmap.index.json", ["--shard-size", "1K"])):
        r = subprocess.run([CLI, "convert", FIXTURE, str(local / dst), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    shutil.copy(FIXTURE, local / "state_dict.pt")
    for name in sorted(os.listdir(local)):
        store.put(f"models/{name}", local / name)
        made.append(name)
    yield store, local
    store.stop()


@pytest.mark.parametrize("name", ["sd.tmap", "sd.safetensors", "sd.tmap.index.json", "state_dict.pt"])
def test_every_format_reads_from_s3_signed(store, tmp_path, name):
    s3, local = store
    url = f"s3://{BUCKET}/models/{name}"
    assert cli(s3, "verify", url).returncode == 0
    r = cli(s3, "diff", url, str(local / name))
    assert r.returncode == 0, r.stderr
    assert cli(s3, "convert", url, str(tmp_path / "a.safetensors")).returncode == 0
    assert cli(s3, "convert", str(local / name), str(tmp_path / "b.safetensors")).returncode == 0
    assert open(tmp_path / "a.safetensors", "rb").read() == open(tmp_path / "b.safetensors", "rb").read()


def test_s3_failures_name_the_url_and_never_a_secret(store):
    s3, _ = store
    url = f"s3://{BUCKET}/models/sd.tmap"
    r = cli(s3, "inspect", url, env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert one_line_error(r, "RemoteAccessDenied", url, "SignatureDoesNotMatch", "AWS_ACCESS_KEY_ID"), r.stderr
    assert "not-the-secret" not in r.stderr and s3.secret not in r.stderr
    r = cli(s3, "inspect", url, drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    assert one_line_error(r, "RemoteAccessDenied", url, "anonymous"), r.stderr
    missing = f"s3://{BUCKET}/models/none.tmap"
    assert one_line_error(cli(s3, "inspect", missing), "RemoteNotFound", missing, "NoSuchKey")
    nobucket = "s3://no-such-bucket-here/models/sd.tmap"
    assert one_line_error(cli(s3, "inspect", nobucket), "RemoteNotFound", nobucket, "NoSuchBucket")
    r = cli(s3, "inspect", url, env={"AWS_ENDPOINT_URL": "ftp://127.0.0.1/"})
    assert one_line_error(r, "InvalidArgument", "AWS_ENDPOINT_URL"), r.stderr
    r = cli(s3, "inspect", url, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{servers.free_port()}"})
    assert one_line_error(r, "RemoteUnreachable", url, "cannot connect"), r.stderr


def test_the_s3_endpoint_variable_wins_over_the_general_one(store):
    s3, _ = store
    r = cli(s3, "verify", f"s3://{BUCKET}/models/sd.tmap",
            env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_S3": s3.url})
    assert r.returncode == 0, r.stderr
