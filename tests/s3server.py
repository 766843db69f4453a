"""A real S3 HTTP server on a free loopback port for the S3 destination tests: moto's server mode
(multipart uploads, versioning, Object Lock retention, ListObjectsV2 paging), run in a thread of
the test process. The tool talks to it over HTTP like to any S3 service (the tasks run in their
own processes). ``stop()`` closes the listener (connections are refused, as with a server that
went away); ``start()`` again on the same port keeps every bucket (moto's state lives in this
process), so a test can look at what an interrupted upload left behind."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer
from sshd import free_port

ACCESS_KEY, SECRET_KEY = "AKIATESTSERVERONLY00", "test-server-secret-not-the-tools"


def moto_process(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (its memory is not the caller's; ``env`` adds
    settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 to check credentials): (process, url) once it
    accepts connections. Raises RuntimeError when it does not start within 20 s."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


class S3Server:
    """moto's S3 server on 127.0.0.1:<free port>, with a client for the tests' own checks."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadedMotoServer | None = None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (new connections are refused)."""
        if self._server is None:
            return
        inner = self._server._server  # werkzeug's server: shutdown() alone keeps the socket open
        self._server.stop()
        if inner is not None:
            inner.server_close()
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def client(self):
        """A client for the tests' own looks at the bucket (not the tool's)."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def bucket(self, lock: bool = False) -> str:
        """A new bucket (with Object Lock, hence versioning, when ``lock``)."""
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
        return name

    def keys(self, bucket: str) -> set[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}

    def uploads(self, bucket: str) -> list[dict]:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
