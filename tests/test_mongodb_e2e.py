"""MongoDB end to end through the real Invoke tasks, against the TEST DOUBLES of mongodump,
mongorestore and mongosh (tests/doubles/mongo/; no MongoDB can be installed here) and of docker.

The doubles refuse to run when the password is on any command line or in their environment, so
every test here also checks that the password only ever travels on the fd 3 pipe.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from pathlib import Path

import mongo_archive_builder as builder
import pytest
import yaml
from conftest import ROOT

from lib.engines.mongo_archive import walk

MONGO_DOUBLES = ROOT / "tests" / "doubles" / "mongo"
PASSWORD = "pa\"ss: #1 $HOME \\ 한글 'q' {x}"
INITIAL = {
    "lemon_korean": {
        "users": [{"_id": i, "name": f"사용자 {i}", "tags": ["ko", "beginner"], "score": i * 1.5} for i in range(25)],
        "lessons": [{"_id": i, "title": f"레슨 {i}", "body": "본문 " * 40, "level": i % 5} for i in range(12)],
        "empty": [],
    },
    "other": {"keep": [{"_id": 1}]},
}
DOUBLE_SETTINGS = (
    "MONGO_DOUBLE_STATE",
    "MONGO_DOUBLE_LOG",
    "MONGO_DOUBLE_PASSWORD",
    "MONGO_DOUBLE_FAIL",
    "MONGO_DOUBLE_DUMP",
)


class Mongo:
    """The doubles' "server" state, call log and environment for one workspace."""

    def __init__(self, workspace, tmp_path: Path) -> None:
        self.ws = workspace
        self.state_path = tmp_path / "mongo-state.json"
        self.log_dir = tmp_path / "mongo-calls"
        self.set_state(INITIAL)
        workspace.env["PATH"] = f"{MONGO_DOUBLES}{os.pathsep}{workspace.env['PATH']}"
        workspace.env.update(
            {
                "MONGO_DOUBLE_STATE": str(self.state_path),
                "MONGO_DOUBLE_LOG": str(self.log_dir),
                "MONGO_DOUBLE_PASSWORD": PASSWORD,
                "DB_PASSWORD": PASSWORD,
                "DOCKER_DOUBLE_RUNNING": "lemon-mongo",
                "DOCKER_DOUBLE_PASS": ",".join(DOUBLE_SETTINGS),
            }
        )

    def config(self, container: bool = True, **extra) -> dict:
        db = {"engine": "mongodb", "database": "lemon_korean", "user": "3chan", "auth_database": "admin"}
        db.update({"container": "lemon-mongo"} if container else {"host": "127.0.0.1", "port": 27017})
        db["password_env"] = "DB_PASSWORD"
        db.update(extra)
        return {"version": 1, "backup_dir": "./backups", "databases": {"mongo": db}}

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def set_state(self, state: dict) -> None:
        self.state_path.write_text(json.dumps(state))

    def calls(self, tool: str | None = None) -> list[dict]:
        if not self.log_dir.exists():
            return []
        entries = [
            json.loads(p.read_text()) for p in sorted(self.log_dir.iterdir(), key=lambda p: int(p.name.split("-")[0]))
        ]
        return [e for e in entries if tool is None or e["tool"] == tool]

    def docker_calls(self) -> list[list[str]]:
        path = self.ws.path / "docker-calls.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def backup(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return self.ws.invoke("backup", "--db", "mongo", *args, env=env)

    def restore(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return self.ws.invoke("restore", "--engine", "mongodb", *args, env=env)


@pytest.fixture
def mongo(workspace, tmp_path):
    return Mongo(workspace, tmp_path)


def record_of(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def counts(state: dict, db: str = "lemon_korean") -> dict[str, int]:
    return {name: len(docs) for name, docs in state.get(db, {}).items()}


def assert_password_never_leaked(mongo: Mongo, result: subprocess.CompletedProcess) -> None:
    assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD not in json.dumps(mongo.docker_calls())
    for call in mongo.calls():
        assert PASSWORD not in json.dumps(call["argv"]) + json.dumps(call["parent_argv"])
        assert "LEMON_MONGO_CONFIG" not in call["env"]
        assert "DB_PASSWORD" not in call["env"]
    log = mongo.ws.backup_dir / "backup.log"
    assert not log.exists() or PASSWORD not in log.read_text()


# -- backup -------------------------------------------------------------------------------------
def test_backup_container_mode_streams_a_verified_archive(mongo):
    mongo.ws.write_config(mongo.config(container=True))
    result = mongo.backup()
    assert result.returncode == 0, result.stderr
    [backup] = mongo.ws.backups("mongo")
    assert backup.parent.name == "daily" and backup.name.startswith("backup_") and backup.name.endswith(".archive")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.parent.stat().st_mode) == 0o700
    record = record_of(backup)
    assert record["engine"] == "mongodb" and record["compression"] is None and record["verified"]["ok"]
    assert record["engine_meta"]["collections"] == {"users": 25, "lessons": 12, "empty": 0}
    assert record["engine_meta"]["database"] == "lemon_korean"
    assert {"gzip-integrity", "archive-magic", "collections-complete"} <= set(record["verified"]["checks"])
    assert walk(io.BytesIO(backup.read_bytes()))["gzip"] is True
    check = subprocess.run(["sha256sum", "-c", backup.name + ".sha256"], cwd=backup.parent, capture_output=True)
    assert check.returncode == 0
    assert "3 collections" in result.stderr

    [dump_call] = [c for c in mongo.docker_calls() if c[0] == "exec"]
    assert dump_call[:5] == ["exec", "-i", "-e", "LEMON_MONGO_CONFIG", "lemon-mongo"]
    [dump] = mongo.calls("mongodump")
    assert dump["container"] == "lemon-mongo"
    assert dump["argv"][:3] == ["--archive", "--gzip", "--db=lemon_korean"]
    assert "--username=3chan" in dump["argv"] and "--authenticationDatabase=admin" in dump["argv"]
    assert dump["argv"][-1] == "--config=/dev/fd/3" and dump["config_password_ok"] is True
    assert not any(a.startswith("--host") for a in dump["argv"])
    assert_password_never_leaked(mongo, result)
    assert not list(backup.parent.glob(".tmp-*"))


def test_backup_host_mode_connects_directly(mongo):
    mongo.ws.write_config(mongo.config(container=False))
    result = mongo.backup()
    assert result.returncode == 0, result.stderr
    [dump] = mongo.calls("mongodump")
    assert dump["container"] is None
    assert "--host=127.0.0.1" in dump["argv"] and "--port=27017" in dump["argv"]
    assert dump["config_password_ok"] is True
    assert mongo.docker_calls() == []
    assert_password_never_leaked(mongo, result)
    assert record_of(mongo.ws.backups("mongo")[0])["engine_meta"]["collections"]["users"] == 25

    verify = mongo.ws.invoke("verify")
    assert verify.returncode == 0, verify.stderr
    assert "OK (sha256, gzip-integrity" in verify.stderr


def test_backup_without_password_runs_the_tool_directly(mongo):
    mongo.ws.env.pop("MONGO_DOUBLE_PASSWORD")
    config = mongo.config(container=False)
    del config["databases"]["mongo"]["password_env"], config["databases"]["mongo"]["user"]
    mongo.ws.write_config(config)
    assert mongo.backup().returncode == 0
    [dump] = mongo.calls("mongodump")
    assert not any(a.startswith(("--config", "--username")) for a in dump["argv"])
    assert dump["parent_argv"][:2] != ["sh", "-c"]


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("truncate", "truncated"),
        ("badmagic", "not a mongodump archive"),
        ("badgzip", "-d (in flight) exited with status 1"),
    ],
)
def test_damaged_archive_is_refused_and_never_stored(mongo, mode, message):
    mongo.ws.write_config(mongo.config())
    result = mongo.backup(env={"MONGO_DOUBLE_DUMP": mode})
    assert result.returncode == 1
    assert "FAILED" in result.stderr and message in result.stderr, result.stderr
    assert mongo.ws.backups("mongo") == []
    assert not [p for p in (mongo.ws.backup_dir / "mongo").rglob("*") if p.is_file() and p.name != "last_run.json"]


