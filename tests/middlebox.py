"""Debian's nginx as a hostile middlebox: it terminates TLS, offers only HTTP/1.1 (no ALPN h2)
and speaks HTTP/1.1 upstream, as many corporate reverse proxies do."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from hcsdk.net.tls import issue_server_cert

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONF = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;   # no "http2": ALPN offers http/1.1 only
        ssl_certificate {root}/cert.pem;
        ssl_certificate_key {root}/key.pem;
        client_max_body_size 32m;
        location / {{
            proxy_pass https://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_name localhost;  # nginx checks DNS names, not IP SANs
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Middlebox:
    """``Middlebox(root, upstream_url, master_data_dir)``; ``.url`` is where clients connect."""

    def __init__(self, root: Path, upstream_url: str, master_dir: Path):
        root.mkdir(parents=True)
        cert, key = issue_server_cert((master_dir / "ca.pem").read_bytes(), (master_dir / "ca.key").read_bytes(),
                                      ["127.0.0.1", "localhost"])
        (root / "cert.pem").write_bytes(cert)
        (root / "key.pem").write_bytes(key)
        self.port = _free_port()
        upstream_port = int(upstream_url.rsplit(":", 1)[1])
        # the upstream is a master (master CA) or a proxy (its certificate is from the proxy CA)
        trusted = root / "upstream-ca.pem"
        trusted.write_bytes(b"".join(p.read_bytes() for p in (master_dir / "ca.pem", master_dir / "proxy-ca.pem")
                                     if p.exists()))
        (root / "nginx.conf").write_text(CONF.format(root=root, port=self.port, upstream_port=upstream_port,
                                                     ca=trusted))
        self.root = root
        self.proc = subprocess.Popen([NGINX, "-c", str(root / "nginx.conf"), "-p", str(root), "-e",
                                      str(root / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("nginx did not start: " + (root / "error.log").read_text()) from None
                time.sleep(0.1)
        self.url = f"https://127.0.0.1:{self.port}"

    def requests(self) -> str:
        return (self.root / "access.log").read_text()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
