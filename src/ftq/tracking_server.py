"""A team tracking server: PostgreSQL (Debian's `postgresql` package) as MLflow's backend store, and
`mlflow server --serve-artifacts` in front of it, so that clients need nothing but
`MLFLOW_TRACKING_URI=http://HOST:PORT`: runs, the registry and the artifacts (every registered
model's bytes) all go through the server.

`ftq tracking-server` (and `make tracking-server`) runs both in the foreground until Ctrl-C; the
tests start them through the same functions. PostgreSQL refuses to run as root, so as root its
cluster belongs to the `postgres` user and its commands run through `runuser`, as Debian does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ftq.processes import stop_group, wait_http

DATABASE = "mlflow"
USER = "ftq"


class Unavailable(RuntimeError):
    """PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)."""


def postgres_bin() -> Path:
    """Debian keeps the server programs (initdb, pg_ctl) out of PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise Unavailable("PostgreSQL is not installed (initdb not found): `make postgres` or "
                      "`apt-get install postgresql` installs it")


@dataclass
class Postgres:
    folder: Path   # holds data/ (the cluster), password and postgres.log
    port: int
    bin_dir: Path

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @property
    def password(self) -> str:
        return (self.folder / "password").read_text().strip()

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        result = subprocess.run(prefix + [str(self.bin_dir / command[0]), *command[1:]], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
                               f"{self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.folder / "postgres.log"
        return ("\n" + "".join(log.read_text(errors="replace").splitlines(True)[-10:])) if log.exists() else ""

    def init(self) -> None:
        """A new cluster with one password-protected user, listening on 127.0.0.1 only."""
        if (self.folder / "data" / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        password = self.folder / "password"
        if not password.exists():
            password.write_text(secrets.token_urlsafe(24) + "\n")
        password.chmod(0o600)
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(password, "postgres", "postgres")
            check = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.folder)])
            if check.returncode != 0:
                raise Unavailable(f"{self.folder}: the postgres user cannot write here (a parent folder is closed to "
                                  "other users); choose another folder with --dir")
        self._run("initdb", "-D", str(self.folder / "data"), "-U", USER, "--auth=scram-sha-256",
                  f"--pwfile={password}", "-E", "UTF8", "--no-locale", "--no-instructions")

    def start(self) -> None:
        self.init()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "postgres.log"), "-o", options,
                  "-w", "-t", "60", "start")
        self.create_database()

    def create_database(self) -> None:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                      dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            connection.close()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")


def start_mlflow_server(store_uri: str, artifacts: Path, host: str, port: int, log_path: Path,
                        timeout: float = 180) -> subprocess.Popen:
    """`mlflow server` over the store, proxying artifacts (kept in `artifacts`) to its clients."""
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
               "--serve-artifacts", "--artifacts-destination", str(artifacts.resolve()),
               "--host", host, "--port", str(port), "--workers", "1"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    wait_http(f"http://127.0.0.1:{port}/health", process, timeout, log_path)
    return process


@contextlib.contextmanager
def running(folder: Path, port: int, pg_port: int, host: str = "127.0.0.1",
            pg_folder: Path | None = None) -> Iterator[str]:
    """PostgreSQL + mlflow server for the block; yields the tracking URI."""
    postgres = Postgres(Path(pg_folder or folder / "postgres").resolve(), pg_port, postgres_bin())
    postgres.start()
    try:
        server = start_mlflow_server(postgres.uri, folder / "artifacts", host, port, folder / "mlflow-server.log")
        try:
            yield f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        finally:
            stop_group(server)
    finally:
        postgres.stop()


def serve_forever(folder: Path, port: int, pg_port: int, host: str) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.time()
    with running(folder, port, pg_port, host) as uri:
        print(f"ftq: tracking server up in {time.time() - started:.0f} s (PostgreSQL on 127.0.0.1:{pg_port}, "
              f"artifacts in {folder / 'artifacts'}). Point clients at it:\n"
              f"  export MLFLOW_TRACKING_URI={uri}\nCtrl-C stops it.", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