def test_failing_mongodump_names_the_stage_and_stores_nothing(mongo):
    mongo.ws.write_config(mongo.config())
    result = mongo.backup(env={"MONGO_DOUBLE_FAIL": "mongodump"})
    assert result.returncode == 1
    assert "mongodump failed: exit status 1" in result.stderr and "connection reset" in result.stderr
    assert not [p for p in (mongo.ws.backup_dir / "mongo").rglob("*") if p.is_file() and p.name != "last_run.json"]


def test_wrong_password_fails_the_backup(mongo):
    mongo.ws.write_config(mongo.config())
    result = mongo.backup(env={"DB_PASSWORD": "not it"})
    assert result.returncode == 1 and "authentication failed" in result.stderr
    assert mongo.ws.backups("mongo") == []


def test_backup_all_handles_postgres_and_mongodb(mongo, sample_db):
    config = mongo.ws.postgres_config(sample_db.name)
    config["databases"]["mongo"] = mongo.config()["databases"]["mongo"]
    mongo.ws.write_config(config)
    result = mongo.ws.invoke("backup", "--all")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 database(s) backed up" in result.stdout
    assert len(mongo.ws.backups("pg")) == 1 and len(mongo.ws.backups("mongo")) == 1
    listing = mongo.ws.invoke("list")
    assert "mongo (mongodb, lemon_korean): 1 backup(s)" in listing.stdout


