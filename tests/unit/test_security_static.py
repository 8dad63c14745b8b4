"""Security defaults that can be read off the code and the config
(issue 7, item 6): bounded dependencies, no SQL built from strings,
loopback listeners, the secret from a file, and the HTTP limits."""

from __future__ import annotations

import ast
import logging
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from persister.config import InstanceLocation, PersistLimits, config_from_mapping
from persister.http.app import BODY_READ_TIMEOUT_S
from persister.server import HTTP_SERVER_SETTINGS, is_loopback, warn_unless_loopback

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "persister"


# --- dependencies -------------------------------------------------------------


def _requirements() -> Iterator[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["dependencies"]:
        yield "dependencies", Requirement(line)
    for extra, lines in project["optional-dependencies"].items():
        for line in lines:
            yield f"optional-dependencies.{extra}", Requirement(line)


REQUIREMENTS = list(_requirements())


@pytest.mark.parametrize(
    "where, requirement", REQUIREMENTS, ids=[f"{w}:{r.name}" for w, r in REQUIREMENTS]
)
def test_every_dependency_has_a_lower_and_an_exclusive_upper_bound(
    where: str, requirement: Requirement
) -> None:
    lower = [s for s in requirement.specifier if s.operator in (">=", ">", "~=")]
    upper = [s for s in requirement.specifier if s.operator == "<"]
    assert lower, f"{where}: {requirement} has no lower bound (one known to work)"
    assert upper, f"{where}: {requirement} has no upper bound (the next major version)"
    assert Version(upper[0].version) > Version(lower[0].version), str(requirement)


@pytest.mark.parametrize(
    "where, requirement", REQUIREMENTS, ids=[f"{w}:{r.name}" for w, r in REQUIREMENTS]
)
def test_the_installed_version_lies_within_the_bounds(where: str, requirement: Requirement) -> None:
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{requirement.name} ({where}) is not installed here")
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed, outside {requirement.specifier}"
    )


# --- no SQL built from strings ------------------------------------------------

# psycopg methods whose first argument is a query.
QUERY_METHODS = {"execute", "executemany", "copy", "stream"}

# Known, reported, and to be rewritten with psycopg.sql: (file, the argument's
# source). Both build statements from constants of the load harness, never
# from input; the list may only shrink.
KNOWN_EXCEPTIONS = {
    ("persister/bench/checks.py", 'f"SHOW {name}"'),
    ("persister/bench/ceiling.py", "f\"TRUNCATE {', '.join(TABLES)}\""),
}


class _SqlBuiltFromStrings(ast.NodeVisitor):
    """Finds query arguments that are f-strings, %-formatted, .format()ted,
    joined or +-concatenated strings, following names to their assignments
    anywhere in the module. psycopg.sql composition is not a string: allowed,
    and so is an f-string of module constants only (liveness.py's queries)."""

    def __init__(self, tree: ast.Module) -> None:
        self.assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.assigned.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                if isinstance(node.target, ast.Name):
                    self.assigned.setdefault(node.target.id, []).append(node.value)
        self.found: list[ast.expr] = []

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in QUERY_METHODS and node.args:
            if self.built(node.args[0], set()):
                self.found.append(node.args[0])
        self.generic_visit(node)

    def built(self, node: ast.expr, seen: set[str]) -> bool:
        """The expression builds a string at run time."""
        if isinstance(node, ast.JoinedStr):
            return not self.constant(node, seen)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            if not (self.stringy(node.left, seen) or self.stringy(node.right, seen)):
                return False
            return not (self.constant(node.left, seen) and self.constant(node.right, seen))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("format", "join"):
                return self.stringy(node.func.value, seen)
        if isinstance(node, ast.IfExp):
            return self.built(node.body, seen) or self.built(node.orelse, seen)
        if isinstance(node, ast.Name) and node.id not in seen:
            seen = seen | {node.id}
            return any(self.built(v, seen) for v in self.assigned.get(node.id, []))
        return False

    def stringy(self, node: ast.expr, seen: set[str]) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str | bytes)
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.BinOp):
            return self.stringy(node.left, seen) or self.stringy(node.right, seen)
        if isinstance(node, ast.Name) and node.id not in seen:
            seen = seen | {node.id}
            return any(self.stringy(v, seen) for v in self.assigned.get(node.id, []))
        return False

    def constant(self, node: ast.expr, seen: set[str]) -> bool:
        """Known before the program runs: literals, and names and f-strings of them."""
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.JoinedStr):
            return all(
                self.constant(v.value if isinstance(v, ast.FormattedValue) else v, seen)
                for v in node.values
            )
        if isinstance(node, ast.Name) and node.id not in seen:
            values = self.assigned.get(node.id, [])
            return bool(values) and all(self.constant(v, seen | {node.id}) for v in values)
        return False


def sql_built_from_strings(source: str) -> list[str]:
    tree = ast.parse(source)
    finder = _SqlBuiltFromStrings(tree)
    finder.visit(tree)
    return [ast.get_source_segment(source, node) or ast.dump(node) for node in finder.found]


