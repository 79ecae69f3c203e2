"""Real PostgreSQL, MySQL (MariaDB) and Redis servers on 127.0.0.1 for the fleet and storage tests and
`bench/fleet.py`, from Debian's packages (`apt-get install postgresql mariadb-server redis-server`; `.ci/run`
installs them). Each server gets a free port and a scratch folder of its own, and is stopped (and its folder
removed) when the context ends."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _pg_tool(name: str) -> str:
    path = PG_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} was not found: apt-get install postgresql")
    return found


class PostgresServer:
    """`initdb` + `pg_ctl` in a scratch folder; as root the server runs as the `postgres` system user
    (PostgreSQL refuses to run as root)."""

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable  # False: fsync=off, for the tests; True: PostgreSQL's defaults, for benches
        self.port = free_port()
        self.user = "hy3d"
        self.password = secrets.token_urlsafe(12)
        self.db = "hy3d"
        self.folder = Path(tempfile.mkdtemp(prefix="hy3d-pg-"))
        self.data = self.folder / "data"

    @property
    def url(self) -> str:
        """As a user would write it: the plain `postgresql://` form (the driver is ours to pick)."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.db}"

    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def __enter__(self) -> "PostgresServer":
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            shutil.chown(pwfile, "postgres")
        subprocess.run(self._as_owner([_pg_tool("initdb"), "-D", str(self.data), "-U", self.user, "--auth=scram-sha-256",
                                       f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        # the tests' server skips fsync (speed); a bench's keeps PostgreSQL's defaults, as SQLite keeps its own
        durability = "" if self.durable else " -c fsync=off"
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder}{durability} -c max_connections=200"
        subprocess.run(self._as_owner([_pg_tool("pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                                       str(self.folder / "log"), "-w", "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        _wait_port(self.port, 30, "PostgreSQL")
        subprocess.run([_pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.db],
                       check=True, env={**os.environ, "PGPASSWORD": self.password})
        return self

    def database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        subprocess.run([_pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name],
                       check=True, env={**os.environ, "PGPASSWORD": self.password})
        return self.url.rsplit("/", 1)[0] + "/" + name

    def __exit__(self, *exc) -> None:
        subprocess.run(self._as_owner([_pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.folder, ignore_errors=True)


class MySQLServer:
    """MariaDB (Debian's `mariadb-server`, what Dagster's MySQL storage runs on too): `mariadb-install-db` and
    `mariadbd` in a scratch folder; as root the server runs as the `mysql` system user (it refuses root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.user = "hy3d"
        self.password = secrets.token_urlsafe(12)
        self.db = "hy3d"
        self.folder = Path(tempfile.mkdtemp(prefix="hy3d-my-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """In the form dagster-mysql takes (`mysql_url`), with the driver it installs."""
        return f"mysql+mysqlconnector://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.db}"

    def database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        self._sql(f"CREATE DATABASE `{name}`; GRANT ALL ON `{name}`.* TO '{self.user}'@'127.0.0.1';")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def _sql(self, statements: str) -> None:
        client = shutil.which("mariadb") or shutil.which("mysql")
        subprocess.run([client, "--no-defaults", "-S", str(self.folder / "sock"), "-uroot", "-e", statements],
                       check=True, stdout=subprocess.DEVNULL)

    def __enter__(self) -> "MySQLServer":
        server, install = shutil.which("mariadbd", path="/usr/sbin:/usr/bin"), shutil.which(
            "mariadb-install-db", path="/usr/bin:/usr/sbin")
        if not server or not install:
            raise RuntimeError("MariaDB was not found: apt-get install mariadb-server")
        owner = ["--user=mysql"] if os.geteuid() == 0 else []
        if owner:
            shutil.chown(self.folder, "mysql")
        data = self.folder / "data"
        subprocess.run([install, "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=normal",
                        "--skip-test-db", *owner], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.proc = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={data}", f"--socket={self.folder / 'sock'}", f"--port={self.port}",
             "--bind-address=127.0.0.1", "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=0",
             "--innodb-buffer-pool-size=64M", f"--log-error={self.folder / 'log'}",
             f"--pid-file={self.folder / 'pid'}", *owner],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.port, 30, "mariadbd", self.proc)
        self._sql(f"CREATE DATABASE {self.db}; CREATE USER '{self.user}'@'127.0.0.1' IDENTIFIED BY "
                  f"'{self.password}'; GRANT ALL ON {self.db}.* TO '{self.user}'@'127.0.0.1';")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="hy3d-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server was not found: apt-get install redis-server")
        self.proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.port, 20, "redis-server", self.proc)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
