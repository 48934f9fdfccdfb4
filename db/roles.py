"""``python -m db roles``: one LOGIN role per process, granted only what it needs.

Creates (or brings back in line) a role for the api, the relay and the consumer on the
database in DATABASE_URL, revokes whatever else they hold there and grants the matrix
of :mod:`db.grants`. Everything happens in one transaction, so a failure changes nothing,
and a rerun is harmless: run it after every ``python -m db migrate``.

Why a command and not an alembic migration: roles are cluster-wide objects, shared by
every database on the server, while grants belong to one database; a migration that
creates roles would collide across databases (tests, staging copies) and would need its
downgrade to guess whether anything else still uses them. Passwords have no place in
migration history either. And the migrations run as the owner of the tables, who may
not be allowed to create roles at all. So the operator runs this after migrating, as
the database owner with CREATEROLE (or a superuser).

Why not ALTER DEFAULT PRIVILEGES: it grants whole tables as the migration creates them,
which cannot express per-column INSERT or UPDATE, and it would grant silently; a rerun
here is explicit and reviewable (``--dry-run`` prints the statements).

The row-level security policies that say which outbox rows a role may add name the
roles, so they are made here too, not by a migration. Row-level security on a table
with no policy denies every row, so the table also gets one permissive policy that
allows every row to everyone; the per-role policies are restrictive, so they narrow
what the grants allow and nothing anyone adds can widen it again. Creating a policy
locks the table against every query until commit, so a policy is (re)created only when
it differs from what is there, and the command waits at most ``LOCK_TIMEOUT`` for the
lock instead of stalling the processes behind a long transaction.

It does not touch other databases on the server, but it reports those the roles can
still connect to (PUBLIC has CONNECT on every database by default) with the REVOKE that
closes them: see ``Plan.connect_advice``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

from taskbox.db.grants import FUNCTIONS, GRANTS, PROCESSES, TABLES, Process, TableGrant

DEFAULT_NAMES: dict[Process, str] = {p: f"taskbox_{p}" for p in PROCESSES}
PASSWORD_VARIABLES: dict[Process, str] = {p: f"TASKBOX_{p.upper()}_PASSWORD" for p in PROCESSES}

# How long the command waits for a table lock (a policy change) before giving up.
LOCK_TIMEOUT = "5s"

# The one permissive policy on a table with row-level security; the per-role policies
# are named taskbox_<process>_inserts, and any other taskbox_* policy is dropped.
OPEN_POLICY = "taskbox_rows"
_POLICY_PREFIX = "taskbox_"

# Lower-case, unquoted-identifier names only: what an operator types in a DSN as is.
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# The attributes a process role must (not) have; ALTER ROLE names only those that differ,
# because a CREATEROLE non-superuser may not even mention REPLICATION or BYPASSRLS.
_ATTRIBUTES = {
    "rolcanlogin": ("LOGIN", True),
    "rolcreatedb": ("NOCREATEDB", False),
    "rolcreaterole": ("NOCREATEROLE", False),
    "rolreplication": ("NOREPLICATION", False),
    "rolbypassrls": ("NOBYPASSRLS", False),
}

_RUNNER = """
SELECT current_user AS name, current_database() AS database, rolsuper, rolcreaterole,
       (SELECT d.datdba::regrole::text FROM pg_database AS d
        WHERE d.datname = current_database()) AS database_owner,
       (SELECT pg_has_role(d.datdba, 'USAGE') FROM pg_database AS d
        WHERE d.datname = current_database()) AS owns_database
FROM pg_roles WHERE rolname = current_user
"""

# pg_has_role(owner, 'USAGE'): we are the owner or inherit its rights, which is what
# GRANT on the table needs.
_TABLES = """
SELECT t.name, c.oid IS NOT NULL AS present, c.relowner::regrole::text AS owner,
       coalesce(pg_has_role(c.relowner, 'USAGE'), false) AS ours
FROM unnest($1::text[]) AS t(name)
LEFT JOIN pg_class AS c ON c.oid = to_regclass('public.' || quote_ident(t.name))
"""

_EXISTING = f"""
SELECT r.rolname, r.rolsuper, {", ".join(_ATTRIBUTES)},
       ARRAY(SELECT m.roleid::regrole::text FROM pg_auth_members AS m
             WHERE m.member = r.oid ORDER BY 1) AS member_of,
       EXISTS (SELECT 1 FROM pg_class AS c WHERE c.relowner = r.oid)
           OR EXISTS (SELECT 1 FROM pg_namespace AS n WHERE n.nspowner = r.oid)
           OR EXISTS (SELECT 1 FROM pg_database AS d
                      WHERE d.datname = current_database() AND d.datdba = r.oid) AS owns