def test_repository_backup_yml_has_both_engines(workspace):
    config = ROOT / "backup.yml"
    assert workspace.invoke("validate", "--config", str(config)).returncode == 0
    data = yaml.safe_load(config.read_text())
    assert data["databases"]["mongodb"] == {
        "engine": "mongodb",
        "database": "lemon_korean",
        "user": "3chan",
        "container": "lemon-mongo",
        "auth_database": "admin",
        "password_env": "DB_PASSWORD",
    }
    plan = workspace.invoke("backup", "--all", "--dry-run", "--config", str(config))
    assert plan.returncode == 0, plan.stderr
    assert "mongodb/daily/backup_" in plan.stdout or "mongodb/" in plan.stdout
    assert ".archive via mongodump" in plan.stdout


# -- restore ------------------------------------------------------------------------------------
def damage(mongo: Mongo) -> dict:
    state = mongo.state()
    state["lemon_korean"]["users"] = state["lemon_korean"]["users"][:3]
    del state["lemon_korean"]["lessons"]
    mongo.set_state(state)
    return state


def safety_archives(mongo: Mongo) -> list[Path]:
    return sorted((mongo.ws.backup_dir / "mongo" / "pre-restore").glob("pre_restore_*.archive"))


def test_restore_takes_a_safety_archive_then_restores_and_checks_counts(mongo):
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    damaged = damage(mongo)

    result = mongo.restore("--file", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert counts(mongo.state()) == {"users": 25, "lessons": 12, "empty": 0}
    assert mongo.state()["lemon_korean"]["users"] == INITIAL["lemon_korean"]["users"]
    assert mongo.state()["other"] == INITIAL["other"]

    [safety] = safety_archives(mongo)
    assert stat.S_IMODE(safety.stat().st_mode) == 0o600
    assert stat.S_IMODE(safety.parent.stat().st_mode) == 0o700
    assert {c["collection"]: c["documents"] for c in walk(io.BytesIO(safety.read_bytes()))["collections"]} == counts(
        damaged
    )
    tools = [c["tool"] for c in mongo.calls()]
    assert tools == ["mongodump", "mongodump", "mongorestore", "mongosh"]  # backup, safety, restore, check
    [restore_call] = mongo.calls("mongorestore")
    assert restore_call["argv"][:5] == ["--archive", "--gzip", "--drop", "--stopOnError", "--nsInclude=lemon_korean.*"]
    assert not any(a.startswith("--nsFrom") for a in restore_call["argv"])
    assert restore_call["stdin_size"] == mongo.ws.backups("mongo")[0].stat().st_size
    assert restore_call["config_password_ok"] is True
    assert f"safety archive {safety}" in result.stdout
    assert_password_never_leaked(mongo, result)
    # safety archives are not backups: never listed, never pruned
    assert "1 backup(s)" in mongo.ws.invoke("list").stdout


def test_safety_archive_is_encrypted_when_backups_are_and_puts_the_database_back(mongo, tmp_path):
    """With encryption configured, the copy of the live database taken before a restore is stored
    encrypted too (no plaintext copy of production data on disk), verified, and restorable."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    config = mongo.config()
    config["encryption"] = {"mode": "symmetric", "passphrase_env": "BACKUP_PASSPHRASE", "gnupghome": str(home)}
    mongo.ws.write_config(config)
    mongo.ws.env["BACKUP_PASSPHRASE"] = "a passphrase for the safety archive test"
    assert mongo.backup().returncode == 0
    damaged = damage(mongo)

    result = mongo.restore("--file", "latest", "--yes")
    assert result.returncode == 0, result.stderr
    assert counts(mongo.state()) == {"users": 25, "lessons": 12, "empty": 0}
    assert safety_archives(mongo) == []  # no plaintext .archive
    [safety] = sorted((mongo.ws.backup_dir / "mongo" / "pre-restore").glob("pre_restore_*.archive.gpg"))
    assert stat.S_IMODE(safety.stat().st_mode) == 0o600
    assert b"lemon_korean" not in safety.read_bytes() and b"users" not in safety.read_bytes()
    record = record_of(safety)
    assert record["encryption"]["mode"] == "symmetric" and record["tier"] == "pre-restore"
    assert "gpg-decrypt" in record["verified"]["checks"]

    back = mongo.restore("--db", "mongo", "--file", str(safety), "--yes")  # the undo command
    assert back.returncode == 0, back.stderr
    # every collection of the archive is back as it was ('lessons', which the damage removed and
    # the restore brought back, stays: mongorestore --drop only drops what the archive holds)
    now = mongo.state()["lemon_korean"]
    assert {name: now[name] for name in damaged["lemon_korean"]} == damaged["lemon_korean"]


def test_restore_into_another_database_leaves_the_configured_one_alone(mongo):
    mongo.ws.write_config(mongo.config(container=False))
    assert mongo.backup().returncode == 0
    damaged = damage(mongo)

    result = mongo.restore("--file", "latest", "--into", "lemon_scratch", "--yes")
    assert result.returncode == 0, result.stderr
    state = mongo.state()
    assert state["lemon_scratch"] == INITIAL["lemon_korean"]
    assert state["lemon_korean"] == damaged["lemon_korean"]
    [restore_call] = mongo.calls("mongorestore")
    assert "--nsFrom=lemon_korean.*" in restore_call["argv"] and "--nsTo=lemon_scratch.*" in restore_call["argv"]
    [safety] = safety_archives(mongo)
    assert "lemon_scratch" in safety.name
    assert walk(io.BytesIO(safety.read_bytes()))["collections"] == []
    assert_password_never_leaked(mongo, result)


def test_failed_restore_names_the_safety_archive_and_its_command_works(mongo):
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    damaged = damage(mongo)

    result = mongo.restore("--file", "latest", "--yes", env={"MONGO_DOUBLE_FAIL": "mongorestore"})
    assert result.returncode == 1
    [safety] = safety_archives(mongo)
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("FAILED: mongorestore failed")
    assert "may be partly restored" in message and str(safety) in message
    hint = message.split("put it back with: ", 1)[1]
    assert hint.startswith("invoke restore --engine mongodb --db mongo --file ")
    assert counts(mongo.state()) != counts(damaged)  # the double left a partial restore

    argv = hint.split()
    again = mongo.ws.invoke(*argv[1:])  # the suggested command, as the operator would run it
    assert again.returncode == 0, again.stderr
    assert mongo.state()["lemon_korean"] == damaged["lemon_korean"]


def test_count_mismatch_after_restore_fails_with_the_safety_archive(mongo):
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    [backup] = mongo.ws.backups("mongo")
    record = record_of(backup)
    record["engine_meta"]["collections"]["users"] = 26
    backup.with_name(backup.name + ".json").write_text(json.dumps(record))
    result = mongo.restore("--file", "latest", "--yes")
    assert result.returncode == 1
    assert "users: 25 documents, expected 26" in result.stderr
    assert str(safety_archives(mongo)[0]) in result.stderr


def test_failing_count_check_names_the_safety_archive(mongo):
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    result = mongo.restore("--file", "latest", "--yes", env={"MONGO_DOUBLE_FAIL": "mongosh"})
    assert result.returncode == 1
    assert "could not count the restored documents" in result.stderr and "ECONNREFUSED" in result.stderr
    assert f"The safety archive of 'lemon_korean' is {safety_archives(mongo)[0]}" in result.stderr


def test_missing_shell_is_a_clear_error_before_anything_is_touched(mongo, tmp_path):
    bin_dir = tmp_path / "no-shell-bin"
    bin_dir.mkdir()
    for tool in ("mongodump", "mongorestore"):
        (bin_dir / tool).symlink_to(MONGO_DOUBLES / tool)
    mongo.ws.env["PATH"] = mongo.ws.env["PATH"].replace(str(MONGO_DOUBLES), str(bin_dir))
    mongo.ws.write_config(mongo.config(container=False))
    assert mongo.backup().returncode == 0
    result = mongo.restore("--file", "latest", "--yes")
    assert result.returncode == 2
    assert "neither mongosh nor the legacy mongo shell is installed on this host" in result.stderr
    assert "nothing was touched" in result.stderr
    assert mongo.calls("mongorestore") == [] and safety_archives(mongo) == []


def test_legacy_mongo_shell_is_used_when_mongosh_is_missing(mongo, tmp_path):
    bin_dir = tmp_path / "legacy-bin"
    bin_dir.mkdir()
    for tool in ("mongodump", "mongorestore"):
        (bin_dir / tool).symlink_to(MONGO_DOUBLES / tool)
    (bin_dir / "mongo").symlink_to(MONGO_DOUBLES / "mongosh")
    mongo.ws.env["PATH"] = mongo.ws.env["PATH"].replace(str(MONGO_DOUBLES), str(bin_dir))
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    damage(mongo)
    result = mongo.restore("--file", "latest", "--yes", "--drop-previous")
    assert result.returncode == 0, result.stderr
    assert [c["tool"] for c in mongo.calls()][-1] == "mongo"
    assert counts(mongo.state()) == {"users": 25, "lessons": 12, "empty": 0}
    assert safety_archives(mongo) == []  # --drop-previous deletes it after a verified restore


def test_corrupt_file_is_refused_before_any_database_is_touched(mongo, tmp_path):
    mongo.ws.write_config(mongo.config())
    data = builder.gzipped(builder.build("lemon_korean", INITIAL["lemon_korean"]))
    broken = tmp_path / "backup_20260101_020000.archive"  # no record: like the old scripts' files
    broken.write_bytes(data[: len(data) - 30])
    result = mongo.restore("--file", str(broken), "--yes")
    assert result.returncode == 1
    assert "failed verification" in result.stderr
    assert mongo.calls() == []  # not even a safety dump


def test_old_script_archive_without_record_restores_with_counts_from_the_walk(mongo, tmp_path):
    mongo.ws.write_config(mongo.config())
    old = tmp_path / "backup_20260101_020000.archive"
    old.write_bytes(builder.gzipped(builder.build("lemon_korean", {"users": [{"_id": 1}, {"_id": 2}]})))
    result = mongo.restore("--file", str(old), "--into", "from_old", "--yes")
    assert result.returncode == 0, result.stderr
    assert counts(mongo.state(), "from_old") == {"users": 2}


def test_restore_refuses_without_confirmation(mongo):
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    result = mongo.restore("--file", "latest")
    assert result.returncode == 2 and "pass --yes" in result.stderr
    assert mongo.calls("mongorestore") == []


# -- the doubles' own contract --------------------------------------------------------------------
def double_env(mongo: Mongo) -> dict:
    env = dict(mongo.ws.env)
    env.pop("DB_PASSWORD")
    return env


def test_double_refuses_a_password_on_argv(mongo):
    proc = subprocess.run(
        [
            str(MONGO_DOUBLES / "mongodump"),
            "--archive",
            "--db=lemon_korean",
            "--username=3chan",
            f"--password={PASSWORD}",
        ],
        env=double_env(mongo),
        capture_output=True,
    )
    assert proc.returncode == 97 and b"password is on a command line" in proc.stderr


def test_double_refuses_a_config_file_on_disk(mongo, tmp_path):
    config = tmp_path / "config.yml"
    config.write_text("password: " + json.dumps(PASSWORD))
    proc = subprocess.run(
        [str(MONGO_DOUBLES / "mongodump"), "--archive", "--db=lemon_korean", "--username=3chan", f"--config={config}"],
        env=double_env(mongo),
        capture_output=True,
    )
    assert proc.returncode == 96


def test_double_refuses_a_password_in_its_environment(mongo):
    proc = subprocess.run(
        [str(MONGO_DOUBLES / "mongodump"), "--archive", "--db=lemon_korean"],
        env={**double_env(mongo), "LEAK": PASSWORD},
        capture_output=True,
    )
    assert proc.returncode == 98


def test_double_dump_is_a_real_archive_and_restore_consumes_it(mongo):
    env = {**double_env(mongo)}
    env.pop("MONGO_DOUBLE_PASSWORD")
    dump = subprocess.run(
        [str(MONGO_DOUBLES / "mongodump"), "--archive", "--db=lemon_korean"], env=env, capture_output=True
    )
    assert dump.returncode == 0
    _, _, namespaces = builder.parse(dump.stdout)
    assert len(namespaces[("lemon_korean", "users")]) == 25
    restore = subprocess.run(
        [str(MONGO_DOUBLES / "mongorestore"), "--archive", "--drop", "--nsFrom=lemon_korean.*", "--nsTo=copy.*"],
        input=dump.stdout,
        env=env,
        capture_output=True,
    )
    assert restore.returncode == 0, restore.stderr
    assert mongo.state()["copy"] == INITIAL["lemon_korean"]
    truncated = subprocess.run(
        [str(MONGO_DOUBLES / "mongorestore"), "--archive"], input=dump.stdout[:-10], env=env, capture_output=True
    )
    assert truncated.returncode == 1


# -- drills -------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", [True, False])
def test_drill_restores_counts_and_drops_its_throwaway(mongo, container):
    mongo.ws.write_config(mongo.config(container=container))
    assert mongo.backup().returncode == 0
    result = mongo.ws.invoke("drill")
    assert result.returncode == 0, result.stderr
    assert "1 of 1 database(s) proven restorable" in result.stdout
    assert "3 collections / 37 documents match the record" in result.stderr
    state = mongo.state()
    assert not [name for name in state if "_drill_" in name]  # the throwaway was dropped
    assert counts(state) == counts(INITIAL) and state["other"] == INITIAL["other"]  # nothing else touched
    [drop] = [c for c in mongo.calls() if c["tool"] in ("mongosh", "mongo") and "dropDatabase()" in c["argv"][-1]]
    assert "_drill_" in json.loads(drop["argv"][-1].split(";", 1)[0][len("var P = ") :])["db"]
    assert not list((mongo.ws.backup_dir / "mongo").glob("pre-restore/*"))  # no safety archive of a throwaway
    assert_password_never_leaked(mongo, result)


def test_drill_fails_when_the_throwaway_cannot_be_dropped(mongo):
    mongo.ws.write_config(mongo.config())
    assert mongo.backup().returncode == 0
    result = mongo.ws.invoke("drill", env={"MONGO_DOUBLE_FAIL": "mongosh-drop"})
    assert result.returncode == 1, result.stderr
    [leftover] = [name for name in mongo.state() if "_drill_" in name]
    assert f"throwaway database {leftover} was left behind" in result.stderr
    assert "dropDatabase()" in result.stderr and "not authorized" in result.stderr
    assert_password_never_leaked(mongo, result)
