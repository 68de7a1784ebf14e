"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` binaries, a cluster in a temp dir,
listening on 127.0.0.1 on a free port (trust auth: nothing else can reach it), removed afterwards."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from live_server import free_port


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the server's URL (database `postgres`, user `postgres`); the cluster is deleted at the end."""
    bindir = pg_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
    # initdb refuses to run as root: as root, the cluster belongs to the `postgres` user the package made.
    as_user: list[str] = []
    data = tempfile.mkdtemp(prefix="uadkit-pg-")
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    log = os.path.join(data, "server.log")
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(f"{bindir}/initdb", "-D", f"{data}/db", "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        run(f"{bindir}/pg_ctl", "-D", f"{data}/db", "-l", log, "-w", "-t", "30", "-o",
            f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c max_connections=100", "start")
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        yield url
    finally:
        if os.path.exists(f"{data}/db/postmaster.pid"):
            subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", f"{data}/db", "-m", "immediate", "-w", "stop"],
                           capture_output=True)
        for _ in range(20):  # the server may still be unlinking its socket
            try:
                shutil.rmtree(data)
                break
            except OSError:
                time.sleep(0.1)


def create_database(server_url: str, name: str) -> str:
    """A fresh database on the server; returns its URL."""
    import sqlalchemy as sa

    from uadkit.serving.records import normalise_url

    engine = sa.create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
