"""The documentation cannot rot: the generated references match their sources (lib/docs.py), every
link between the pages resolves, README keeps CI's test command, and every command a page marks as
runnable is run against the real test PostgreSQL server.

Runnable examples are fenced blocks whose info string is ``console runnable``::

    ```console runnable
    $ .venv/bin/invoke backup --all
    summary: 1 of 1 database(s) backed up
    $ .venv/bin/invoke restore --engine postgres --file latest --into lemon_korean  # exit 2
    error: --into lemon_korean: that is the database backup.yml configures as 'postgres'...
    ```

Lines starting with ``$ `` are commands (``.venv/bin/invoke ...``, and ``mkdir DIR`` for a directory
relative to the project); ``# exit N`` says which exit status is expected (default 0). The other lines are output the command must print (stdout or stderr),
each within one line of it, ``...`` standing for anything. The blocks of one page run in order in one
fresh workspace whose backup.yml configures one PostgreSQL database, ``postgres``, holding sample data;
``lemon_korean`` in a block is that database's (unique) name, so the pages read like the real setup.
A page may add to that backup.yml with ``yaml runnable-config`` blocks (merged in before its commands run)
and write the .env file next to it with ``ini runnable-env`` blocks.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DOUBLES, PGHOST, PGPORT, PGUSER, ROOT, ScratchDB, Workspace

from lib import docs

DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOC_PAGES]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.M | re.S)
EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
DOC_DATABASE = "lemon_korean"


# -- generated references --------------------------------------------------------------------------


def test_config_reference_matches_the_schema():
    assert (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8") == docs.config_reference(), (
        "docs/config-reference.md is out of date with schema/backup.schema.json; run .venv/bin/python -m lib.docs"
    )


def test_tasks_reference_matches_the_tasks_help_texts():
    assert (ROOT / "docs" / "tasks-reference.md").read_text(encoding="utf-8") == docs.tasks_reference(), (
        "docs/tasks-reference.md is out of date with tasks.py; run .venv/bin/python -m lib.docs"
    )


def test_the_check_notices_a_changed_schema():
    schema = json.loads(docs.SCHEMA_PATH.read_text(encoding="utf-8"))
    changed = copy.deepcopy(schema)
    changed["$defs"]["postgres"]["properties"]["format"]["description"] = "A description nobody wrote yet."
    changed["$defs"]["monitoring"]["properties"]["new_key"] = {"description": "Brand new.", "type": "integer"}
    text = docs.config_reference(changed)
    assert text != docs.config_reference(schema)
    assert "A description nobody wrote yet." in text
    assert "### `monitoring.new_key`" in text


def test_the_tasks_reference_shows_each_flag_help_and_survives_being_generated_twice():
    text = docs.tasks_reference()
    assert text == docs.tasks_reference()  # Invoke pops help texts while listing arguments; they must stay
    restore = text.split("\n## restore\n", 1)[1].split("\n## ", 1)[0]
    assert (
        "| `--into DATABASE` | Restore into this database instead, leaving the configured one alone "
        "(s3: BUCKET or BUCKET/PREFIX, created when missing). |" in restore
    )
    assert "| `--from DEST` |" in restore
    assert "| `--db NAME` | Back up this database (the name under 'databases:'); repeatable. |" in text


def test_the_docs_command_rewrites_a_stale_page_and_check_reports_it(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config-reference.md"
    stale.write_text("# old\n", encoding="utf-8")
    monkeypatch.setattr(docs, "pages", lambda: {stale: docs.config_reference()})
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs.main(["--check"]) == 1
    assert "config-reference.md is out of date" in capsys.readouterr().err
    assert stale.read_text(encoding="utf-8") == "# old\n"  # --check writes nothing
    assert docs.main([]) == 0
    assert stale.read_text(encoding="utf-8") == docs.config_reference()
    assert docs.main(["--check"]) == 0


def test_invoke_docs_check_passes_on_this_checkout():
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), "docs", "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_every_schema_key_has_a_description_and_an_example():
    schema = json.loads(docs.SCHEMA_PATH.read_text(encoding="utf-8"))
    missing = []
    for entry in docs.SchemaWalker(schema).walk():
        node = entry.node
        if not node.get("description"):
            missing.append(f"{entry.path}: description")
        examples = node.get("examples") or [e for v in node.get("oneOf", []) for e in v.get("examples", [])]
        if not examples and "enum" not in node and "const" not in node:
            missing.append(f"{entry.path}: examples")
    assert not missing, "add to schema/backup.schema.json: " + ", ".join(missing)


DESTINATION_BASES = {
    "rsync": {"name": "nas", "type": "rsync", "target": "/mnt/nas/lemon-korean"},
    "sftp": {
        "name": "vault",
        "type": "sftp",
        "host": "vault.example.com",
        "user": "backup",
        "path": "/srv",
        "identity_file": "k",
    },
    "s3": {"name": "cloud", "type": "s3", "bucket": "lemon-backups"},
}


def config_with(path: str, condition: str, value):
    """A minimal valid backup.yml with ``value`` put at the documented ``path`` (``<name>`` is one
    database, ``[]`` one destination, of the engine or type the condition names)."""
    wants = dict(re.findall(r"(engine|type): (\w[\w-]*)", condition))
    engine = wants.get("engine", "postgres")
    base = (
        {"engine": "s3", "bucket": "lemon-media"} if engine == "s3" else {"engine": engine, "database": "lemon_korean"}
    )
    data = {"version": 1, "databases": {"pg": base}}
    parts = path.replace("[]", ".[]").split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if part == "<name>":
            node = node["pg"]
        elif part == "[]":
            node = node[0]
        elif parts[i + 1] == "[]":
            node = node.setdefault(part, [copy.deepcopy(DESTINATION_BASES[wants.get("type", "rsync")])])
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    node["pg" if last == "<name>" else last] = value
    if "object form" in condition:  # a hook's mapping: a command, a string one with shell: true
        shell = node.get("shell") is True or isinstance(node.get("command"), str)
        node.setdefault("command", "true" if shell else ["true"])
        if isinstance(node["command"], str):
            node["shell"] = True
    if path.startswith("destinations[].ssh."):
        node.setdefault("identity_file", "k")
        node.setdefault("known_hosts", "kh")
    if last == "target" and ":" in value:  # rsync over ssh needs its ssh block
        node["ssh"] = {"identity_file": "k", "known_hosts": "kh"}
    if engine == "s3" and any(key in base for key in ("access_key_env", "secret_key_env", "session_token_env")):
        base.setdefault("access_key_env", "S3_ACCESS_KEY_ID")
        base.setdefault("secret_key_env", "S3_SECRET_ACCESS_KEY")
    if wants.get("type") == "s3":  # keys that only come together
        dest = data["destinations"][0]
        if any(key in dest for key in ("access_key_env", "secret_key_env", "session_token_env")):
            dest.setdefault("access_key_env", "S3_ACCESS_KEY_ID")
            dest.setdefault("secret_key_env", "S3_SECRET_ACCESS_KEY")
        if isinstance(dest.get("server_side_encryption"), dict):
            dest["server_side_encryption"].setdefault("algorithm", "aws:kms")
        if isinstance(dest.get("object_lock"), dict):
            dest["object_lock"].setdefault("mode", "governance")
    return data


def test_every_example_in_the_reference_is_valid():
    from lib.config import validation_errors

    schema = json.loads(docs.SCHEMA_PATH.read_text(encoding="utf-8"))
    checked, wrong = 0, []
    for entry in docs.SchemaWalker(schema).walk():
        for example in entry.node.get("examples", []):
            data = config_with(entry.path, entry.condition, example)
            problems = validation_errors(data)
            checked += 1
            if problems:
                wrong.append(f"{entry.path} = {example!r}: {problems}")
    assert checked > 40
    assert not wrong, "\n".join(wrong)
    assert validation_errors(config_with("databases.<name>.port", "engine: postgres", 0))  # the check can fail


def test_every_key_of_the_default_backup_yml_is_in_the_reference():
    text = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")

    def paths(data, prefix=""):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else key
            if prefix == "databases":
                path = "databases.<name>"
            yield path
            if isinstance(value, dict):
                yield from paths(value, path)

    sections = {m[1]: m[2] for m in re.finditer(r"^### `([^`]+)`[^\n]*\n(.*?)(?=^### |\Z)", text, re.M | re.S)}

    def documented(path: str) -> bool:
        if path in sections:
            return True
        parent, _, rest = path.rpartition(".")
        while parent:
            same = re.search(r"the same as under \[`([^`]+)`\]", sections.get(parent, ""))
            if same:
                return documented(f"{same[1]}.{rest}")
            parent, _, head = parent.rpartition(".")
            rest = f"{head}.{rest}"
        return False

    config = yaml.safe_load((ROOT / "backup.yml").read_text(encoding="utf-8"))
    assert "retention.weekly.keep_days" in set(paths(config))
    absent = [p for p in paths(config) if not documented(p)]
    assert not absent
    assert not documented("retention.weekly.no_such_key")


# -- README and links ------------------------------------------------------------------------------


def test_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".venv/bin/python -m pytest -q" in readme  # .ci/run runs README's test command
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash .ci/setup" in readme
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    pages = {f"docs/{p.name}" for p in DOC_PAGES}
    assert pages and pages <= linked, f"README does not link {sorted(pages - linked)}"
    for variable in ("POSTGRES_CONTAINER", "MONGO_CONTAINER", "BACKUP_DIR", "DB_NAME", "DB_USER", ".env"):
        assert variable in readme


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks), duplicates numbered."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = "".join(c for c in heading.strip().lower() if c.isalnum() or c in "-_ ").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_placeholder_is_read_as_an_html_tag(page):
    """``<db>`` outside code would be taken for an HTML tag and vanish from the rendered page."""
    text = re.sub(r"`[^`]*`", "", FENCE.sub("", page.read_text(encoding="utf-8")))
    tags = re.findall(r"<(?!!--)[A-Za-z/][^>\n]*>", text)
    assert not tags, f"{page.name}: write these in backticks or as &lt;: {tags}"


# -- runnable examples -----------------------------------------------------------------------------


def runnable_blocks(text: str) -> list[list[tuple[str, int, list[str]]]]:
    """Each ``console runnable`` block as [(command, expected exit status, expected output lines)]."""
    blocks = []
    for match in FENCE.finditer(text):
        if match["info"].split()[1:2] != ["runnable"]:
            continue
        steps: list[tuple[str, int, list[str]]] = []
        for line in match["body"].splitlines():
            if line.startswith("$ "):
                command = line[2:]
                status = EXIT.search(command)
                steps.append((EXIT.sub("", command), int(status[1]) if status else 0, []))
            elif line.strip():
                assert steps, f"output before any command in a runnable block: {line!r}"
                steps[-1][2].append(line.strip())
        blocks.append(steps)
    return blocks


def shows(expected: str, output: str) -> bool:
    """True when one line of ``output`` holds the pieces of ``expected`` (split at '...') in order."""
    pieces = [p.strip() for p in expected.split("...") if p.strip()]
    for line in output.splitlines():
        at = 0
        for piece in pieces:
            at = line.find(piece, at)
            if at < 0:
                break
            at += len(piece)
        else:
            return True
    return False


def test_the_example_parser_reads_commands_exits_and_output():
    text = (
        "```console runnable\n$ .venv/bin/invoke list\npg (postgres, ...): 1 backup(s)\n"
        "$ .venv/bin/invoke restore --into postgres   # exit 2\n```\n"
        "```console\n$ .venv/bin/invoke backup --all\n```\n"
    )
    assert runnable_blocks(text) == [
        [
            (".venv/bin/invoke list", 0, ["pg (postgres, ...): 1 backup(s)"]),
            (".venv/bin/invoke restore --into postgres", 2, []),
        ]
    ]
    assert shows("pg (postgres, ...): 1 backup(s)", "x\npg (postgres, lemon): 1 backup(s)\n")
    assert not shows("pg (postgres, ...): 1 backup(s)", "pg (postgres, lemon): 2 backup(s)")
    assert not shows("a ... b", "b then a")


def page_setup(text: str) -> tuple[dict, str]:
    """What a page adds to the workspace before its commands run: the ``yaml runnable-config`` blocks
    (merged into backup.yml) and the ``ini runnable-env`` blocks (the .env file next to it)."""
    config: dict = {}
    env = ""
    for match in FENCE.finditer(text):
        kind = match["info"].split()[1:2]
        if kind == ["runnable-config"]:
            merge(config, yaml.safe_load(match["body"]))
        elif kind == ["runnable-env"]:
            env += match["body"]
    return config, env


def merge(into: dict, extra: dict) -> dict:
    """Deep-merge mapping ``extra`` into ``into`` (lists and values replace)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def test_page_setup_merges_config_blocks_and_collects_env():
    text = (
        "```yaml runnable-config\nencryption:\n  mode: symmetric\n```\n"
        "```yaml\nignored: 1\n```\n"
        "```yaml runnable-config\nencryption:\n  passphrase_env: P\n```\n"
        "```ini runnable-env\nP=secret\n```\n"
    )
    assert page_setup(text) == ({"encryption": {"mode": "symmetric", "passphrase_env": "P"}}, "P=secret\n")


