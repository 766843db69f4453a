"""backup.yml, .env and the old scripts' environment variables (no database needed)."""

from __future__ import annotations

import pytest

from lib.config import load_spec, read_dotenv, validation_errors
from lib.errors import ConfigError

BASE = """version: 1
databases:
  postgres:
    engine: postgres
    database: lemon_korean
    user: 3chan
    container: lemon-postgres
"""


def write(tmp_path, text, name="backup.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_repository_backup_yml_is_valid(workspace):
    from conftest import ROOT

    result = workspace.invoke("validate", "--config", str(ROOT / "backup.yml"))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_defaults_match_the_old_scripts(tmp_path):
    spec = load_spec(write(tmp_path, BASE), environ={})
    db = spec.databases["postgres"]
    assert spec.backup_dir == (tmp_path / "backups").resolve()
    assert dict(db.retention) == {"daily": 7, "weekly": 30, "monthly": 90}
    assert (spec.weekly_on, spec.monthly_on) == (6, 1)
    assert (db.database, db.user, db.container) == ("lemon_korean", "3chan", "lemon-postgres")


def test_environment_overrides_win_and_empty_values_are_ignored(tmp_path):
    env = {"BACKUP_DIR": "/srv/bk", "DB_NAME": "other", "DB_USER": "", "POSTGRES_CONTAINER": "pg2"}
    spec = load_spec(write(tmp_path, BASE), environ=env)
    db = spec.databases["postgres"]
    assert str(spec.backup_dir) == "/srv/bk"
    assert (db.database, db.user, db.container) == ("other", "3chan", "pg2")


def test_dotenv_fills_but_never_overrides(tmp_path):
    write(tmp_path, '# old scripts\nexport DB_NAME="from_env_file"\nDB_USER=envuser # comment\nBACKUP_DIR=\n', ".env")
    spec = load_spec(write(tmp_path, BASE), environ={"DB_USER": "shell_user"})
    db = spec.databases["postgres"]
    assert (db.database, db.user) == ("from_env_file", "shell_user")


def test_dotenv_bad_line_is_named(tmp_path):
    path = write(tmp_path, "GOOD=1\nthis is not an assignment\n", ".env")
    with pytest.raises(ConfigError, match=r"line 2: expected KEY=VALUE"):
        read_dotenv(path)


def test_invalid_yaml_is_one_line_with_position(tmp_path, workspace):
    workspace.write_config("version: 1\ndatabases:\n  postgres: [unclosed\n")
    result = workspace.invoke("validate")
    assert result.returncode == 2
    assert "not valid YAML at line" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_duplicate_keys_are_refused(workspace):
    workspace.write_config(BASE + "    database: again\n")
    result = workspace.invoke("validate")
    assert result.returncode == 2
    assert "duplicate key 'database'" in result.stderr


def test_every_schema_problem_is_reported_at_once_with_its_path(workspace):
    workspace.write_config(
        BASE
        + """    retention:
      daily: {keep_days: -1}
    colour: blue
  mysql:
    engine: mysql
    database: x
retention:
  weekly: {keep: 3}
"""
    )
    result = workspace.invoke("validate")
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "At 'databases.postgres.retention.daily.keep_days': -1 is less than the minimum of 0" in err
    assert "At 'databases.postgres': Additional properties are not allowed ('colour' was unexpected)" in err
    assert "At 'databases.mysql.engine': 'mysql' is not one of ['postgres', 'mongodb', 's3']" in err
    assert "At 'retention.weekly'" in err
    assert "Traceback" not in err


def test_container_and_host_together_is_an_error():
    errors = validation_errors(
        {"version": 1, "databases": {"pg": {"engine": "postgres", "database": "d", "container": "c", "host": "h"}}}
    )
    assert errors == ["At 'databases.pg': set only one of container or host, not both"]


def test_missing_config_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="pass --config PATH or set \\$BACKUP_CONFIG"):
        load_spec(tmp_path / "nope.yml", environ={})


def test_backup_config_variable_picks_the_file(tmp_path):
    path = write(tmp_path, BASE, "elsewhere.yml")
    assert load_spec(None, environ={"BACKUP_CONFIG": str(path)}).config_path == path


def test_password_env_must_name_a_variable_not_hold_a_password():
    errors = validation_errors(
        {"version": 1, "databases": {"pg": {"engine": "postgres", "database": "d", "password_env": "hunter2!"}}}
    )
    assert errors == [
        "At 'databases.pg.password_env': must be the NAME of an environment variable (letters, digits, _), "
        "not the secret itself"
    ]


def test_duplicate_destination_names_are_reported_by_validate_with_schema_problems(workspace, tmp_path):
    target = tmp_path / "nas"
    target.mkdir()
    workspace.write_config(
        BASE
        + f"""    colour: blue
destinations:
  - {{name: vault, type: rsync, target: {target}}}
  - {{name: other, type: rsync, target: {target}}}
  - {{name: vault, type: rsync, target: {target}}}
"""
    )
    result = workspace.invoke("validate")
    assert result.returncode == 2, result.stderr
    assert "has 2 problems" in result.stderr
    assert (
        "At 'destinations[2].name': destination name 'vault' is already used by destinations[0]; "
        "names must be unique" in result.stderr
    )
    assert "'colour' was unexpected" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fmt", "problem"),
    [
        (["--clean"], "plain", "--clean without --if-exists makes every restore fail on its first DROP"),
        (["-c", "--exclude-table=audit_log"], "plain", "add --if-exists, or drop --clean"),
        (["-Fc"], "plain", "'-Fc' cannot be used: the format is chosen by the database's 'format' key"),
        (["--format=custom"], "custom", "set format: plain|custom instead"),
        (["--file=/tmp/x.sql"], "plain", "'--file=/tmp/x.sql' cannot be used: the dump must go to the pipeline"),
        (["-f/tmp/x.sql"], "custom", "'-f/tmp/x.sql' cannot be used"),
    ],
)
def test_dump_args_that_break_every_backup_or_restore_are_refused(args, fmt, problem):
    db = {"engine": "postgres", "database": "d", "format": fmt, "dump_args": args}
    errors = validation_errors({"version": 1, "databases": {"pg": db}})
    assert len(errors) == 1, errors
    assert errors[0].startswith("At 'databases.pg.dump_args': ")
    assert problem in errors[0]


@pytest.mark.parametrize(
    ("args", "fmt"),
    [
        (["--clean", "--if-exists"], "plain"),
        (["--clean"], "custom"),
        (["--exclude-table=audit_log", "--schema=public"], "plain"),
    ],
)
def test_dump_args_that_work_are_accepted(args, fmt):
    db = {"engine": "postgres", "database": "d", "format": fmt, "dump_args": args}
    assert validation_errors({"version": 1, "databases": {"pg": db}}) == []
