"""Reading backup.yml: safe YAML (duplicate keys refused), .env, environment overrides,
JSON Schema validation with every problem reported at once, defaults, and the typed ``Spec``.

Knows nothing about databases or files beyond the config itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lib.errors import ConfigError
from lib.exec import protect_secrets

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "backup.schema.json"
TIERS = ("daily", "weekly", "monthly")
DEFAULT_RETENTION = {"daily": 7, "weekly": 30, "monthly": 90}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

#: zstd level for buckets: media is compressed already, so the fastest level (see docs/buckets.md)
BUCKET_COMPRESSION_LEVEL = 1

# The old shell scripts' environment variables, applied on top of backup.yml.
ENGINE_CONTAINER_ENV = {"postgres": "POSTGRES_CONTAINER", "mongodb": "MONGO_CONTAINER"}


@dataclass(frozen=True)
class DatabaseSpec:
    """One configured database. ``options`` holds every key as written (after overrides)."""

    name: str
    engine: str
    database: str
    user: str | None
    container: str | None
    host: str | None
    port: int | None
    password_env: str | None
    retention: Mapping[str, int]
    options: Mapping[str, Any]

    def password(self, env: Mapping[str, str]) -> str | None:
        """The password from the configured environment variable, or None when none is configured.

        Raises ConfigError when password_env names a variable that is unset or empty.
        """
        if not self.password_env:
            return None
        value = env.get(self.password_env)
        if not value:
            raise ConfigError(
                f"database '{self.name}': password_env names ${self.password_env}, which is not set; "
                f"export it or add it to the .env file next to backup.yml"
            )
        return value


@dataclass(frozen=True)
class Spec:
    """The validated configuration. Blocks owned by other modules stay as plain mappings."""

    config_path: Path
    backup_dir: Path
    weekly_on: int
    monthly_on: int
    retention: Mapping[str, int]
    databases: Mapping[str, DatabaseSpec]
    encryption: Mapping[str, Any]
    destinations: list[Mapping[str, Any]]
    monitoring: Mapping[str, Any]
    notify: Mapping[str, Any]
    schedule: Mapping[str, Any]
    env: Mapping[str, str] = field(repr=False)
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def base_dir(self) -> Path:
        """Directory holding backup.yml; relative paths in the file are relative to it."""
        return self.config_path.parent

    def resolve(self, path: str) -> Path:
        """A path from backup.yml, with ~ expanded and relative paths anchored at base_dir."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def secret_env_names(self) -> frozenset[str]:
        """Environment variables backup.yml names as holding secrets: every database's
        ``password_env``, ``encryption.passphrase_env`` and every destination's ``*_env`` key."""
        names = {db.password_env for db in self.databases.values() if db.password_env}
        for db in self.databases.values():  # e.g. a bucket source's access_key_env/secret_key_env
            names.update(v for k, v in db.options.items() if k.endswith("_env") and isinstance(v, str))
        if self.encryption.get("passphrase_env"):
            names.add(self.encryption["passphrase_env"])
        for block in self.destinations:  # e.g. an S3 destination's access_key_env/secret_key_env
            names.update(value for key, value in block.items() if key.endswith("_env") and isinstance(value, str))
        return frozenset(names)

    def select(self, names: list[str] | None) -> list[DatabaseSpec]:
        """Databases named by --db (all when ``names`` is empty). Raises ConfigError for unknown names."""
        if not names:
            return list(self.databases.values())
        unknown = [n for n in names if n not in self.databases]
        if unknown:
            known = ", ".join(self.databases) or "none"
            raise ConfigError(f"unknown database '{unknown[0]}' for --db; backup.yml defines: {known}")
        return [self.databases[n] for n in names]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    result: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in result:
            mark = key_node.start_mark
            raise ConfigError(f"{mark.name} line {mark.line + 1}: duplicate key '{key}'; keep only one of them")
        result[key] = loader.construct_object(value_node, deep=deep)
    return result


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a .env file (KEY=VALUE, optional 'export ', quotes, # comments). Missing file -> {}.

    Raises ConfigError for a line that is not KEY=VALUE.
    """
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; fix its permissions") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ConfigError(f"{path} line {number}: expected KEY=VALUE; fix or comment out that line")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def load_yaml(path: Path) -> Any:
    """Read YAML safely. Raises ConfigError (one line, with position) for unreadable or invalid YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass --config PATH or set $BACKUP_CONFIG") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path} is not valid YAML at {where}: {exc.problem}; fix the syntax there") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _path_text(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _error_text(error: jsonschema.ValidationError) -> str:
    last = error.absolute_path[-1] if error.absolute_path else ""
    if isinstance(last, str) and last.endswith("_env"):
        # never echo the value: someone may have put the secret itself here
        return "must be the NAME of an environment variable (letters, digits, _), not the secret itself"
    if error.validator == "not" and isinstance(error.validator_value, dict):
        required = error.validator_value.get("required")
        if required:
            return f"set only one of {' or '.join(required)}, not both"
    if error.validator == "required" and isinstance(error.schema, dict) and error.schema.get("x-hint"):
        return f"{error.message}; {error.schema['x-hint']}"
    if error.validator == "pattern" and isinstance(error.schema, dict) and error.schema.get("x-hint"):
        return f"{error.instance!r}: {error.schema['x-hint']}"
    if error.validator == "additionalProperties":
        return error.message + " (unknown key; see schema/backup.schema.json for the allowed ones)"
    return error.message


def validation_errors(data: Any) -> list[str]:
    """Every problem as 'At 'a.b[0].c': message': the schema's, sorted by path, then the checks a
    schema cannot express (``consistency_errors``). Empty list when valid."""
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    seen: list[str] = []
    for error in errors:
        line = f"At '{_path_text(error.absolute_path)}': {_error_text(error)}"
        if line not in seen:
            seen.append(line)
    return seen + consistency_errors(data)


#: pg_dump arguments the backup road cannot carry: (how the argument starts, why, the fix)
_PG_DUMP_ARGS_REFUSED = (
    ("--file", "the dump must go to the pipeline, not a file", "remove it"),
    ("-f", "the dump must go to the pipeline, not a file", "remove it"),
    ("--format", "the format is chosen by the database's 'format' key", "set format: plain|custom instead"),
    ("-F", "the format is chosen by the database's 'format' key", "set format: plain|custom instead"),
)


def _dump_args_errors(name: str, args: Any, plain: bool) -> list[str]:
    """pg_dump arguments that would break every backup or every restore of database ``name``
    (``plain``: its dumps are SQL scripts, where --clean writes DROP statements)."""
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return []
    where = f"At 'databases.{name}.dump_args'"
    problems = []
    for arg in args:
        for start, why, fix in _PG_DUMP_ARGS_REFUSED:
            long = start.startswith("--")
            if arg == start or arg.startswith(start + "=") if long else arg.startswith(start) and arg[1] != "-":
                problems.append(f"{where}: '{arg}' cannot be used: {why}; {fix}")
                break
    cleans = "--clean" in args or "-c" in args
    if plain and cleans and "--if-exists" not in args:
        problems.append(
            f"{where}: --clean without --if-exists makes every restore fail on its first DROP "
            f"(restores load into a new scratch database); add --if-exists, or drop --clean"
        )
    return problems


def consistency_errors(data: Any) -> list[str]:
    """Problems JSON Schema cannot express: a destination name used more than once (names are what
    --dest/--from and records refer to); pg_dump arguments that would break every backup or
    restore. Tolerates data the schema refused."""
    problems = []
    databases = data.get("databases") if isinstance(data, dict) else None
    if isinstance(databases, dict):
        for name, block in databases.items():
            if isinstance(block, dict) and block.get("engine", "postgres") == "postgres":
                plain = block.get("format", "plain") == "plain"
                problems += _dump_args_errors(str(name), block.get("dump_args"), plain)
    destinations = data.get("destinations") if isinstance(data, dict) else None
    if not isinstance(destinations, list):
        return problems
    first: dict[str, int] = {}
    for index, block in enumerate(destinations):
        name = block.get("name") if isinstance(block, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append(
                f"At 'destinations[{index}].name': destination name '{name}' is already used by "
                f"destinations[{first[name]}]; names must be unique"
            )
        else:
            first[name] = index
    return problems


def _apply_env_overrides(data: dict, env: Mapping[str, str]) -> None:
    """The old scripts' variables win over backup.yml (empty values are ignored, like ${VAR:-default})."""
    if env.get("BACKUP_DIR"):
        data["backup_dir"] = env["BACKUP_DIR"]
    databases = data.get("databases")
    if not isinstance(databases, dict):
        return
    for db in databases.values():
        if not isinstance(db, dict) or db.get("engine") == "s3":  # the old variables name databases
            continue
        if env.get("DB_NAME"):
            db["database"] = env["DB_NAME"]
        if env.get("DB_USER"):
            db["user"] = env["DB_USER"]
        container_var = ENGINE_CONTAINER_ENV.get(db.get("engine"))
        if container_var and env.get(container_var) and "host" not in db:
            db["container"] = env[container_var]


def _retention(block: Mapping | None, base: Mapping[str, int]) -> dict[str, int]:
    result = dict(base)
    for tier, keep in (block or {}).items():
        result[tier] = keep["keep_days"]
    return result


def load_spec(config_path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Spec:
    """Load and validate backup.yml into a Spec.

    ``config_path`` defaults to $BACKUP_CONFIG, then ./backup.yml. The .env file next to the config
    fills variables that ``environ`` (default os.environ) does not already set.
    The variables holding secrets (``Spec.secret_env_names``) are then kept away from every child
    process (lib.exec.protect_secrets; removed from os.environ, their values stay in ``Spec.env``).
    Raises ConfigError listing every problem at once.
    """
    environ = dict(os.environ if environ is None else environ)
    path = Path(config_path or environ.get("BACKUP_CONFIG") or "backup.yml").expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    env = read_dotenv(path.parent / ".env")
    env.update(environ)

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys (version, backup_dir, databases, ...)")
    _apply_env_overrides(data, env)
    problems = validation_errors(data)
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"{path}: {problems[0]}")
        raise ConfigError(f"{path} has {len(problems)} problems:\n  " + "\n  ".join(problems))

    retention = _retention(data.get("retention"), DEFAULT_RETENTION)
    databases = {}
    for name, db in data["databases"].items():
        if db["engine"] == "s3":  # a bucket: its name stands where a database's would
            db = {"compression_level": BUCKET_COMPRESSION_LEVEL, **db, "database": db["bucket"]}
            if db.get("ca_bundle"):
                db["ca_bundle"] = str(path.parent / os.path.expanduser(db["ca_bundle"]))
        databases[name] = DatabaseSpec(
            name=name,
            engine=db["engine"],
            database=db["database"],
            user=db.get("user"),
            container=db.get("container"),
            host=db.get("host"),
            port=db.get("port"),
            password_env=db.get("password_env"),
            retention=_retention(db.get("retention"), retention),
            options=db,
        )
    schedule = data.get("schedule") or {}
    backup_dir = data.get("backup_dir", "./backups")
    if env.get("BACKUP_DIR") and backup_dir == env["BACKUP_DIR"]:
        backup_path = Path(os.path.expanduser(backup_dir))
        backup_path = backup_path if backup_path.is_absolute() else Path.cwd() / backup_path
    else:
        backup_path = Path(os.path.expanduser(backup_dir))
        backup_path = backup_path if backup_path.is_absolute() else path.parent / backup_path
    spec = Spec(
        config_path=path,
        backup_dir=backup_path.resolve(),
        weekly_on=WEEKDAYS.index(schedule.get("weekly_on", "sunday")),
        monthly_on=schedule.get("monthly_on", 1),
        retention=retention,
        databases=databases,
        encryption=data.get("encryption") or {"mode": "none"},
        destinations=list(data.get("destinations") or []),
        monitoring=data.get("monitoring") or {},
        notify=data.get("notify") or {},
        schedule=schedule,
        env=env,
        raw=data,
    )
    protect_secrets(spec.secret_env_names)
    return spec
