"""Real servers on loopback for the remote tests, started and stopped by the tests.

Nginx serves a folder (HTTP range reads, as a CDN or an artifact server does), with one
folder behind a bearer token. FaultProxy stands between tensormap and nginx and breaks
what the test asks it to: a connection dropped mid-body, Range ignored, 503 SlowDown,
an object that changes between requests, a stall, a short body.
"""
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time

TOKEN = "secret-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, process, what, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds} s")


def stop_process(process):
    """Ends a server the tests started: SIGTERM, then SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def one_line_error(r, kind, *words):
    """Whether the command line failed as it must: exit 1, one line on stderr, of `kind`,
    holding every one of `words`."""
    lines = r.stderr.strip().splitlines()
    return (r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"tensormap: {kind}: ")
            and all(w in lines[0] for w in words))


class Nginx:
    """nginx serving `root` on a free loopback port; root/private/ needs the bearer TOKEN.

    Its access log has one line per request: status, body bytes sent, the Range asked for.
    With `tls`, the same folder is served over HTTPS too (https_url), with a certificate
    for 127.0.0.1 signed by a CA of its own, made with openssl: `ca` is that CA's PEM."""

    def __init__(self, root, workdir, tls=False):
        self.root, self.workdir = os.path.abspath(root), os.path.abspath(workdir)
        self.port = free_port()
        os.makedirs(self.workdir, exist_ok=True)
        tls_server = ""
        if tls:
            self.tls_port = free_port()
            self.ca = self._certificates()
            tls_server = f"""
  server {{
    listen 127.0.0.1:{self.tls_port} ssl;
    ssl_certificate {self.workdir}/server.pem;
    ssl_certificate_key {self.workdir}/server.key;
    root {self.root};
  }}"""
        self.log = os.path.join(self.workdir, "access.log")
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        temp = {k: os.path.join(self.workdir, k) for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        config = f"""{user}
daemon off;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log;
events {{ worker_connections 512; }}
http {{
  log_format ranges '$status $body_bytes_sent "$http_range" $request_uri';
  access_log {self.log} ranges;
  client_body_temp_path {temp['body']};
  proxy_temp_path {temp['proxy']};
  fastcgi_temp_path {temp['fastcgi']};
  uwsgi_temp_path {temp['uwsgi']};
  scgi_temp_path {temp['scgi']};
  types {{ }}
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
    location /private/ {{
      if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}
    }}
  }}{tls_server}
}}
"""
        self.config = os.path.join(self.workdir, "nginx.conf")
        with open(self.config, "w") as f:
            f.write(config)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen([nginx, "-c", self.config, "-p", self.workdir],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, self.process, "nginx")
        self.url = f"http://127.0.0.1:{self.port}"
        if tls:
            wait_for_port(self.tls_port, self.process, "nginx (https)")
            self.https_url = f"https://127.0.0.1:{self.tls_port}"

    def _certificates(self):
        """A CA, and a certificate for 127.0.0.1 it signs; returns the CA's PEM."""
        w = self.workdir

        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tensormap test CA",
                "-keyout", f"{w}/ca.key", "-out", f"{w}/ca.pem")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                "-keyout", f"{w}/server.key", "-out", f"{w}/server.csr")
        with open(f"{w}/server.ext", "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{w}/server.csr", "-CA", f"{w}/ca.pem", "-CAkey", f"{w}/ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{w}/server.ext", "-out", f"{w}/server.pem")
        return f"{w}/ca.pem"

    def requests(self):
        """The access log's lines so far: (status, body bytes sent, range, uri)."""
        time.sleep(0.05)  # nginx writes its log line as the request ends
        out = []
        if os.path.exists(self.log):
            for line in open(self.log):
                status, sent, rest = line.split(" ", 2)
                range_, uri = rest.rsplit(" ", 1)
                out.append((int(status), int(sent), range_.strip('"'), uri.strip()))
        return out

    def clear_log(self):
        open(self.log, "w").close()
        # nginx keeps appending to its open descriptor: truncation is enough

    def stop(self):
        stop_process(self.process)


