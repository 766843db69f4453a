"""A real OpenSSH server on a free loopback port, with throwaway host and user keys, for the
destination tests. Started and stopped by fixtures; ``kill()`` simulates a server dying
mid-transfer (the listener and every session process it started, by pid)."""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    """A new ed25519 key pair without passphrase at ``path`` (+ .pub)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first discovered first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


class SshServer:
    """sshd -D with its own config, host key, authorized_keys and user key in ``base``."""

    def __init__(self, base: Path, extra_config: str = "", key_options: str = "") -> None:
        """``key_options`` prefix the authorized key (e.g. 'command="rrsync DIR",restrict ')."""
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(base / "ssh_host_ed25519_key", "test-host")
        self.user_key = keygen(base / "id_ed25519", "test-user")
        (base / "authorized_keys").write_text(key_options + Path(str(self.user_key) + ".pub").read_text())
        self.known_hosts = base / "known_hosts"
        host_pub = Path(str(self.host_key) + ".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config = base / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {base / 'sshd.pid'}",
                    f"AuthorizedKeysFile {base / 'authorized_keys'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UseDNS no",
                    "PrintMotd no",
                    "LogLevel ERROR",
                    "MaxStartups 100:30:200",
                    "Subsystem sftp internal-sftp",
                    extra_config,
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> SshServer:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        log = open(self.base / "sshd.log", "ab")  # noqa: SIM115 - kept for the server's lifetime
        # A faked clock (faketime's LD_PRELOAD, when the suite is run under it to try other dates)
        # is for the tool, not for the server it talks to: sshd does not start under it.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")}
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.base / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def kill(self) -> None:
        """SIGKILL the listener and every session process it started (a server dying mid-transfer)."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
