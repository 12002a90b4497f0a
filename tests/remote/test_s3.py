"""Checkpoints in S3: moto's S3 server (Debian 13's python3-moto), started on loopback by
the tests and checking every request's SigV4 signature, staged and checked with boto3.
Skipped where moto is not installed (Debian 12 has no package): the Debian 13 phase of
.ci/run runs them."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers  # noqa: E402
from servers import one_line_error  # noqa: E402

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


def write_source(path, mib, seed):
    import json
    import random
    import struct
    data = random.Random(seed).randbytes(mib << 20)
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data + struct.pack("<2f", 1.5, -2.0))


PARTS = {"TENSORMAP_REMOTE_PART_BYTES": str(5 << 20)}


def test_a_save_to_s3_is_a_multipart_upload_with_the_bytes_of_a_local_save(store, tmp_path):
    s3, _ = store
    source = tmp_path / "in.safetensors"
    write_source(source, 12, 1)
    for ext in (".tmap", ".safetensors"):
        key = f"saved/model{ext}"
        r = cli(s3, "convert", str(source), f"s3://{BUCKET}/{key}", env=PARTS)
        assert r.returncode == 0, r.stderr
        local = tmp_path / f"local{ext}"
        assert cli(s3, "convert", str(source), str(local)).returncode == 0
        assert s3.get(key) == open(local, "rb").read(), ext
        assert cli(s3, "verify", f"s3://{BUCKET}/{key}").returncode == 0
    assert s3.uploads() == []


def test_saves_s3_cannot_take_are_refused_before_anything_is_written(store, tmp_path):
    s3, _ = store
    source = tmp_path / "in.safetensors"
    write_source(source, 1, 2)
    before = s3.keys()
    r = cli(s3, "convert", str(source), f"s3://{BUCKET}/saved/x.pt")
    assert one_line_error(r, "InvalidArgument", "torch.save archives are written to local files only"), r.stderr
    r = cli(s3, "convert", str(source), "http://127.0.0.1:1/x.tmap")
    assert one_line_error(r, "InvalidArgument", "s3://"), r.stderr
    r = cli(s3, "convert", str(source), "s3://no-such-bucket-here/x.tmap")
    assert one_line_error(r, "RemoteNotFound", "s3://no-such-bucket-here/x.tmap", "NoSuchBucket"), r.stderr
    r = cli(s3, "convert", str(source), f"s3://{BUCKET}/saved/y.tmap", env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert one_line_error(r, "RemoteAccessDenied", "SignatureDoesNotMatch"), r.stderr
    assert s3.keys() == before and s3.uploads() == []


def test_an_interrupted_save_aborts_its_upload_and_keeps_the_old_object(store, tmp_path):
    import signal
    import time
    s3, _ = store
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    write_source(old, 1, 3)
    write_source(new, 96, 4)
    key = "saved/interrupted.safetensors"
    s3.put(key, old)
    for sig in (signal.SIGINT, signal.SIGTERM):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(s3.env, TENSORMAP_REMOTE_CONNECTIONS="1", **PARTS)
        p = subprocess.Popen([CLI, "convert", str(new), f"s3://{BUCKET}/{key}"], stderr=subprocess.PIPE,
                             text=True, env=env)
        deadline = time.monotonic() + 30
        while p.poll() is None and not s3.uploads() and time.monotonic() < deadline:
            time.sleep(0.01)
        caught = p.poll() is None
        p.send_signal(sig)
        err = p.communicate(timeout=60)[1]
        assert caught and p.returncode == 1 and f"stopped by {sig.name}" in err, (caught, p.returncode, err)
        assert s3.uploads() == [], "the upload was not aborted"
        assert s3.get(key) == open(old, "rb").read()


def test_a_kill_during_a_save_leaves_the_old_object_or_the_new_one(store, tmp_path):
    import random
    import signal
    s3, _ = store
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    write_source(old, 1, 5)
    write_source(new, 16, 6)
    local_new = tmp_path / "new_saved.safetensors"
    assert cli(s3, "convert", str(new), str(local_new)).returncode == 0
    old_bytes, new_bytes = open(old, "rb").read(), open(local_new, "rb").read()
    key = "saved/killed.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env, **PARTS)
    seen = set()
    for delay in [0.0, 0.05, 0.2] + [random.Random(9).uniform(0.05, 2.0) for _ in range(5)] + [30]:
        s3.put(key, old)
        p = subprocess.Popen([CLI, "convert", str(new), f"s3://{BUCKET}/{key}"], stderr=subprocess.DEVNULL, env=env)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        now = s3.get(key)
        assert now in (old_bytes, new_bytes), f"a kill after {delay:.2f} s left {len(now)} bytes, neither object"
        seen.add(now == new_bytes)
        for upload in s3.uploads():  # what kill -9 leaves: an upload nothing completes (S3's lifecycle rules end it)
            s3.s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
    assert seen == {False, True}, "every kill landed on the same side"


def test_a_sharded_save_uploads_its_shards_then_its_index(store, tmp_path):
    s3, _ = store
    import json
    import random
    import struct
    source = tmp_path / "in.safetensors"
    rnd = random.Random(7)
    blobs = {name: rnd.randbytes(4 << 20) for name in ("a", "b", "c")}
    header, at = {}, 0
    for name, blob in blobs.items():
        header[name] = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [at, at + len(blob)]}
        at += len(blob)
    text = json.dumps(header).encode()
    open(source, "wb").write(struct.pack("<Q", len(text)) + text + b"".join(blobs.values()))
    index = f"s3://{BUCKET}/sharded/model.tmap.index.json"
    r = cli(s3, "convert", str(source), index, "--shard-size", "5M", env=PARTS)
    assert r.returncode == 0, r.stderr
    first = [k for k in s3.keys() if k.startswith("sharded/")]
    assert "sharded/model.tmap.index.json" in first and len(first) == 4, first  # 3 shards and the index
    assert cli(s3, "verify", index).returncode == 0
    assert cli(s3, "diff", index, str(source)).returncode == 0
    # Saved again in other shards: the new index names only new shards, the old are gone.
    r = cli(s3, "convert", str(source), index, "--shard-size", "9M", env=PARTS)
    assert r.returncode == 0, r.stderr
    second = [k for k in s3.keys() if k.startswith("sharded/")]
    assert len(second) == 3 and not (set(second) - {"sharded/model.tmap.index.json"}) & set(first), (first, second)
    assert cli(s3, "verify", index).returncode == 0 and s3.uploads() == []


def test_python_saves_to_and_loads_from_s3(store, tmp_path):
    try:
        import tensormap
        import torch
    except ImportError:
        pytest.skip("the Python package is not built")
    s3, _ = store
    old = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    os.environ.update(s3.env)
    try:
        model = torch.nn.Linear(512, 256)
        for ext in (".tmap", ".safetensors"):
            url = f"s3://{BUCKET}/python/model{ext}"
            tensormap.save(model, url)
            copy = torch.nn.Linear(512, 256)
            report = tensormap.load(copy, url)
            assert sorted(report.loaded) == ["bias", "weight"]
            assert torch.equal(copy.weight, model.weight) and torch.equal(copy.bias, model.bias)
        with pytest.raises(tensormap.Error) as e:
            tensormap.save(model, f"s3://{BUCKET}/python/model.pt")
        assert e.value.kind == "InvalidArgument"
        assert s3.uploads() == []
    finally:
        for k in list(os.environ):
            if k.startswith("AWS_"):
                del os.environ[k]
        os.environ.update(old)


MAPPED_OR_COPIED = r"""
import json, sys, torch, tensormap
path = sys.argv[1]
model = torch.nn.Linear(64, 64)
tensormap.load(model, path)  # mode "auto"
pointer, where = model.weight.data_ptr(), None
for line in open("/proc/self/maps"):
    span, _, _, _, _, *name = line.split(maxsplit=5)
    low, high = (int(x, 16) for x in span.split("-"))
    if low <= pointer < high:
        where = name[0].strip() if name else ""