FROM pg_roles AS r WHERE r.rolname = ANY($1::text[])
"""  # noqa: S608 - the column list is a constant

# Grants to PUBLIC reach every role. PG15 no longer gives PUBLIC CREATE on schema public,
# but a cluster upgraded from an older version keeps the old ACL.
_PUBLIC_CREATE = """
SELECT EXISTS (SELECT 1 FROM pg_namespace AS n, aclexplode(n.nspacl) AS a
               WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE')
           AS on_schema,
       EXISTS (SELECT 1 FROM pg_database AS d, aclexplode(d.datacl) AS a
               WHERE d.datname = current_database() AND a.grantee = 0
                 AND a.privilege_type = 'CREATE') AS on_database
"""

_VERIFY = """
SELECT r.name,
       has_schema_privilege(r.name, 'public', 'CREATE') AS schema_create,
       has_database_privilege(r.name, current_database(), 'CREATE') AS database_create,
       EXISTS (SELECT 1 FROM pg_auth_members AS m WHERE m.member = r.name::regrole) AS member
FROM unnest($1::text[]) AS r(name)
"""


# Every function of the matrix: present, ours to grant on, and whether PUBLIC may run it.
_FUNCTIONS = """
SELECT f.signature, p.oid IS NOT NULL AS present,
       coalesce(pg_has_role(p.proowner, 'USAGE'), false) AS ours,
       coalesce(has_function_privilege('public', p.oid, 'EXECUTE'), false) AS public_execute
FROM unnest($1::text[]) AS f(signature)
LEFT JOIN pg_proc AS p ON p.oid = to_regprocedure('public.' || f.signature)
"""

_ROW_SECURITY = """
SELECT c.relname, c.relrowsecurity FROM pg_class AS c
WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1::text[])
"""

_POLICIES = """
SELECT tablename, policyname, permissive, roles::text[] AS roles, cmd, qual, with_check
FROM pg_policies
WHERE schemaname = 'public' AND tablename = ANY($1::text[]) AND starts_with(policyname, $2)
"""

# Databases the roles (or PUBLIC, and so every role) may connect to. datacl NULL is the
# default ACL, in which PUBLIC has CONNECT; aclexplode(NULL) yields no row.
_CONNECTABLE = """
SELECT d.datname, d.datname = current_database() AS here,
       has_database_privilege('public', d.oid, 'CONNECT') AS public,
       ARRAY(SELECT r.rolname FROM aclexplode(d.datacl) AS a
             JOIN pg_roles AS r ON r.oid = a.grantee
             WHERE r.rolname = ANY($1::text[]) AND a.privilege_type = 'CONNECT'
             ORDER BY 1) AS roles
FROM pg_database AS d
WHERE d.datallowconn
ORDER BY d.datname
"""

_VERIFY_FUNCTION = "SELECT has_function_privilege($1, 'public.' || $2, 'EXECUTE')"


class RolesError(Exception):
    """Why the roles cannot be applied; nothing was changed."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'::text"


@dataclass(frozen=True, slots=True)
class Policy:
    """A row-level security policy as this command makes it. ``check`` and ``using`` are
    written as pg_policies shows them, so a policy already in place compares equal."""

    table: str
    name: str
    permissive: bool
    command: str  # ALL or INSERT
    roles: tuple[str, ...]  # role names; ("public",) for PUBLIC
    using: str | None
    check: str | None

    def create(self) -> str:
        to = ", ".join("PUBLIC" if r == "public" else quote_ident(r) for r in self.roles)
        sql = (
            f"CREATE POLICY {quote_ident(self.name)} ON public.{quote_ident(self.table)} "
            f"AS {'PERMISSIVE' if self.permissive else 'RESTRICTIVE'} FOR {self.command} TO {to}"
        )
        if self.using is not None:
            sql += f" USING ({self.using})"
        if self.check is not None:
            sql += f" WITH CHECK ({self.check})"
        return sql

    def drop(self) -> str:
        return _drop_policy(self.table, self.name)

    def is_in_place(self, row: asyncpg.Record) -> bool:
        return (
            row["permissive"] == ("PERMISSIVE" if self.permissive else "RESTRICTIVE")
            and row["cmd"] == self.command
            and sorted(row["roles"]) == sorted(self.roles)
            and row["qual"] == self.using
            and row["with_check"] == self.check
        )


