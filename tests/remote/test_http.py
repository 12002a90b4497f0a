"""Checkpoints over HTTP, against a real nginx the tests start on loopback (servers.py),
with a fault-injecting proxy in front of it for the failures a network has.

Run with pytest; TENSORMAP_CLI names the command line, and the Python package is used
where it imports (PYTHONPATH). Each failure must end as one line, exit 1, of the right
kind, naming the URL.
"""
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servers  # noqa: E402
from servers import one_line_error  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.environ.get("TENSORMAP_CLI", os.path.join(ROOT, "build", "tensormap"))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "torch_save", "state_dict.pt")
CHUNK = 256 << 10
BIG = 3 << 20  # bytes of the big tensor: 12 chunks


def cli(*args, env=None, timeout=120):
    full = dict(os.environ, TENSORMAP_REMOTE_CHUNK_BYTES=str(CHUNK), TENSORMAP_REMOTE_CONNECTIONS="4",
                TENSORMAP_REMOTE_RETRIES="2", TENSORMAP_REMOTE_TIMEOUT="5")
    full.pop("TENSORMAP_BEARER_TOKEN", None)
    full.pop("HF_TOKEN", None)
    full.update(env or {})
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=full, timeout=timeout)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """nginx serving every format: the fixture state dict as .tmap, .safetensors, sharded
    indexes and torch.save; a big file (one 3 MiB tensor and some small ones); a file with
    a header larger than the first request's 64 KiB; a copy behind a bearer token."""
    base = tmp_path_factory.mktemp("remote")
    root = base / "site"
    os.makedirs(root / "private")
    os.chmod(base, 0o755)
    rnd = random.Random(7)
    write_safetensors(root / "big.safetensors", {
        "big": ("F32", [BIG // 4], rnd.randbytes(BIG)),
        "small.a": ("F32", [3], rnd.randbytes(12)), "small.b": ("I64", [2, 2], rnd.randbytes(32))})
    write_safetensors(root / "wide.safetensors",
                      {f"layer.{i}.weight": ("F32", [4], rnd.randbytes(16)) for i in range(2500)})
    for src, dst, extra in (("big.safetensors", "big.tmap", []), ("wide.safetensors", "wide.tmap", []),
                            (FIXTURE, "sd.tmap", []), (FIXTURE, "sd.safetensors", []),
                            (FIXTURE, "sd.tmap.index.json", ["--shard-size", "1K"]),
                            (FIXTURE, "sd.safetensors.index.json", ["--shard-size", "1K"])):
        src_path = src if os.path.isabs(src) else str(root / src)
        r = subprocess.run([CLI, "convert", src_path, str(root / dst), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    shutil.copy(FIXTURE, root / "state_dict.pt")
    shutil.copy(root / "big.tmap", root / "private" / "big.tmap")
    corrupt = bytearray(open(root / "big.tmap", "rb").read())
    corrupt[-(BIG // 2)] ^= 0xFF  # a byte inside the big tensor's data
    open(root / "corrupt.tmap", "wb").write(corrupt)
    for dirpath, dirnames, filenames in os.walk(base):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    nginx = servers.Nginx(str(root), str(base / "nginx"), tls=True)
    yield nginx, root, base
    nginx.stop()


@pytest.mark.parametrize("name", ["sd.tmap", "sd.safetensors", "sd.tmap.index.json", "sd.safetensors.index.json",
                                  "state_dict.pt", "big.tmap", "big.safetensors"])
def test_every_format_reads_the_same_over_http_as_from_disk(site, tmp_path, name):
    nginx, root, _ = site
    url = f"{nginx.url}/{name}"
    for command in (["verify"], ["diff", str(root / name)]):
        r = cli(*command[:1], url, *command[1:])
        assert r.returncode == 0, (command, r.stderr)
    remote_out, local_out = tmp_path / "remote.safetensors", tmp_path / "local.safetensors"
    assert cli("convert", url, str(remote_out)).returncode == 0
    assert cli("convert", str(root / name), str(local_out)).returncode == 0
    assert open(remote_out, "rb").read() == open(local_out, "rb").read()
    local = cli("inspect", "--json", str(root / name)).stdout if not name.endswith((".json", ".pt")) else None
    if local:
        assert json.loads(cli("inspect", "--json", url).stdout)["tensors"] == json.loads(local)["tensors"]


def test_edit_puts_the_tensors_of_a_url(site, tmp_path):
    nginx, root, _ = site
    target = tmp_path / "edited.tmap"
    shutil.copy(root / "sd.tmap", target)
    r = cli("edit", str(target), "--remove", "0.weight", "--put", f"{nginx.url}/sd.safetensors")
    assert r.returncode == 0, r.stderr
    assert cli("diff", str(target), f"{nginx.url}/sd.tmap").returncode == 0
    assert cli("verify", str(target)).returncode == 0


def test_the_header_comes_in_one_or_two_requests(site):
    nginx, _, _ = site
    for name, requests in (("big.tmap", 1), ("wide.tmap", 2), ("big.safetensors", 1), ("wide.safetensors", 2)):
        nginx.clear_log()
        assert cli("inspect", f"{nginx.url}/{name}").returncode == 0
        log = nginx.requests()
        assert len(log) == requests, (name, log)
        assert all(status == 206 for status, _, _, _ in log), log


def test_tensor_bytes_come_in_concurrent_chunks_and_no_more(site):
    nginx, root, _ = site
    nginx.clear_log()
    assert cli("verify", f"{nginx.url}/big.tmap").returncode == 0
    log = nginx.requests()
    ranges = [rng for _, _, rng, _ in log]
    assert all(status == 206 for status, _, _, _ in log), log
    # The head (64 KiB), then the big tensor in chunks of 256 KiB; the small tensors lie
    # inside the head or in one more range each.
    chunked = [r for r in ranges[1:] if r.startswith("bytes=")]
    sizes = [int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for r in chunked]
    assert max(sizes) == CHUNK and sum(1 for s in sizes if s == CHUNK) >= BIG // CHUNK - 1, sizes
    sent = sum(b for _, b, _, _ in log)
    size = os.path.getsize(root / "big.tmap")
    assert sent < size + 64 * 1024 + 400 * len(log), (sent, size)


def test_a_corrupt_tensor_is_named_with_its_url(site):
    nginx, _, _ = site
    url = f"{nginx.url}/corrupt.tmap"
    r = cli("verify", url)
    assert r.returncode == 1 and "ChecksumMismatch" in r.stderr and "'big'" in r.stderr and url in r.stderr, r.stderr


def test_missing_object_denied_access_and_tokens(site):
    nginx, _, _ = site
    r = cli("inspect", f"{nginx.url}/nope.tmap")
    assert one_line_error(r, "RemoteNotFound", f"{nginx.url}/nope.tmap", "404"), r.stderr
    private = f"{nginx.url}/private/big.tmap"
    r = cli("inspect", private)
    assert one_line_error(r, "RemoteAccessDenied", private, "401", "no bearer token"), r.stderr
    for variable in ("TENSORMAP_BEARER_TOKEN", "HF_TOKEN"):
        r = cli("verify", private, env={variable: servers.TOKEN})
        assert r.returncode == 0, (variable, r.stderr)
        assert servers.TOKEN not in r.stdout + r.stderr
    r = cli("inspect", private, env={"HF_TOKEN": "wrong-token"})
    assert one_line_error(r, "RemoteAccessDenied", private) and "wrong-token" not in r.stderr, r.stderr


def test_https_trusts_the_system_certificates_or_the_bundle_named(site, tmp_path):
    nginx, root, _ = site
    url = f"{nginx.https_url}/big.tmap"
    r = cli("inspect", url)  # a private CA, which the system's certificates do not hold
    assert one_line_error(r, "RemoteUnreachable", url, "not trusted", "TENSORMAP_REMOTE_CA_BUNDLE"), r.stderr
    for variable in ("TENSORMAP_REMOTE_CA_BUNDLE", "AWS_CA_BUNDLE"):
        r = cli("verify", url, env={variable: nginx.ca})
        assert r.returncode == 0, (variable, r.stderr)
    out = tmp_path / "copy.tmap"
    r = cli("convert", url, str(out), env={"TENSORMAP_REMOTE_CA_BUNDLE": nginx.ca})
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (root / "big.tmap").read_bytes()
    missing = str(tmp_path / "no-such-bundle.pem")
    r = cli("inspect", url, env={"TENSORMAP_REMOTE_CA_BUNDLE": missing})
    assert one_line_error(r, "InvalidArgument", url, "cannot use the CA bundle", missing), r.stderr


def test_unreachable_servers_fail_fast_and_clearly():
    refused = f"http://127.0.0.1:{servers.free_port()}/x.tmap"
    started = time.time()
    r = cli("inspect", refused)
    assert one_line_error(r, "RemoteUnreachable", refused, "cannot connect", "3 tries"), r.stderr
    assert time.time() - started < 10
    unknown = "http://tensormap-test-host.invalid/x.tmap"
    r = cli("inspect", unknown, env={"TENSORMAP_REMOTE_TIMEOUT": "2"})
    assert one_line_error(r, "RemoteUnreachable", unknown), r.stderr
    r = cli("inspect", "s3://", env={})
    assert one_line_error(r, "InvalidArgument", "s3://bucket/key"), r.stderr


# (mode, broken requests, what a verify through the proxy gives, words of its message)
FAULTS = [
    ("drop", 1, 0, None),
    ("drop", None, "RemoteUnreachable", "3 tries"),
    ("503", 2, 0, None),
    ("503", None, "RemoteThrottled", "SlowDown"),
    ("short", 1, 0, None),
    ("short", None, "RemoteProtocol", "a body of"),
    ("ignore-range", None, "RemoteProtocol", "ignores Range requests (200 where 206 was asked); tensormap reads by "
     "ranges: serve the file with a server that answers them"),
    ("etag", None, "RemoteChanged", "ETag"),
]


@pytest.mark.parametrize("mode,fail,expect,words", FAULTS, ids=[f"{m}-{f}" for m, f, _, _ in FAULTS])
def test_faults_between_tensormap_and_the_server(site, mode, fail, expect, words):
    nginx, _, _ = site
    proxy = servers.FaultProxy(nginx.port, mode, fail=fail, after=1 if mode == "etag" else 0)
    try:
        url = f"{proxy.url}/big.tmap"
        r = cli("verify", url)
        if expect == 0:
            assert r.returncode == 0, r.stderr
            assert proxy.seen > fail  # it was broken, then retried
        else:
            assert one_line_error(r, expect, url, words), r.stderr
    finally:
        proxy.stop()


def test_a_stalled_response_times_out_and_is_retried(site):
    nginx, _, _ = site
    proxy = servers.FaultProxy(nginx.port, "stall", fail=None, stall=30, after=1)
    try:
        url = f"{proxy.url}/big.tmap"
        started = time.time()
        r = cli("verify", url, env={"TENSORMAP_REMOTE_TIMEOUT": "1", "TENSORMAP_REMOTE_RETRIES": "1"})
        assert one_line_error(r, "RemoteUnreachable", url, "stalled", "2 tries"), r.stderr
        assert time.time() - started < 20
    finally:
        proxy.stop()


def test_bad_settings_are_refused_by_name():
    r = cli("inspect", "http://127.0.0.1:1/x.tmap", env={"TENSORMAP_REMOTE_CONNECTIONS": "0"})
    assert one_line_error(r, "InvalidArgument", "TENSORMAP_REMOTE_CONNECTIONS"), r.stderr
    r = cli("inspect", "http://127.0.0.1:1/x.tmap", env={"TENSORMAP_REMOTE_CHUNK_BYTES": "8M"})
    assert one_line_error(r, "InvalidArgument", "TENSORMAP_REMOTE_CHUNK_BYTES"), r.stderr


try:
    import tensormap  # noqa: E402
    import torch  # noqa: E402
except ImportError:  # the command line alone was built
    tensormap = torch = None

needs_package = pytest.mark.skipif(tensormap is None, reason="the Python package is not built")


def same(a, b):
    """The same bytes (random bytes read as floats hold NaNs, which equal nothing)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes()


@needs_package
def test_python_reads_and_loads_from_a_url(site):
    nginx, root, _ = site
    with tensormap.open(f"{nginx.url}/big.tmap") as remote, tensormap.open(str(root / "big.tmap")) as local:
        assert remote.keys() == local.keys()
        for name in local.keys():
            assert same(remote.get_tensor(name), local.get_tensor(name)), name
        assert same(remote.get_slice("big")[1000:2000], local.get_tensor("big")[1000:2000])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Parameter(torch.zeros(BIG // 4))

    model = Model()
    report = tensormap.load(model, f"{nginx.url}/big.safetensors", strict=False)
    assert report.loaded == ["big"]
    with tensormap.open(str(root / "big.safetensors")) as local:
        assert same(model.big.detach(), local.get_tensor("big"))
    with pytest.raises(tensormap.Error) as e:
        tensormap.load(model, f"{nginx.url}/big.tmap", mode="map", strict=False)
    assert e.value.kind == "InvalidArgument" and "map mode has no meaning for a URL" in str(e.value)


def test_a_retry_asks_only_for_the_bytes_that_did_not_arrive(site):
    """A chunk's answer cut off halfway: the next try asks for the second half, not the
    whole chunk again (nginx's log shows what the proxy asked for on tensormap's behalf)."""
    nginx, _, _ = site
    proxy = servers.FaultProxy(nginx.port, "drop", fail=1, after=1)  # the first chunk after the head
    try:
        nginx.clear_log()
        r = cli("verify", f"{proxy.url}/big.tmap")
        assert r.returncode == 0, r.stderr
        spans = []
        for _, _, rng, _ in nginx.requests():
            first, last = rng.split("=")[1].split("-")
            spans.append((int(first), int(last)))
        cut = [(a, b) for a, b in spans[1:] if b - a + 1 == CHUNK]
        resumed = [(a, b) for a, b in spans if any(b == d and a == c + CHUNK // 2 for c, d in cut)]
        assert len(resumed) == 1, spans
        assert sum(b - a + 1 for a, b in spans) < os.path.getsize(nginx.root + "/big.tmap") + 64 * 1024 + CHUNK
    finally:
        proxy.stop()


@needs_package
def test_an_answer_for_another_version_writes_nothing_into_the_model(site):
    """Every answer after the first names another ETag: the load fails as RemoteChanged and
    the parameter keeps its values; no byte of those answers reached it."""
    nginx, _, _ = site
    proxy = servers.FaultProxy(nginx.port, "etag", after=1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Parameter(torch.full((BIG // 4,), 7.0))

    try:
        model = Model()
        with pytest.raises(tensormap.Error) as e:
            tensormap.load(model, f"{proxy.url}/big.tmap", strict=False)
        assert e.value.kind == "RemoteChanged", str(e.value)
        assert bool((model.big.detach() == 7.0).all()), "bytes of a changed object reached the tensor"
    finally:
        proxy.stop()


@needs_package
def test_checksums_follow_the_chunks_as_they_land_every_time(site):
    """The hash of a tensor follows its chunks in order as they land, on the reading
    thread. The last chunks once landed while that thread hashed earlier ones, and were
    never hashed: a false ChecksumMismatch, one read in six of a 32 MiB tensor. Many reads,
    of many chunks each, every one checked."""
    nginx, root, _ = site
    with tensormap.open(str(root / "big.tmap")) as local:
        expected = local.get_tensor("big")
    for chunk in (16 << 10, 64 << 10, CHUNK):
        os.environ["TENSORMAP_REMOTE_CHUNK_BYTES"] = str(chunk)
        try:
            with tensormap.open(f"{nginx.url}/big.tmap") as remote:
                for _ in range(10):
                    assert same(remote.get_tensor("big"), expected)
        finally:
            del os.environ["TENSORMAP_REMOTE_CHUNK_BYTES"]


@needs_package
def test_a_failed_load_says_which_tensors_it_did_not_load(site):
    nginx, _, _ = site

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Parameter(torch.zeros(BIG // 4))

    model = Model()
    with pytest.raises(tensormap.Error) as e:
        tensormap.load(model, f"{nginx.url}/corrupt.tmap", strict=False)
    assert e.value.kind == "ChecksumMismatch"
    assert "0 of 1 tensors loaded" in str(e.value) and "not loaded ('big')" in str(e.value), str(e.value)


class Many(torch.nn.Module if torch else object):
    """Twelve tensors of 64 KiB, past the first request's 64 KiB: each one request."""

    def __init__(self, fill=None):
        super().__init__()
        generator = torch.Generator().manual_seed(fill) if fill is not None else None
        for i in range(12):
            value = torch.randn(16384, generator=generator) if generator else torch.zeros(16384)
            self.register_parameter(f"w{i}", torch.nn.Parameter(value))


@needs_package
def test_a_load_reads_several_tensors_at_once(site):
    """Each response held 0.3 s by the proxy: a load that read one tensor at a time would
    have one request in hand at a time."""
    nginx, root, _ = site
    tensormap.save(Many(fill=3), str(root / "many.tmap"))
    os.chmod(root / "many.tmap", 0o644)
    proxy = servers.FaultProxy(nginx.port, "delay", stall=0.3)
    try:
        model = Many()
        tensormap.load(model, f"{proxy.url}/many.tmap")
        reference = Many(fill=3)
        for name, value in reference.named_parameters():
            assert same(getattr(model, name).detach(), value.detach()), name
        assert proxy.most >= 4, proxy.most
    finally:
        proxy.stop()


@needs_package
def test_a_load_failing_among_concurrent_reads_says_truly_what_it_loaded(site, monkeypatch):
    """Requests after the fifth fail for good, whichever tensors they are for: the tensors
    the message says are loaded hold the file's values; the others are listed."""
    nginx, root, _ = site
    tensormap.save(Many(fill=4), str(root / "many4.tmap"))
    os.chmod(root / "many4.tmap", 0o644)
    monkeypatch.setenv("TENSORMAP_REMOTE_RETRIES", "0")
    proxy = servers.FaultProxy(nginx.port, "503", after=5)
    try:
        model = Many()
        with pytest.raises(tensormap.Error) as e:
            tensormap.load(model, f"{proxy.url}/many4.tmap")
    finally:
        proxy.stop()
    message = str(e.value)
    assert e.value.kind == "RemoteThrottled", message
    loaded = int(message.split("the load stopped there: ")[1].split(" of 12 tensors loaded")[0])
    assert loaded <= 4 and f"{12 - loaded} not loaded ('w{loaded}'" in message, message
    reference = Many(fill=4)
    for i in range(loaded):
        assert same(getattr(model, f"w{i}").detach(), getattr(reference, f"w{i}").detach()), i


HARNESS = os.environ.get("TENSORMAP_HARNESS")


@pytest.mark.skipif(not HARNESS, reason="the benchmark harness is not built (TENSORMAP_HARNESS)")
def test_a_tensor_parallel_rank_fetches_only_its_share(tmp_path):
    """Rank K of 4 of a Megatron-style model (up split along dim 0, down.weight along dim 1:
    its rows, many ranges) loads over HTTP, and the server sends it its share of the bytes
    and little more: the goal is its share + 5%."""
    folder = tmp_path / "tp"
    r = subprocess.run([HARNESS, "make", "--dir", str(folder), "--mib", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in os.listdir(folder):
        if not name.endswith(".tmap"):
            os.unlink(folder / name)
    os.chmod(tmp_path, 0o755)
    os.chmod(folder, 0o755)
    nginx = servers.Nginx(str(folder), str(tmp_path / "nginx"))
    try:
        described = json.loads(cli("inspect", "--json", str(folder / "model-64.tmap")).stdout)["tensors"]
        split = lambda name: ".up." in name or name.endswith(".down.weight")  # noqa: E731 (the harness's plan)
        share = sum(t["byte_length"] // 4 if split(t["name"]) else t["byte_length"] for t in described)
        for rank in (0, 3):
            nginx.clear_log()
            r = subprocess.run([HARNESS, "part", "--dir", str(folder), "--mib", "64", "--ranks", "4", "--rank", str(rank),
                                "--url", f"{nginx.url}/model-64.tmap"], capture_output=True, text=True,
                               env=dict(os.environ, TENSORMAP_REMOTE_CHUNK_BYTES=str(CHUNK)))
            assert r.returncode == 0, r.stderr
            fetched = sum(sent for _, sent, _, _ in nginx.requests())
            assert fetched <= share * 1.05, (rank, fetched, share)
            assert fetched >= share, (rank, fetched, share)
    finally:
        nginx.stop()
