"""A real Docker engine for tests on a machine with no registry: a private ``dockerd``
(root, vfs storage, no iptables, host networking only) and a local image that runs the
host's own Python through read-only bind mounts, so a container can serve
``python -m llama_cpp.server`` or ``python -m modelmora.testing.vllm``."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HOST_IMAGE = "modelmora-host:local"


class PrivateDockerd:
    """``dockerd`` with its own socket, data root and exec root under a temporary folder."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="modelmora-dockerd-"))
        self.socket = self.root / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @staticmethod
    def available() -> str | None:
        """Why it cannot run here, or None when it can."""
        if shutil.which("dockerd") is None:
            return "no dockerd (bash .ci/setup-docker.sh installs Debian's docker.io)"
        if os.geteuid() != 0:
            return "dockerd needs root"
        return None

    def start(self, timeout: float = 60.0) -> PrivateDockerd:
        import docker

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "dockerd.log").open("wb") as log:  # the daemon keeps its own descriptor
            self.process = subprocess.Popen(
                ["dockerd", "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
                 "-H", self.url, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                 "--pidfile", str(self.root / "docker.pid")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(self.root / 'dockerd.log').read_text()[-500:]}")
            try:
                # a bare connect first: DockerClient() itself queries the daemon and leaks
                # its socket when that fails
                with socket.socket(socket.AF_UNIX) as raw:
                    raw.connect(str(self.socket))
                with contextlib.closing(docker.DockerClient(base_url=self.url)) as probe:
                    probe.ping()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("dockerd did not answer within a minute") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        unmount_below(self.root)  # dockerd leaves its netns mount behind
        shutil.rmtree(self.root, ignore_errors=True)


def unmount_below(root: Path) -> None:
    """Lazily unmount whatever is still mounted under ``root`` (deepest first)."""
    try:
        with open("/proc/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        return
    prefix = str(root.resolve()) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def host_image(client: Any, tag: str = HOST_IMAGE) -> str:
    """An image of empty mount points (made by ``docker import``; nothing is pulled)."""
    import docker

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in (
            ("tmp", 0o1777),
            ("root", 0o700),
            ("etc", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("dev", 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
    repository, _, version = tag.partition(":")
    client.api.import_image_from_data(buffer.getvalue(), repository=repository, tag=version or "latest")
    return tag


def host_mounts(*extra: str | Path) -> dict[str, str]:
    """``{host path: "path:ro"}`` for the system libraries, this Python and modelmora."""
    import modelmora

    paths = {
        "/usr",
        "/lib",
        "/lib64",
        sys.prefix,
        sys.base_prefix,
        str(Path(modelmora.__file__).resolve().parents[1]),
    }
    paths |= {str(Path(p)) for p in extra}
    return {p: f"{p}:ro" for p in sorted(paths) if Path(p).exists()}


__all__ = ["HOST_IMAGE", "PrivateDockerd", "host_image", "host_mounts"]
