"""Real file-sharing servers on loopback, for the share tests. Test code only.

    smb   Debian's `smbd` on 127.0.0.1, mounted through FUSE with `rclone mount` (smb backend,
          1 s directory cache: how a kernel cifs mount with actimeo=1 behaves). Clients:
          `smbclient` (put, rename, a held-open file) and the server's own folder.
    sftp  OpenSSH's `sshd` on 127.0.0.1, mounted with `sshfs -o dir_cache=no`. Clients: `sftp`
          and the server's own folder.

Everything listens on 127.0.0.1 only, on a free port; configs, keys, caches and logs live in
temporary folders; nothing system-wide is configured (sshd insists on /run/sshd, so it runs in a
private mount namespace with a /run of its own). Every process is started in its own process
group and the group is killed at teardown, after the mount is unmounted (`fusermount3 -u`, lazily
if busy), whether the test passed or not.

A missing prerequisite (root, /dev/fuse, a binary) skips the test with the reason, except where
CI=true: CI installs them (.ci/run), so there a missing one fails the test instead of letting it
pass vacuously.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import psutil
import pytest

from conftest import wait_for

Kind = Literal["smb", "sftp"]
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
BINARIES: dict[Kind, tuple[str, ...]] = {
    "smb": ("smbd", "smbpasswd", "smbclient", "smbstatus", "rclone", "fusermount3"),
    "sftp": ("sshd", "ssh-keygen", "sftp", "sshfs", "fusermount3", "unshare", "mount"),
}
USER, PASSWORD = "root", "storyreel"
# rclone 1.60 encodes a bare "." (the share's root) as a full-width dot and creates a folder of
# that name on the server; every other default encoding stays.
RCLONE_SMB_ENCODING = (
    "Slash,LtGt,DoubleQuote,Colon,Question,Asterisk,Pipe,BackSlash,Ctl,RightSpace,InvalidUtf8"
)


# --------------------------------------------------------------------------- prerequisites


def missing(kind: Kind) -> list[str]:
    """What this machine lacks for `kind`, in words; empty when the tests can run."""
    lacks = []
    if os.geteuid() != 0:
        lacks.append("root (smbd/sshd run as root and serve root's files)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as err:
        lacks.append(f"a usable /dev/fuse ({err.strerror})")
    lacks += [name for name in BINARIES[kind] if shutil.which(name, path=SEARCH_PATH) is None]
    if kind == "sftp" and not os.access(SFTP_SERVER, os.X_OK):
        lacks.append(SFTP_SERVER)
    return lacks


def require(*kinds: Kind) -> None:
    """Skip (fail under CI=true) unless every prerequisite of `kinds` is here."""
    lacks = sorted({item for kind in kinds for item in missing(kind)})
    if not lacks:
        return
    reason = (
        f"share tests need {', '.join(lacks)} (Debian: samba smbclient rclone openssh-server sshfs fuse3)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def _exe(name: str) -> str:
    found = shutil.which(name, path=SEARCH_PATH)
    assert found, name
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class Process:
    """One started server or mount process, in a process group of its own (its children go with it)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log = argv, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self, what: str) -> None:
        if not self.alive():
            raise AssertionError(f"{what} exited with {self.proc.returncode}:\n{_tail(self.log)}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the whole group, then make sure it is gone (SIGKILL after 10 s)."""
        for s, grace in ((sig, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, s)
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader is gone; children it left in the group go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def fuse_unmount(mountpoint: Path) -> None:
    """`fusermount3 -u`, retried while busy, then lazily (`-uz`): a test never leaves a mount behind."""
    if not os.path.ismount(mountpoint):
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode == 0:
            return
        if not os.path.ismount(mountpoint):
            return
        time.sleep(0.1)
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def _wait_mounted(mountpoint: Path, proc: Process, what: str) -> None:
    def up() -> bool:
        proc.check(what)
        return os.path.ismount(mountpoint)

    wait_for(up, timeout=30, what=f"{what} mounted on {mountpoint}")


# ------------------------------------------------------------------------------------ SMB


class SmbServer:
    """smbd serving `folder` as //127.0.0.1/share; all its state under a short private temp folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # the server's own disk: a write here is a "server-side copy"
        folder.mkdir(parents=True, exist_ok=True)
        # Short: smbd puts unix sockets under it (sun_path is 108 bytes).
        self.home = Path(tempfile.mkdtemp(prefix="sr-smb-", dir="/tmp"))
        self.port = _free_port()
        self.conf = self.home / "smb.conf"
        self.log = self.home / "smbd.log"
        self._write_conf()
        self.process: Process | None = None
        subprocess.run(
            [_exe("smbpasswd"), "-c", str(self.conf), "-s", "-a", USER],
            input=f"{PASSWORD}\n{PASSWORD}\n",
            text=True,
            capture_output=True,
            check=True,
        )

    def _write_conf(self) -> None:
        h = self.home
        for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc"):
            (h / sub).mkdir(exist_ok=True)
        self.conf.write_text(
            f"""[global]
  netbios name = STORYREELTEST
  server role = standalone server
  interfaces = 127.0.0.1
  bind interfaces only = yes
  smb ports = {self.port}
  disable netbios = yes
  server min protocol = SMB2
  private dir = {h}/private
  lock directory = {h}/lock
  state directory = {h}/state
  cache directory = {h}/cache
  pid directory = {h}/pid
  ncalrpc dir = {h}/ncalrpc
  passdb backend = tdbsam:{h}/private/passdb.tdb
  log file = {h}/log.%m
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
[share]
  path = {self.folder}
  read only = no
  force user = root
"""
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self) -> None:
        self.process = Process(
            [
                _exe("smbd"),
                "--foreground",
                "--no-process-group",
                "--debug-stdout",
                f"--configfile={self.conf}",
            ],
            self.log,
        )
        proc = self.process

        def up() -> bool:
            proc.check("smbd")
            return _listening(self.port)

        wait_for(up, timeout=30, what=f"smbd on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    # -- a client on another machine ------------------------------------------------------
    def client_argv(self) -> list[str]:
        return [
            _exe("smbclient"),
            "//127.0.0.1/share",
            "-p",
            str(self.port),
            "-U",
            f"{USER}%{PASSWORD}",
            "-s",
            str(self.conf),
        ]

    def client(self, *commands: str) -> str:
        """Run smbclient commands ("put a b", "rename a b", ...); raise with its output on failure."""
        res = subprocess.run(
            [*self.client_argv(), "-c", "; ".join(commands)], capture_output=True, text=True, timeout=60
        )
        out = res.stdout + res.stderr
        if res.returncode != 0 or "NT_STATUS_" in out:
            raise AssertionError(f"smbclient {commands!r} failed ({res.returncode}): {out}")
        return out

    def locked(self) -> str:
        """`smbstatus -L`: the files clients hold open, as the server sees them."""
        res = subprocess.run(
            [_exe("smbstatus"), "-L", "-s", str(self.conf)], capture_output=True, text=True, timeout=30
        )
        return res.stdout

    def put(self, local: Path, remote: str) -> None:
        self.client(f'put "{local}" "{remote}"')

    @contextlib.contextmanager
    def hold(self, remote: str) -> Iterator[None]:
        """Another client keeps `remote` open (as an editor, a scanner or a closing copy does).

        smbclient's `open` asks for read/write without FILE_SHARE_DELETE, so the file cannot be
        removed or renamed by anyone else until it is closed."""
        log = self.home / f"hold-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self.client_argv(),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert proc.stdin is not None
        try:
            proc.stdin.write(f'open "{remote}"\n'.encode())
            proc.stdin.flush()
            name = remote.rsplit("/", 1)[-1]
            wait_for(lambda: name in self.locked(), timeout=30, what=f"{remote} held open over SMB")
            yield
            proc.stdin.close()  # end of input: smbclient closes the file and logs off
            proc.wait(30)
            wait_for(lambda: name not in self.locked(), timeout=30, what=f"{remote} released")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class RcloneMount:
    """`rclone mount` of an SMB share through FUSE, as the GPU box mounts the team's share.

    --dir-cache-time 1s: a listing is at most a second old (as cifs with actimeo=1).
    --vfs-cache-mode writes: needed to write files the way the daemon does (open, write, fsync,
    rename); uploads are deferred by --vfs-write-back (5 s), as a client-side cache does.
    -vv: every FUSE call is logged, so a test can wait for the daemon's next listing.
    """

    def __init__(self, server: SmbServer, mountpoint: Path, subpath: str = "") -> None:
        self.server, self.mountpoint, self.subpath = server, mountpoint, subpath
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache = server.home / f"rclone-cache-{mountpoint.name}"
        self.log = server.home / f"rclone-{mountpoint.name}.log"
        self.process: Process | None = None

    def mount(self) -> None:
        obscured = subprocess.run(
            [_exe("rclone"), "obscure", PASSWORD], capture_output=True, text=True, check=True
        ).stdout.strip()
        remote = (
            f":smb,host=127.0.0.1,port={self.server.port},user={USER},pass={obscured},"
            f"encoding='{RCLONE_SMB_ENCODING}':share/{self.subpath}"
        )
        self.process = Process(
            [
                _exe("rclone"),
                "mount",
                remote,
                str(self.mountpoint),
                "--dir-cache-time=1s",
                "--vfs-cache-mode=writes",
                f"--cache-dir={self.cache}",
                "-vv",
                f"--log-file={self.log}",
            ],
            self.server.home / f"rclone-{self.mountpoint.name}.out",
            env={"RCLONE_CONFIG": "/dev/null"},
        )
        _wait_mounted(self.mountpoint, self.process, "rclone mount")

    def unmount(self) -> None:
        fuse_unmount(self.mountpoint)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.proc.wait(10)  # rclone exits once unmounted
            self.process.stop()
            self.process = None

    def listings(self, folder: str) -> int:
        """How many times anyone has listed `folder` (relative to the mount) through this mount."""
        return _tail(self.log, 1 << 30).count(f"{folder}/: >ReadDirAll:")


@contextlib.contextmanager
def smb_share(base: Path) -> Iterator[SmbShare]:
    server = SmbServer(base / "server")
    mount = RcloneMount(server, base / "mnt")
    try:
        server.start()
        mount.mount()
        yield SmbShare(server, mount)
    finally:
        mount.unmount()
        server.close()


class SmbShare:
    def __init__(self, server: SmbServer, mount: RcloneMount) -> None:
        self.server, self.mount = server, mount

    def on_server(self, rel: str = "") -> Path:
        return self.server.folder / rel if rel else self.server.folder

    def on_mount(self, rel: str = "") -> Path:
        return self.mount.mountpoint / rel if rel else self.mount.mountpoint


# ----------------------------------------------------------------------------------- SFTP


class SshServer:
    """sshd with a generated host key, accepting one generated user key; sftp requests are logged.

    The sftp subsystem logs every opendir to a file, so a test can tell when the daemon listed
    its inbox through sshfs (dir_cache=no: every listing reaches the server)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.home = Path(tempfile.mkdtemp(prefix="sr-ssh-", dir="/tmp"))
        self.port = _free_port()
        self.key = self.home / "user_key"
        self.sftp_log = self.home / "sftp.log"
        self.log = self.home / "sshd.log"
        for key in (self.home / "host_key", self.key):
            subprocess.run(
                [_exe("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        shutil.copy(f"{self.key}.pub", self.home / "authorized_keys")
        self.conf = self.home / "sshd_config"
        self.conf.write_text(
            f"""ListenAddress 127.0.0.1
Port {self.port}
HostKey {self.home}/host_key
PidFile {self.home}/sshd.pid
AuthorizedKeysFile {self.home}/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
Subsystem sftp {SFTP_SERVER} -e -l INFO 2>>{self.sftp_log}
"""
        )
        self.process: Process | None = None

    def start(self) -> None:
        # sshd needs its privilege-separation folder /run/sshd: give it a private /run instead
        # of creating one on the host.
        script = (
            "mount -t tmpfs -o size=1m,mode=755 storyreel-run /run && mkdir -m 755 /run/sshd && "
            f'exec {_exe("sshd")} -D -e -f "{self.conf}"'
        )
        self.process = Process(
            [_exe("unshare"), "--mount", "--propagation", "private", "sh", "-c", script], self.log
        )
        proc = self.process

        def up() -> bool:
            proc.check("sshd")
            return _listening(self.port)

        wait_for(up, timeout=30, what=f"sshd on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        """sshd and everything under it: each connection's sshd runs in a session of its own
        (setsid), so the process group alone would miss the sftp-server that does the work."""
        assert self.process is not None, "sshd is not running"
        top = psutil.Process(self.process.proc.pid)
        return [top, *top.children(recursive=True)]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP), as a share whose server stopped answering: every call on
        a mount of it hangs in the kernel until the server goes on (SIGCONT), whatever happens."""
        stopped = []
        try:
            for proc in self.processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGSTOP)
                    stopped.append(proc)
            yield
        finally:
            for proc in reversed(stopped):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGCONT)

    def ssh_options(self) -> list[str]:
        return [
            f"IdentityFile={self.key}",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "LogLevel=ERROR",
        ]

    def sftp(self, *commands: str) -> None:
        """An SFTP client on another machine: `sftp -b` with these commands."""
        opts = [a for o in self.ssh_options() for a in ("-o", o)]
        res = subprocess.run(
            [_exe("sftp"), "-P", str(self.port), *opts, "-b", "-", f"{USER}@127.0.0.1"],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise AssertionError(f"sftp {commands!r} failed ({res.returncode}): {res.stdout}{res.stderr}")

    def opendirs(self, path: Path) -> int:
        """How many times a client has listed `path` (a server-side path) over SFTP."""
        return _tail(self.sftp_log, 1 << 30).count(f'opendir "{path}"')


class SshfsMount:
    """sshfs of the server's folder with dir_cache=no (listings are never stale), reconnecting."""

    def __init__(self, server: SshServer, mountpoint: Path) -> None:
        self.server, self.mountpoint = server, mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.process: Process | None = None

    def mount(self) -> None:
        options = ",".join([*self.server.ssh_options(), "dir_cache=no", "reconnect"])
        self.process = Process(
            [
                _exe("sshfs"),
                "-f",
                "-p",
                str(self.server.port),
                "-o",
                options,
                f"{USER}@127.0.0.1:{self.server.folder}",
                str(self.mountpoint),
            ],
            self.server.home / f"sshfs-{self.mountpoint.name}.log",
        )
        _wait_mounted(self.mountpoint, self.process, "sshfs")

    def unmount(self) -> None:
        fuse_unmount(self.mountpoint)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.proc.wait(10)
            self.process.stop()
            self.process = None


class SftpShare:
    def __init__(self, server: SshServer, mount: SshfsMount) -> None:
        self.server, self.mount = server, mount

    def on_server(self, rel: str = "") -> Path:
        return self.server.folder / rel if rel else self.server.folder

    def on_mount(self, rel: str = "") -> Path:
        return self.mount.mountpoint / rel if rel else self.mount.mountpoint


@contextlib.contextmanager
def sftp_share(base: Path) -> Iterator[SftpShare]:
    server = SshServer(base / "server")
    mount = SshfsMount(server, base / "mnt")
    try:
        server.start()
        mount.mount()
        yield SftpShare(server, mount)
    finally:
        mount.unmount()
        server.close()


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture
def smb(tmp_path: Path) -> Iterator[SmbShare]:
    """A fresh smbd + rclone mount for one test; skipped (failed under CI) where it cannot run."""
    require("smb")
    with smb_share(tmp_path / "smb") as share:
        yield share


@pytest.fixture
def sftp(tmp_path: Path) -> Iterator[SftpShare]:
    """A fresh sshd + sshfs mount for one test; skipped (failed under CI) where it cannot run."""
    require("sftp")
    with sftp_share(tmp_path / "sftp") as share:
        yield share