reference = torch.load(sys.argv[2])
print(json.dumps({"mapping": where, "equal": all(torch.equal(getattr(model, k), v) for k, v in reference.items())}))
"""


@pytest.mark.skipif(not shutil.which("s3fs") or not os.path.exists("/dev/fuse"),
                    reason="s3fs (Debian 13's s3fs) or /dev/fuse is missing")
def test_auto_mode_copies_from_a_bucket_mounted_with_s3fs(store, tmp_path):
    """A FUSE filesystem can fail a page fault of a mapping at any time (SIGBUS), so auto
    mode copies from it; a local file is mapped. s3fs mounts moto's bucket for real."""
    try:
        import tensormap  # noqa: F401  (the code below runs it in a child)
        import torch
    except ImportError:
        pytest.skip("the Python package is not built")
    s3, _ = store
    reference = {"weight": torch.randn(64, 64), "bias": torch.randn(64)}
    torch.save(reference, tmp_path / "reference.pt")
    local = tmp_path / "linear.tmap"
    code = "import torch, tensormap, sys; tensormap.save(torch.load(sys.argv[1]), sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "reference.pt"), str(local)], check=True)
    s3.put("linear-on-fuse.tmap", local)  # at the top: s3fs needs no folder object
    mount = tmp_path / "bucket"
    mount.mkdir()
    secrets = tmp_path / "passwd"
    secrets.write_text(f"{s3.key}:{s3.secret}\n")
    os.chmod(secrets, 0o600)
    r = subprocess.run(["s3fs", BUCKET, str(mount), "-o", f"url={s3.url}", "-o", "use_path_request_style",
                        "-o", f"passwd_file={secrets}", "-o", "endpoint=us-east-1", "-o", "ro",
                        # s3fs refuses to mount unless the disk keeps 10% of its size free
                        # beyond its write buffers; a read-only mount writes nothing
                        "-o", "ensure_diskfree=64", "-o", "parallel_count=1", "-o", "multipart_size=5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        deadline = time.time() + 10
        while not os.path.ismount(mount) and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.ismount(mount)
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(mount)], capture_output=True, text=True).stdout.strip()
        assert "fuse" in fs, fs

        def load(path):
            r = subprocess.run([sys.executable, "-c", MAPPED_OR_COPIED, str(path), str(tmp_path / "reference.pt")],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        on_fuse = load(mount / "linear-on-fuse.tmap")
        assert on_fuse["equal"] and on_fuse["mapping"] is not None
        assert "linear-on-fuse.tmap" not in on_fuse["mapping"], on_fuse  # copied: the weight is in memory of its own
        on_disk = load(local)
        assert on_disk["equal"] and on_disk["mapping"] == str(local), on_disk  # the control: mapped
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
