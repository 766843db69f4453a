"""What is set on a PostgreSQL database itself, which pg_dump (without --create) leaves out:
owner, encoding, locale provider, collation, ctype, ICU locale and rules, connection limit,
tablespace, comment, privileges (ACL), ``ALTER DATABASE ... SET`` and ``ALTER ROLE ... IN
DATABASE ... SET``.

They are read in the backup run (``CAPTURE_SQL``, one JSON document) and stored in the record
(``database_properties``). A restore gives the scratch database the same: the locale and owner
when it is created (``create_options``), the rest after the load and its checks, just before the
swap (``apply_sql``): settings such as ``default_transaction_read_only`` or a connection limit of
0 would otherwise get in the load's way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# One row: the database's properties as JSON. Version-dependent columns (datlocprovider and
# daticulocale in 15, daticurules in 16, datlocale in 17) are read through to_jsonb, so one query
# serves every server version.
CAPTURE_SQL = r"""
SELECT json_build_object(
  'name', d.datname,
  'owner', pg_catalog.pg_get_userbyid(d.datdba),
  'encoding', pg_catalog.pg_encoding_to_char(d.encoding),
  'collate', d.datcollate,
  'ctype', d.datctype,
  'locale_provider', to_jsonb(d) ->> 'datlocprovider',
  'icu_locale', coalesce(to_jsonb(d) ->> 'daticulocale', to_jsonb(d) ->> 'datlocale'),
  'icu_rules', to_jsonb(d) ->> 'daticurules',
  'connection_limit', d.datconnlimit,
  'tablespace', t.spcname,
  'comment', pg_catalog.shobj_description(d.oid, 'pg_database'),
  'acl', (SELECT json_agg(json_build_object(
              'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
              'grantor', pg_catalog.pg_get_userbyid(a.grantor),
              'privilege', a.privilege_type,
              'grantable', a.is_grantable) ORDER BY a.n)
          FROM (SELECT x.*, row_number() OVER () AS n FROM pg_catalog.aclexplode(d.datacl) x) a),
  'acl_text', d.datacl::text,
  'settings', (SELECT json_agg(json_build_object(
                   'role', CASE WHEN s.setrole = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(s.setrole) END,
                   'config', s.setconfig) ORDER BY s.setrole)
               FROM pg_catalog.pg_db_role_setting s WHERE s.setdatabase = d.oid)
)
FROM pg_catalog.pg_database d JOIN pg_catalog.pg_tablespace t ON t.oid = d.dattablespace
WHERE d.datname = %s;
"""

# GUCs whose value is a list written as one string (GUC_LIST_QUOTE in the server): each element
# is quoted on its own, as pg_dumpall does.
LIST_GUCS = {
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "shared_preload_libraries",
    "local_preload_libraries",
    "unix_socket_directories",
}
PRIVILEGE_WORDS = {"CREATE": "CREATE", "CONNECT": "CONNECT", "TEMPORARY": "TEMPORARY"}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def capture_sql(dbname: str) -> str:
    return CAPTURE_SQL % quote_literal(dbname)


def parse(output: str) -> dict[str, Any] | None:
    """The JSON document CAPTURE_SQL printed, or None when the database does not exist."""
    text = output.strip()
    return json.loads(text) if text else None


_TEXT_KEYS = ("name", "owner", "encoding", "collate", "ctype", "locale_provider", "icu_locale", "icu_rules")


def checked(props: Any) -> dict[str, Any] | None:
    """A record's ``database_properties`` when they have the shape CAPTURE_SQL gives, else None
    (an edited or damaged record: the restore then keeps the target's, as for an old record).
    Values are only ever quoted into SQL; this keeps a wrong type from becoming a traceback."""
    if not isinstance(props, dict) or not isinstance(props.get("encoding"), str):
        return None
    ok = all(props.get(key) is None or isinstance(props[key], str) for key in (*_TEXT_KEYS, "tablespace", "comment"))
    ok = ok and isinstance(props.get("collate"), str) and isinstance(props.get("ctype"), str)
    ok = ok and (props.get("connection_limit") is None or type(props["connection_limit"]) is int)
    acl = props.get("acl")
    ok = ok and (acl is None or (isinstance(acl, list) and all(_acl_item(item) for item in acl)))
    settings = props.get("settings")
    ok = ok and (settings is None or (isinstance(settings, list) and all(_setting(item) for item in settings)))
    return props if ok else None


def _acl_item(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and all(item.get(k) is None or isinstance(item[k], str) for k in ("grantee", "grantor", "privilege"))
        and isinstance(item.get("grantable", False), bool)
    )


def _setting(item: Any) -> bool:
    config = item.get("config") if isinstance(item, dict) else None
    return (
        isinstance(item, dict)
        and (item.get("role") is None or isinstance(item["role"], str))
        and (config is None or (isinstance(config, list) and all(isinstance(c, str) for c in config)))
    )


def roles(props: Mapping[str, Any]) -> dict[str, set[str]]:
    """Roles the properties name: {"owner": {...}, "acl": {...}, "other": {...}}."""
    found: dict[str, set[str]] = {"owner": set(), "acl": set(), "other": set()}
    if props.get("owner"):
        found["owner"].add(props["owner"])
    for item in props.get("acl") or []:
        for key in ("grantee", "grantor"):
            if item.get(key) and item[key] != props.get("owner"):
                found["acl"].add(item[key])
    for setting in props.get("settings") or []:
        if setting.get("role"):
            found["other"].add(setting["role"])
    return found


def create_options(props: Mapping[str, Any], no_owner: bool = False) -> str:
    """The CREATE DATABASE options (after TEMPLATE template0) that give a new database these
    properties' encoding, locale, tablespace and owner."""
    parts = [f"ENCODING {quote_literal(props['encoding'])}"]
    provider = props.get("locale_provider")
    if provider in ("i", "c"):
        parts.append("LOCALE_PROVIDER " + ("icu" if provider == "i" else "libc"))
    parts.append(f"LC_COLLATE {quote_literal(props['collate'])} LC_CTYPE {quote_literal(props['ctype'])}")
    if provider == "i" and props.get("icu_locale"):
        parts.append(f"ICU_LOCALE {quote_literal(props['icu_locale'])}")
    if props.get("icu_rules"):
        parts.append(f"ICU_RULES {quote_literal(props['icu_rules'])}")
    if props.get("tablespace") and props["tablespace"] != "pg_default":
        parts.append(f"TABLESPACE {quote_ident(props['tablespace'])}")
    if props.get("owner") and not no_owner:
        parts.append(f"OWNER {quote_ident(props['owner'])}")
    return " ".join(parts)


def split_list(value: str) -> list[str]:
    """A list GUC's value ('"$user", public') as its elements, unquoted (SplitGUCList)."""
    items: list[str] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i].isspace():
            i += 1
        if i >= n:
            break
        if value[i] == '"':
            j, item = i + 1, []
            while j < n:
                if value[j] == '"':
                    if j + 1 < n and value[j + 1] == '"':
                        item.append('"')
                        j += 2
                        continue
                    break
                item.append(value[j])
                j += 1
            items.append("".join(item))
            i = j + 1
        else:
            j = i
            while j < n and value[j] != "," and not value[j].isspace():
                j += 1
            items.append(value[i:j])
            i = j
        while i < n and value[i].isspace():
            i += 1
        if i < n and value[i] == ",":
            i += 1
    return items