RUNNABLE_PAGES = [p for p in PAGES if runnable_blocks(p.read_text(encoding="utf-8"))]


def test_some_pages_have_runnable_examples():
    names = {p.name for p in RUNNABLE_PAGES}
    assert {"README.md", "restoring.md", "operations.md", "encryption.md", "offsite.md"} <= names


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: p.name)
def test_runnable_examples(page, tmp_path):
    """Every runnable command of ``page``, in order, in one fresh workspace: exit status and output."""
    db = ScratchDB()
    try:
        db.load_sample()
        ws = Workspace(tmp_path)
        ws.env.update(
            {
                "BACKUP_CRONTAB": str(DOUBLES / "fake-crontab"),
                "FAKE_CRONTAB_FILE": str(tmp_path / "crontab"),
                "BACKUP_SYSTEMD_DIR": str(tmp_path / "systemd"),
            }
        )
        text = page.read_text(encoding="utf-8").replace(DOC_DATABASE, db.name)
        extra, env = page_setup(text)
        config = {
            "version": 1,
            "backup_dir": "./backups",
            "databases": {
                "postgres": {
                    "engine": "postgres",
                    "database": db.name,
                    "user": PGUSER,
                    "host": PGHOST,
                    "port": int(PGPORT),
                }
            },
        }
        ws.write_config(merge(config, extra))
        if env:
            (tmp_path / ".env").write_text(env, encoding="utf-8")
            (tmp_path / ".env").chmod(0o600)
        for block in runnable_blocks(text):
            for command, status, expected in block:
                argv = shlex.split(command)
                if argv[0] == "mkdir":  # a local directory the example needs (relative to the project)
                    for name in (a for a in argv[1:] if not a.startswith("-")):
                        assert not Path(name).is_absolute() and ".." not in Path(name).parts, command
                        (tmp_path / name).mkdir(parents=True, exist_ok=True)
                    continue
                assert argv[:1] == [".venv/bin/invoke"], f"only .venv/bin/invoke and mkdir can be runnable: {command}"
                proc = ws.invoke(*argv[1:], timeout=120)
                output = proc.stdout + proc.stderr
                assert proc.returncode == status, f"{page.name}: `{command}` exited {proc.returncode}:\n{output}"
                for line in expected:
                    assert shows(line, output), f"{page.name}: `{command}` did not print {line!r}:\n{output}"
    finally:
        db.drop_all()