def _drop_policy(table: str, name: str) -> str:
    return f"DROP POLICY IF EXISTS {quote_ident(name)} ON public.{quote_ident(table)}"


def insert_policy(process: Process, role: str, grant: TableGrant) -> Policy | None:
    """The restrictive policy that holds ``role``'s inserts to ``grant.insert_values``."""
    if grant.insert_values is None:
        return None
    column, values = grant.insert_values
    allowed = ", ".join(_text_literal(v) for v in values)
    return Policy(
        grant.table,
        f"{_POLICY_PREFIX}{process}_inserts",
        permissive=False,
        command="INSERT",
        roles=(role,),
        using=None,
        check=f"({column} = ANY (ARRAY[{allowed}]))",
    )


def open_policy(table: str) -> Policy:
    """Every row to everyone: what the grants alone would allow, for the restrictive
    policies to narrow (with row-level security on and no permissive policy, no role
    but the owner could read or write a row)."""
    return Policy(table, OPEN_POLICY, True, "ALL", ("public",), "true", "true")


@dataclass(frozen=True, slots=True)
class Step:
    sql: str
    shown: str  # what is printed: the statement, its password masked


@dataclass(frozen=True, slots=True)
class RoleOutcome:
    process: Process
    role: str
    created: bool
    password_set: bool


@dataclass(slots=True)
class Plan:
    database: str
    sequence: str  # the outbox's identity sequence, as GRANT names it
    steps: list[Step] = field(default_factory=list)
    outcomes: list[RoleOutcome] = field(default_factory=list)
    public_revoked: list[str] = field(default_factory=list)
    # REVOKE CONNECT statements an operator should run (this command does not): other
    # databases the roles can log in to, and this one's CONNECT for PUBLIC.
    connect_advice: list[str] = field(default_factory=list)

    def add(self, sql: str, shown: str | None = None) -> None:
        self.steps.append(Step(sql, sql if shown is None else shown))


def describe(grant: TableGrant, sequence: str) -> str:
    """One table's grant in words, for the command's report."""
    parts = list(grant.privileges)
    if grant.insert_columns:
        insert = f"INSERT ({', '.join(grant.insert_columns)})"
        if grant.insert_values is not None:
            column, values = grant.insert_values
            insert += f" of {column} {' or '.join(values)} only"
        parts.append(insert)
    if grant.update_columns:
        parts.append(f"UPDATE ({', '.join(grant.update_columns)})")
    text = f"{grant.table}: {', '.join(parts)}"
    if grant.identity_sequence:
        text += f"; USAGE on {sequence}"
    return text


def _check_names(names: Mapping[Process, str], runner: str) -> None:
    for process in PROCESSES:
        name = names[process]
        if not _NAME.match(name) or name.startswith("pg_"):
            raise RolesError(
                f"role name {name!r} for the {process}: use lower-case letters, digits and _, "
                "not starting with a digit or pg_, at most 63 characters"
            )
        if name == runner:
            raise RolesError(f"role name {name!r} is the role running this command")
    if len(set(names.values())) != len(PROCESSES):
        raise RolesError("the api, relay and consumer need three different role names")


async def _check_runner(conn: asyncpg.Connection) -> tuple[str, str, str]:
    """The runner's name, the database and the outbox's sequence, once it is clear that
    this connection may grant on the tables and create roles (else RolesError)."""
    runner = await conn.fetchrow(_RUNNER)
    assert runner is not None
    tables = await conn.fetch(_TABLES, list(TABLES))
    missing = [t["name"] for t in tables if not t["present"]]
    if missing:
        raise RolesError(
            f"table(s) {', '.join(missing)} missing in database {runner['database']!r}: "
            "run python -m db migrate first"
        )
    # GRANT on the tables needs their owner; CONNECT on the database and USAGE on schema
    # public (owned by pg_database_owner) need the database's, else Postgres only warns.
    foreign = [t for t in tables if not t["ours"]]
    if foreign or not runner["owns_database"]:
        owners = ", ".join(sorted({t["owner"] for t in foreign} | {runner["database_owner"]}))
        raise RolesError(
            f"must run as the database owner (the role that ran python -m db migrate): "
            f"database and tables belong to {owners}, this is {runner['name']}"
        )
    if not (runner["rolsuper"] or runner["rolcreaterole"]):
        raise RolesError(
            f"must run as a role that may create roles: {runner['name']} has neither "
            "CREATEROLE nor SUPERUSER"
        )
    sequence = await conn.fetchval("SELECT pg_get_serial_sequence('public.outbox', 'id')")
    if sequence is None:
        raise RolesError("outbox.id has no identity sequence: is the schema migrated?")
    functions = await conn.fetch(_FUNCTIONS, _all_functions())
    missing = [f["signature"] for f in functions if not f["present"]]
    if missing:
        raise RolesError(
            f"function(s) {', '.join(missing)} missing in database {runner['database']!r}: "
            "run python -m db migrate first"
        )
    foreign = [f["signature"] for f in functions if not f["ours"]]
    if foreign:
        raise RolesError(
            f"must run as the owner of function(s) {', '.join(foreign)} (the role that ran "
            f"python -m db migrate), this is {runner['name']}"
        )
    return runner["name"], runner["database"], sequence