def set_clause(entry: str) -> str:
    """'name=value' from setconfig as ``SET name TO value`` (list GUCs element by element)."""
    name, _, value = entry.partition("=")
    if name.lower() in LIST_GUCS:
        elements = split_list(value)
        rendered = ", ".join(quote_literal(e) for e in elements) if elements else "''"
    else:
        rendered = quote_literal(value)
    return f"SET {quote_ident(name)} TO {rendered}"


def apply_sql(props: Mapping[str, Any], dbname: str, no_owner: bool = False, no_privileges: bool = False) -> str:
    """SQL giving ``dbname`` the properties that are set after the load: comment, connection
    limit, settings per database and per role in it, and privileges."""
    db = quote_ident(dbname)
    owner = props.get("owner")
    statements: list[str] = []
    if props.get("comment") is not None:
        statements.append(f"COMMENT ON DATABASE {db} IS {quote_literal(props['comment'])};")
    limit = props.get("connection_limit")
    if isinstance(limit, int) and limit != -1:
        statements.append(f"ALTER DATABASE {db} WITH CONNECTION LIMIT {limit};")
    for setting in props.get("settings") or []:
        for entry in setting.get("config") or []:
            if setting.get("role"):
                statements.append(f"ALTER ROLE {quote_ident(setting['role'])} IN DATABASE {db} {set_clause(entry)};")
            else:
                statements.append(f"ALTER DATABASE {db} {set_clause(entry)};")
    acl = props.get("acl")
    if acl is not None and not no_privileges:
        statements += acl_sql(acl, db, owner, no_owner)
    return "\n".join(statements) + ("\n" if statements else "")


def acl_sql(acl: list[Mapping[str, Any]], db: str, owner: str | None, no_owner: bool) -> list[str]:
    """REVOKE everything a new database grants by default, then GRANT each entry in its order
    (so the ACL reads the same), as its grantor when that is not the owner."""
    statements = [f"REVOKE ALL ON DATABASE {db} FROM PUBLIC;"]
    if owner and not no_owner:
        statements.append(f"REVOKE ALL ON DATABASE {db} FROM {quote_ident(owner)};")
    groups: dict[tuple[str | None, str], list[Mapping[str, Any]]] = {}
    for item in acl:
        groups.setdefault((item.get("grantee"), item.get("grantor") or ""), []).append(item)
    for (grantee, grantor), items in groups.items():
        if no_owner and owner and owner in (grantee, grantor):
            continue
        who = quote_ident(grantee) if grantee else "PUBLIC"
        for grantable in (False, True):
            privileges = [
                PRIVILEGE_WORDS.get(i["privilege"], "") for i in items if bool(i.get("grantable")) == grantable
            ]
            privileges = [p for p in privileges if p]
            if not privileges:
                continue
            grant = f"GRANT {', '.join(privileges)} ON DATABASE {db} TO {who}"
            grant += " WITH GRANT OPTION;" if grantable else ";"
            if grantor and grantor != owner and not no_owner:
                grant = f"SET ROLE {quote_ident(grantor)}; {grant} RESET ROLE;"
            statements.append(grant)
    return statements


def describe(props: Mapping[str, Any]) -> str:
    """One line for listings: owner, encoding, locale, and what else is set."""
    locale = props.get("collate", "")
    if props.get("locale_provider") == "i":
        locale = f"icu:{props.get('icu_locale')}"
    extras = []
    if props.get("settings"):
        extras.append(f"{sum(len(s.get('config') or []) for s in props['settings'])} setting(s)")
    if props.get("acl") is not None:
        extras.append("privileges")
    if props.get("comment"):
        extras.append("comment")
    if props.get("connection_limit", -1) != -1:
        extras.append(f"connection limit {props['connection_limit']}")
    if props.get("tablespace") not in (None, "pg_default"):
        extras.append(f"tablespace {props['tablespace']}")
    text = f"owner {props.get('owner')}, {props.get('encoding')}, {locale}"
    return text + (", " + ", ".join(extras) if extras else "")