class FaultProxy:
    """An HTTP proxy in front of `upstream_port` that breaks responses as `mode` says.

    Each request is forwarded with "Connection: close", its whole response read, then
    sent on (broken or not) and the connection closed. `fail` counts how many requests
    are broken before the proxy passes them whole (None: all). Modes: "drop" (close after
    half the body), "ignore-range" (the Range header removed), "503" (SlowDown), "etag"
    (another ETag), "stall" (half the body, then nothing for `stall` seconds), "short"
    (a 206 whose body and Content-Length are short of the range), "delay" (the whole
    response, `stall` seconds late). `most` is the most requests it had in hand at once."""

    def __init__(self, upstream_port, mode, fail=None, stall=5.0, after=0):
        self.upstream_port, self.mode, self.fail, self.stall, self.after = upstream_port, mode, fail, stall, after
        self.seen = 0
        self.active = self.most = 0
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_head(sock):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, b""
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        return head.decode("latin-1"), rest

    def _serve(self, client):
        try:
            with client:
                head, _ = self._read_head(client)
                if head is None:
                    return
                with self.lock:
                    self.seen += 1
                    n = self.seen
                    self.active += 1
                    self.most = max(self.most, self.active)
                try:
                    self._pass(client, head, n)
                finally:
                    with self.lock:
                        self.active -= 1
        except OSError:
            pass

    def _pass(self, client, head, n):
        """Forwards one request, broken as the mode says (a request number `n`)."""
        broken = n > self.after and (self.fail is None or n - self.after <= self.fail)
        lines = head.split("\r\n")
        keep = [l for l in lines[1:] if not l.lower().startswith("connection:")]
        if broken and self.mode == "ignore-range":
            keep = [l for l in keep if not l.lower().startswith("range:")]
        if broken and self.mode == "503":
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            return
        request = "\r\n".join([lines[0]] + keep + ["Connection: close", "", ""]).encode("latin-1")
        with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            up.sendall(request)
            response = b""
            while True:
                chunk = up.recv(1 << 20)
                if not chunk:
                    break
                response += chunk
        rhead, body = response.split(b"\r\n\r\n", 1)
        rlines = rhead.decode("latin-1").split("\r\n")
        if broken and self.mode == "etag":
            rlines = [('ETag: "changed-%d"' % n) if l.lower().startswith("etag:") else l for l in rlines]
        if broken and self.mode == "short" and rlines[0].split(" ")[1] == "206":
            body = body[: len(body) // 2]
            rlines = [("Content-Length: %d" % len(body)) if l.lower().startswith("content-length:") else l
                      for l in rlines]
        out = ("\r\n".join(rlines) + "\r\n\r\n").encode("latin-1")
        if broken and self.mode == "drop":
            client.sendall(out + body[: len(body) // 2])
            client.shutdown(socket.SHUT_RDWR)
            return
        if broken and self.mode == "stall":
            client.sendall(out + body[: len(body) // 2])
            time.sleep(self.stall)
            return
        if broken and self.mode == "delay":
            time.sleep(self.stall)
        client.sendall(out + body)

    def stop(self):
        self.running = False
        self.server.close()


class Moto:
    """moto's S3 server (Debian 13's python3-moto) on a free loopback port, checking SigV4:
    the first requests (unauthenticated) make an IAM user allowed s3:* and its keys; every
    later request must be signed with them. `env` is the environment tensormap reads."""

    BUCKET = "tensormap-test"

    def __init__(self):
        import json
        import sys

        import boto3
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"))
        wait_for_port(self.port, self.process, "moto", 60)
        self.url = f"http://127.0.0.1:{self.port}"
        iam = boto3.client("iam", endpoint_url=self.url, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        iam.create_user(UserName="tensormap")
        iam.put_user_policy(UserName="tensormap", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="tensormap")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key,
                               aws_secret_access_key=self.secret, region_name="us-east-1")
        self.s3.create_bucket(Bucket=self.BUCKET)
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.key,
                    "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1"}

    def put(self, key, path):
        with open(path, "rb") as f:
            self.s3.put_object(Bucket=self.BUCKET, Key=key, Body=f.read())

    def get(self, key):
        return self.s3.get_object(Bucket=self.BUCKET, Key=key)["Body"].read()

    def keys(self):
        return sorted(o["Key"] for o in self.s3.list_objects_v2(Bucket=self.BUCKET).get("Contents", []))

    def uploads(self):
        """Multipart uploads begun and neither completed nor aborted."""
        return self.s3.list_multipart_uploads(Bucket=self.BUCKET).get("Uploads", [])

    def stop(self):
        stop_process(self.process)