def _all_functions() -> list[str]:
    return sorted({f for process in PROCESSES for f in FUNCTIONS[process]})


async def plan_roles(
    conn: asyncpg.Connection,
    names: Mapping[Process, str],
    passwords: Mapping[Process, str | None],
) -> Plan:
    """The statements that bring the roles to the matrix, after checking they may run."""
    runner, database, sequence = await _check_runner(conn)
    _check_names(names, runner)
    existing = {row["rolname"]: row for row in await conn.fetch(_EXISTING, list(names.values()))}
    plan = Plan(database, sequence)
    db = quote_ident(database)

    public = await conn.fetchrow(_PUBLIC_CREATE)
    assert public is not None
    if public["on_schema"]:
        plan.add("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        plan.public_revoked.append("CREATE on schema public")
    if public["on_database"]:
        plan.add(f"REVOKE CREATE ON DATABASE {db} FROM PUBLIC")
        plan.public_revoked.append(f"CREATE on database {database}")
    # Functions are PUBLIC's to execute by default; the migration revoked that, and a
    # grant to PUBLIC since would let every role cancel tasks.
    for function in await conn.fetch(_FUNCTIONS, _all_functions()):
        if function["public_execute"]:
            plan.add(f"REVOKE EXECUTE ON FUNCTION public.{function['signature']} FROM PUBLIC")
            plan.public_revoked.append(f"EXECUTE on function {function['signature']}")

    for process in PROCESSES:
        name = names[process]
        role = quote_ident(name)
        row = existing.get(name)
        if row is None:
            plan.add(f"CREATE ROLE {role} WITH LOGIN")
        else:
            # A superuser or an owner bypasses every grant: demoting one is not ours to do.
            if row["rolsuper"]:
                raise RolesError(f"role {name} exists and is a superuser: choose another name")
            if row["owns"]:
                raise RolesError(
                    f"role {name} owns objects in database {database!r} (it ran migrations?): "
                    "choose another name or reassign them"
                )
            wrong = [kw for column, (kw, want) in _ATTRIBUTES.items() if row[column] != want]
            if wrong:
                plan.add(f"ALTER ROLE {role} WITH {' '.join(wrong)}")
            for group in row["member_of"]:
                plan.add(f"REVOKE {group} FROM {role}")  # regrole text is already quoted
        password = passwords.get(process)
        if password:
            literal = await conn.fetchval("SELECT quote_literal($1)", password)
            plan.add(f"ALTER ROLE {role} PASSWORD {literal}", f"ALTER ROLE {role} PASSWORD '***'")

        # Start from nothing in this database, then grant the matrix. REVOKE on a table
        # also drops its column privileges.
        plan.add(f"REVOKE ALL ON DATABASE {db} FROM {role}")
        plan.add(f"GRANT CONNECT ON DATABASE {db} TO {role}")
        plan.add(f"REVOKE ALL ON SCHEMA public FROM {role}")
        plan.add(f"GRANT USAGE ON SCHEMA public TO {role}")
        plan.add(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
        plan.add(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}")
        plan.add(f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {role}")
        for grant in GRANTS[process]:
            table = f"public.{quote_ident(grant.table)}"
            if grant.privileges:
                plan.add(f"GRANT {', '.join(grant.privileges)} ON TABLE {table} TO {role}")
            if grant.insert_columns:
                columns = ", ".join(quote_ident(c) for c in grant.insert_columns)
                plan.add(f"GRANT INSERT ({columns}) ON TABLE {table} TO {role}")
            if grant.update_columns:
                columns = ", ".join(quote_ident(c) for c in grant.update_columns)
                plan.add(f"GRANT UPDATE ({columns}) ON TABLE {table} TO {role}")
            if grant.identity_sequence:
                plan.add(f"GRANT USAGE ON SEQUENCE {sequence} TO {role}")
        for function in FUNCTIONS[process]:
            plan.add(f"GRANT EXECUTE ON FUNCTION public.{function} TO {role}")
        plan.outcomes.append(RoleOutcome(process, name, row is None, bool(password)))
    await _plan_policies(conn, plan, names)
    return plan


async def _plan_policies(
    conn: asyncpg.Connection, plan: Plan, names: Mapping[Process, str]
) -> None:
    """Row-level security where the matrix restricts inserted values, and its policies;
    only what differs from the database is (re)made, since each change locks the table."""
    wanted: list[Policy] = []
    for process in PROCESSES:
        for grant in GRANTS[process]:
            policy = insert_policy(process, names[process], grant)
            if policy is not None:
                wanted.append(policy)
    tables = sorted({p.table for p in wanted})
    wanted = [open_policy(t) for t in tables] + wanted
    secured = {
        row["relname"]: row["relrowsecurity"] for row in await conn.fetch(_ROW_SECURITY, tables)
    }
    existing = {
        (row["tablename"], row["policyname"]): row
        for row in await conn.fetch(_POLICIES, list(TABLES), _POLICY_PREFIX)
    }
    for table in tables:
        if not secured.get(table):
            plan.add(f"ALTER TABLE public.{quote_ident(table)} ENABLE ROW LEVEL SECURITY")
    for policy in wanted:
        row = existing.pop((policy.table, policy.name), None)
        if row is None or not policy.is_in_place(row):
            plan.add(policy.drop())
            plan.add(policy.create())
    for table, name in sorted(existing):  # ours once, no longer in the matrix
        plan.add(_drop_policy(table, name))


async def _connect_advice(conn: asyncpg.Connection, names: list[str]) -> list[str]:
    """REVOKE CONNECT statements that would keep the roles out of every other database:
    from PUBLIC wherever it has CONNECT (here too, where the roles have their own), and
    from a role granted CONNECT elsewhere by name."""
    advice = []
    for row in await conn.fetch(_CONNECTABLE, names):
        db = quote_ident(row["datname"])
        if row["public"]:
            advice.append(f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
        if row["roles"] and not row["here"]:
            roles = ", ".join(quote_ident(r) for r in row["roles"])
            advice.append(f"REVOKE CONNECT ON DATABASE {db} FROM {roles}")
    return advice


async def _verify(conn: asyncpg.Connection, names: Mapping[Process, str]) -> None:
    """Fail (and so roll back) if a role could still run DDL, inherit another's rights or
    run a function of another process's."""
    for process in PROCESSES:
        for function in _all_functions():
            if function in FUNCTIONS[process]:
                continue
            if await conn.fetchval(_VERIFY_FUNCTION, names[process], function):
                raise RolesError(f"role {names[process]} could still execute {function}")
    for row in await conn.fetch(_VERIFY, [names[p] for p in PROCESSES]):
        if row["schema_create"] or row["database_create"]:
            raise RolesError(
                f"role {row['name']} could still CREATE in this database (granted to PUBLIC?); "
                "run as the database owner so that the grant to PUBLIC can be revoked"
            )
        if row["member"]:
            raise RolesError(f"role {row['name']} is still a member of another role")


async def apply_roles(
    conn: asyncpg.Connection,
    names: Mapping[Process, str] = DEFAULT_NAMES,
    passwords: Mapping[Process, str | None] | None = None,
    *,
    dry_run: bool = False,
    lock_timeout: str = LOCK_TIMEOUT,
) -> Plan:
    """Create or update the roles and their grants in one transaction; returns what ran.
    Raises asyncpg.LockNotAvailableError, having changed nothing, when a lock it needs
    is held longer than ``lock_timeout``."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", lock_timeout)
        plan = await plan_roles(conn, names, passwords or {})
        if not dry_run:
            for step in plan.steps:
                await conn.execute(step.sql)
            await _verify(conn, names)
        plan.connect_advice = await _connect_advice(conn, [names[p] for p in PROCESSES])
    return plan
