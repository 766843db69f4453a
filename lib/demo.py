"""invoke demo: the whole road on a throwaway PostgreSQL cluster with sample data.

Starts a private cluster (initdb + pg_ctl, socket in a temp dir, no TCP), loads data shaped like
the application's (Korean text, jsonb, bytea, numeric, timestamps), then runs backup, verify,
damages the data, restores the latest backup and compares per-table checksums.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from lib import log as logsetup
from lib.backup import prune, run_backup
from lib.config import load_spec
from lib.errors import RunFailed
from lib.localpg import Cluster
from lib.restore import restore
from lib.verify import verify_stored

SAMPLE = """
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, settings jsonb, avatar bytea,
                    score numeric(12,3), created timestamptz NOT NULL DEFAULT now());
CREATE TABLE lessons (id serial PRIMARY KEY, title text, body text, level smallint);
CREATE TABLE progress (user_id int REFERENCES users(id), lesson_id int REFERENCES lessons(id),
                       score numeric(5,2), done_at timestamptz, PRIMARY KEY (user_id, lesson_id));
INSERT INTO users (name, settings, avatar, score)
  SELECT '학생 ' || g, jsonb_build_object('lang', 'ko', 'level', g % 6), decode(md5(g::text), 'hex'), g * 0.5
  FROM generate_series(1, 2000) g;
INSERT INTO lessons (title, body, level)
  SELECT '제' || g || '과: 인사', repeat('안녕하세요. 만나서 반갑습니다. ', 20), (g % 6)::smallint
  FROM generate_series(1, 200) g;
INSERT INTO progress SELECT u, l, (u * l) % 100, now() - (u % 30) * interval '1 day'
  FROM generate_series(1, 2000) u, generate_series(1, 10) l;
"""

CHECKSUM = (
    "SELECT string_agg(t || ':' || c, ' ' ORDER BY t) FROM ("
    " SELECT 'users' t, md5(string_agg(u::text, '|' ORDER BY u.id)) c FROM users u UNION ALL"
    " SELECT 'lessons', md5(string_agg(l::text, '|' ORDER BY l.id)) FROM lessons l UNION ALL"
    " SELECT 'progress', md5(string_agg(p::text, '|' ORDER BY p.user_id, p.lesson_id)) FROM progress p) s;"
)


def run_demo(keep: bool = False) -> None:
    """Run the demo; raises ToolError on failure. Prints each step."""
    root = Path(tempfile.mkdtemp(prefix="lemon-backup-demo-", dir="/tmp"))
    cluster = Cluster(root)
    try:
        print(f"starting a throwaway PostgreSQL in {root} (port {cluster.port}, socket only)")
        cluster.start()
        cluster.sql("CREATE DATABASE lemon_korean;")
        cluster.sql(SAMPLE, "lemon_korean")
        before = cluster.sql(CHECKSUM, "lemon_korean")
        work = root / "work"
        work.mkdir(mode=0o700)
        config = {
            "version": 1,
            "backup_dir": "./backups",
            "databases": {
                "postgres": {
                    "engine": "postgres",
                    "database": "lemon_korean",
                    "user": "postgres",
                    "host": str(cluster.sock),
                    "port": cluster.port,
                }
            },
        }
        (work / "backup.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        spec = load_spec(work / "backup.yml", environ={"PATH": os.environ.get("PATH", "")})
        logsetup.setup(spec.backup_dir)
        db = spec.databases["postgres"]
        print("1. backup")
        backup = run_backup(spec, db)
        prune(spec, db)
        print("2. verify the stored file")
        if verify_stored(spec, None, None, logsetup.get()):
            raise RunFailed("demo: verification failed")
        print("3. damage the database (delete progress, rename users)")
        cluster.sql("DELETE FROM progress; UPDATE users SET name = 'oops';", "lemon_korean")
        print("4. restore the latest backup")
        restore(spec, "postgres", "latest", drop_previous=True)
        after = cluster.sql(CHECKSUM, "lemon_korean")
        if after != before:
            raise RunFailed("demo: restored data differs from the original")
        print(f"demo OK: {backup.path.name} ({backup.record['size']} bytes) restored; per-table checksums match")
        if keep:
            print(f"kept: {work} (backup.yml, backups/); server stopped")
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