@pytest.mark.parametrize(
    "code",
    [
        "conn.execute(f\"SELECT * FROM events WHERE event_id = '{event_id}'\")",
        "conn.execute(\"SELECT * FROM events WHERE event_id = '%s'\" % event_id)",
        'conn.execute("SELECT * FROM {} LIMIT 1".format(table))',
        'conn.execute("SELECT * FROM events WHERE room_id = \'" + room_id + "\'")',
        "conn.execute(' UNION '.join(parts))",
        'Q = f"DELETE FROM {table}"\nasync def f(c):\n    await c.execute(Q)',
        'Q = "SELECT " + column\ncur.executemany(Q if x else "SELECT 1", rows)',
        'cur.copy(f"COPY {table} FROM STDIN")',
    ],
)
def test_the_detector_flags_sql_built_from_strings(code: str) -> None:
    assert sql_built_from_strings(code), code


@pytest.mark.parametrize(
    "code",
    [
        'conn.execute("SELECT * FROM events WHERE event_id = %s", (event_id,))',
        'conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))',
        'Q = "SELECT 1 " "FROM events"\nconn.execute(Q)',
        'A = "SELECT 1"\nB = "SELECT 2"\nconn.execute(A if x else B)',
        'Q = "SELECT * FROM events " + "WHERE room_id = %s"\nconn.execute(Q, (room,))',
        "conn.execute(script)",  # bytes read from a migration file
        'DB: Final = "(SELECT 1)"\nQ = f"SELECT {DB}"\nconn.execute(Q)',
    ],
)
def test_the_detector_allows_parameters_constants_and_psycopg_sql(code: str) -> None:
    assert sql_built_from_strings(code) == [], code


def test_no_sql_in_the_package_is_built_from_strings() -> None:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for segment in sql_built_from_strings(path.read_text(encoding="utf-8")):
            found.add((relative, segment))
    unexpected = found - KNOWN_EXCEPTIONS
    assert not unexpected, (
        "SQL built from strings (use parameters, or psycopg.sql to compose identifiers): "
        + "; ".join(f"{f}: {s}" for f, s in sorted(unexpected))
    )
    fixed = KNOWN_EXCEPTIONS - found
    assert not fixed, f"fixed, now drop from KNOWN_EXCEPTIONS: {fixed}"


# --- listeners, secret, limits --------------------------------------------------


def test_instances_listen_on_loopback_unless_configured_otherwise() -> None:
    assert is_loopback(InstanceLocation().host)
    config = config_from_mapping({
        "replication_secret": "s", "stream_writers": {"events": ["p1"]},
        "instance_map": {"p1": {"port": 18101}},
    })  # fmt: skip
    assert is_loopback(config.location("p1").host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_a_loopback_listener_logs_no_warning(host: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="persister.server"):
        warn_unless_loopback(host)
    assert caplog.records == []


@pytest.mark.parametrize(
    "host, named",
    [
        ("0.0.0.0", "every interface"),
        ("::", "every interface"),
        ("", "every interface"),
        ("192.0.2.10", "192.0.2.10"),
        ("persister1.internal", "persister1.internal"),
    ],
)
def test_any_other_listener_logs_a_loud_security_warning(
    host: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="persister.server"):
        warn_unless_loopback(host)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith("SECURITY: listening on " + named)
    assert "only guard is the replication secret" in message


def test_the_secret_can_be_read_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "replication_secret"
    secret_file.write_text("  s3cr3t from a file\n", encoding="utf-8")
    config = config_from_mapping({
        "replication_secret_path": str(secret_file), "stream_writers": {"events": ["p1"]},
        "instance_map": {"p1": {}},
    })  # fmt: skip
    assert config.replication_secret is None
    assert config.secret() == "s3cr3t from a file"  # surrounding whitespace and newline dropped


def test_a_secret_is_required() -> None:
    with pytest.raises(Exception, match="replication_secret"):
        config_from_mapping({"stream_writers": {"events": ["p1"]}, "instance_map": {"p1": {}}})
    with pytest.raises(Exception, match="must not be empty"):
        config_from_mapping({
            "replication_secret": "  ", "stream_writers": {"events": ["p1"]},
            "instance_map": {"p1": {}},
        })  # fmt: skip


def test_http_limits_are_explicit_and_tight() -> None:
    assert HTTP_SERVER_SETTINGS["keepalive_timeout"] <= 120  # aiohttp's default is an hour
    assert HTTP_SERVER_SETTINGS["max_line_size"] <= 8190
    assert HTTP_SERVER_SETTINGS["max_field_size"] <= 8190
    assert HTTP_SERVER_SETTINGS["max_headers"] <= 128
    assert 0 < HTTP_SERVER_SETTINGS["lingering_time"] <= 30
    assert 0 < BODY_READ_TIMEOUT_S <= 60
    limits = PersistLimits()
    assert limits.max_body_bytes <= 16 * 1024 * 1024
    assert limits.max_events_per_request <= 1000
