"""The ``conveyor`` command line, run in process through click's ``CliRunner`` against a real
Redis (and, for ``history``, a real PostgreSQL).

The property, for every command: exit code 0; or 2, a usage error click reports under the
command's usage line; or 1 with exactly one ``Error: ...`` line on stderr. Never an uncaught
exception (``result.exception`` is None or click's ``SystemExit``), never a traceback. A
command that fails changes nothing in Redis; ``enqueue --stdin`` with one bad line enqueues
none of the others.

Two guards hold for the whole module. Name resolution answers only for loopback hosts, so no
fuzzed URL can reach the network (any other host fails as an unknown name would). Starting a
supervisor or configuring logging fails the test: ``worker`` is fuzzed only with ``--check``,
which validates its settings and starts nothing.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any, cast

import orjson
import pytest
import redis
from click.testing import CliRunner, Result
from hypothesis import example, given
from hypothesis import strategies as st

from conveyor import cli
from conveyor.cli import producing, root
from conveyor.job import DEFAULT_MAX_PAYLOAD, MAX_SECONDS
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.local import PostgresServer, RedisServer
from conveyor.queue import BATCH_LIMIT, Queue
from tests.fuzz.profiles import fuzz
from tests.support.invariants import census, snapshot
from tests.support.scripted import ScriptedWorker

# -- guards and fixtures -----------------------------------------------------------------------

_real_getaddrinfo = socket.getaddrinfo


def _loopback_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    if name is None or name == "localhost":
        return _real_getaddrinfo(host, *args, **kwargs)
    try:
        loopback = ipaddress.ip_address(str(name).partition("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise socket.gaierror(socket.EAI_NONAME, f"fuzz guard: {name!r} is not loopback")
    return _real_getaddrinfo(host, *args, **kwargs)


def _must_not_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the fuzzed command line started a worker")


@pytest.fixture(scope="module", autouse=True)
def _guards() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", _loopback_getaddrinfo)
        patch.setattr("conveyor.supervisor.Supervisor", _must_not_run)
        patch.setattr("conveyor.logs.configure", _must_not_run)
        yield


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    # Fuzzed valid queue names start with "fz" or are among the hostile samples ("*", "-x"):
    # forget their queues with the module.
    patterns = ["conveyor:\\{fz*"] + [
        _glob(Keyspace(name).base) + "*" for name in _HOSTILE if _valid_queue(name)
    ]
    names = [name for pattern in patterns for name in client.scan_iter(match=pattern)]
    if names:
        client.delete(*names)
    client.close()


@pytest.fixture(scope="module")
def queue(client: redis.Redis) -> Queue:
    return Queue(client, f"fz{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _glob(text: str) -> str:
    return "".join("\\" + char if char in "*?[]{}\\" else char for char in text)


def _empty(queue: Queue) -> None:
    pattern = _glob(queue.keys.base) + "*"
    names = list(queue.client.scan_iter(match=pattern, count=10_000))
    if names:
        queue.client.delete(*names)


def run(
    url: str, queue_name: str, *args: str, input: bytes | None = None, clean: bool = True
) -> Result:
    """``conveyor --redis-url URL --queue NAME ARGS...``, checked against the property."""
    result = CliRunner().invoke(
        cli.main, ["--redis-url", url, "--queue", queue_name, *args], input=input
    )
    if clean:
        assert_clean(result)
    return result


def assert_clean(result: Result) -> None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"uncaught {type(result.exception).__name__}: {result.exception}"
        ) from result.exception
    assert result.exit_code in (0, 1, 2), f"exit code {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    if result.exit_code == 1:
        assert len(lines) == 1, f"an error over {len(lines)} lines: {result.stderr!r}"
        assert re.fullmatch(r"Error: \S.*", lines[0]), f"not a clear error: {lines[0]!r}"
    elif result.exit_code == 2:
        assert lines, "a usage error that says nothing"
        assert lines[0].startswith("Usage:"), f"a usage error without usage: {lines}"


# -- strategies --------------------------------------------------------------------------------

_HOSTILE = ["", " ", "a b", "a\nb", "x\0", "\ud800", "\udcff", "{tag}", "*", "a:b", "-x", "--help"]
_hostile_texts = st.sampled_from(_HOSTILE)
_texts = _hostile_texts | st.text(max_size=20) | st.text(min_size=195, max_size=205)
_numbers = st.sampled_from(
    ["0", "1", "-1", "0.0004", "0.001", "1e300", "nan", "inf", "-inf", "x", "", "1_0", "9" * 30]
) | st.integers(-(2**64), 2**64).map(str)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@st.composite
def redis_urls(draw: st.DrawFn, live: int, closed: int) -> str:
    """URLs of every shape; any host in them that resolves is loopback."""
    if draw(st.booleans()):
        return draw(
            st.sampled_from(
                [
                    f"redis://127.0.0.1:{live}/0",
                    f"redis://localhost:{live}",
                    f"redis://[::1]:{closed}",
                    f"redis://127.0.0.1:{live}/99999",
                    f"redis://127.0.0.1:{live}/0?foo=bar",
                    f"redis://127.0.0.1:{live}/0?socket_timeout=soon",
                    f"rediss://127.0.0.1:{closed}/0?ssl_cert_reqs=maybe",
                    f"redis+sentinel://127.0.0.1:{closed},[::1]:{closed}/svc/1",
                    f"redis+sentinel://127.0.0.1:{closed}/",
                    f"redis+sentinel://:{closed}/svc",
                    "unix:///nonexistent/fz.sock",
                    "unix:///tmp/fz\0.sock",
                    "unix:///tmp/\ud800.sock",
                    "unix://",
                    "redis://",
                    "http://127.0.0.1/",
                    "127.0.0.1:6379",
                    "",
                ]
            )
            | st.text(max_size=30)
        )
    scheme = draw(st.sampled_from(["redis", "REDIS", "unix", "redis+sentinel", "ftp", ""]))
    userinfo = draw(st.sampled_from(["", "user@", ":pw@", "u:p%zz@", "@"]))
    host = draw(st.sampled_from(["127.0.0.1", "localhost", "[::1]", "", "::1", "[::1"]) | _texts)
    port = draw(st.sampled_from([str(live), str(closed), "0", "65536", "x", ""]) | _numbers)
    path = draw(st.sampled_from(["", "/", "/0", "/15", "/x", "/-1", "/svc", "/svc/2/3"]))
    query = draw(
        st.sampled_from(["", "?socket_timeout=1", "?db=x", "?protocol=9", "?a=b&c"])
        | _texts.map(lambda text: "?" + text)
    )
    return f"{scheme}://{userinfo}{host}{':' if port else ''}{port}{path}{query}"


def _valid_queue(name: str) -> bool:
    try:
        Keyspace(name)
        name.encode()
    except ValueError:
        return False
    return True


_queue_names = _hostile_texts | st.text(max_size=20).map(lambda text: "fz" + text)

# -- global options ----------------------------------------------------------------------------

_INSPECTING = [["stats"], ["dlq", "list"], ["dlq", "show", "nope"], ["pause", "g"]]


@fuzz(scale=0.5)
@given(data=st.data(), queue_name=_queue_names, command=st.sampled_from(_INSPECTING))
@example(data=None, queue_name="a b", command=["stats"])  # raw ValueError from Keyspace
@example(data=None, queue_name="fz\ud800", command=["stats"])  # raw UnicodeEncodeError
def test_global_options_are_checked_before_any_command_runs(
    redis_server: RedisServer,
    closed_port: int,
    data: st.DataObject | None,
    queue_name: str,
    command: list[str],
) -> None:
    url = redis_server.url
    if data is not None:
        url = data.draw(redis_urls(redis_server.port, closed_port), label="url")
    result = run(url, queue_name, *command)
    if not _valid_queue(queue_name):
        assert result.exit_code == 2, "an invalid queue name reached the command"
    elif url == redis_server.url and command != ["dlq", "show", "nope"]:
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?foo=bar",  # a raw TypeError when the first command connected
        "redis://127.0.0.1:6379/0?ssl_cert_reqs=maybe&ssl=true",  # a raw RedisError, likewise
        "redis://" + "h" * 64 + ":6379",  # a raw UnicodeError from the resolver's IDNA codec
        "unix:///tmp/fz\0.sock",  # a raw ValueError from socket.connect
        "redis://127.0.0.1:99999",
        "garbage",
    ],
)
def test_a_malformed_redis_url_is_a_usage_error_naming_the_option(url: str) -> None:
    result = run(url, "default", "stats")
    assert result.exit_code == 2
    assert "Invalid value for '--redis-url'" in result.stderr


_MALFORMED_GLOBALS = {"REDIS_URL": "redis://127.0.0.1:99999", "CONVEYOR_QUEUE": "a b"}


@pytest.mark.parametrize(
    "command", [["worker"], ["stats"], ["dlq", "list"], ["history"], ["schedule", "list"]]
)
def test_a_command_shows_its_help_whatever_the_global_options_hold(command: list[str]) -> None:
    result = CliRunner().invoke(cli.main, [*command, "--help"], env=_MALFORMED_GLOBALS)
    assert_clean(result)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: main {' '.join(command)} ")


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["worker", "--check"],
        ["dlq", "list"],
        ["history", "--summary", "--database-url", "postgresql://127.0.0.1:1/none"],
    ],
)
def test_a_malformed_redis_url_in_the_environment_still_refuses_every_command(
    command: list[str],
) -> None:
    result = CliRunner().invoke(cli.main, command, env={"REDIS_URL": "garbage"})
    assert_clean(result)
    assert result.exit_code == 2
    assert "Invalid value for '--redis-url' (env var: 'REDIS_URL')" in result.stderr


def test_rediss_to_a_plain_redis_fails_instead_of_hanging(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both sides wait for the other's first bytes: without the CLI's connect timeout (shortened
    # here to keep the test fast) the command never ends.
    monkeypatch.setattr(root, "CONNECT_TIMEOUT", 0.3)
    result = run(f"rediss://127.0.0.1:{redis_server.port}/0", "default", "stats")
    assert result.exit_code == 1
    assert "BackendUnavailable" in result.stderr


# -- enqueue with arguments --------------------------------------------------------------------

_enqueue_options = st.fixed_dictionaries(
    {},
    optional={
        "--priority": st.sampled_from(PRIORITY_CLASSES) | _texts,
        "--group": st.sampled_from(["", "acme"]) | _texts,
        "--delay": st.sampled_from(["0", "5"]) | _numbers,
        "--dedup-key": st.sampled_from(["", "order-1"]) | _texts,
        "--max-attempts": st.sampled_from(["1", "3"]) | _numbers,
        "--timeout": st.sampled_from(["0.5", "60"]) | _numbers,
    },
)
_payload_texts = st.one_of(
    _json.map(lambda value: orjson.dumps(value).decode()),
    st.sampled_from(
        ["{", "[" * 300 + "]" * 300, "1e400", '"\\ud800"', "\ufeff{}", '"' + "x" * 2**19 + '"']
    ),
    _texts,
)


@fuzz(scale=0.5)
@given(
    job_type=st.sampled_from(["send_email", "x"]) | _texts,
    payload=st.none() | _payload_texts,
    options=_enqueue_options,
)
@example(job_type="t", payload="[" * 300 + "]" * 300, options={})  # too deep to encode
@example(job_type="t", payload=None, options={"--group": "\ud800"})  # raw UnicodeEncodeError
@example(job_type="t", payload="null", options={})  # stored as {}, unlike the null given
def test_enqueue_stores_the_job_it_reports_or_nothing(
    redis_server: RedisServer,
    queue: Queue,
    job_type: str,
    payload: str | None,
    options: dict[str, str],
) -> None:
    _empty(queue)
    before = snapshot(queue.client, queue.keys)
    args = [arg for pair in options.items() for arg in pair]
    args += ["--", job_type] if payload is None else ["--", job_type, payload]
    result = run(redis_server.url, queue.keys.queue, "enqueue", *args)
    if result.exit_code != 0:
        assert snapshot(queue.client, queue.keys) == before, "a refused enqueue stored something"
        return
    job_id = result.stdout.strip()
    info = queue.get_job(job_id)
    assert info.type == job_type
    expected = orjson.dumps(orjson.loads(payload)) if payload else b"{}"
    assert info.payload == expected
    census(queue.client, queue.keys).assert_sound()


def test_enqueue_refuses_arguments_together_with_stdin(
    redis_server: RedisServer, queue: Queue
) -> None:
    for args in (["t", "--stdin"], ["--stdin", "--group", "g"]):
        result = run(redis_server.url, queue.keys.queue, "enqueue", *args, input=b'{"type":"a"}')
        assert result.exit_code == 2, args
        assert "with --stdin" in result.stderr


# -- enqueue --stdin ---------------------------------------------------------------------------


def _one_due_time(record: dict[str, Any]) -> dict[str, Any]:
    if record.get("delay"):
        record.pop("run_at", None)
    return record


_good_lines = st.fixed_dictionaries(
    {"type": st.sampled_from(["a", "b"])},
    optional={
        "payload": _json,
        "priority": st.sampled_from(PRIORITY_CLASSES),
        "group": st.sampled_from(["", "g1"]),
        "max_attempts": st.integers(1, 5),
        "delay": st.sampled_from([0, 5]),
        "dedup_key": st.sampled_from(["", "k"]),
        "backoff": st.just({"base": 1, "cap": 2}),
        "run_at": st.just("2030-01-01T00:00:00+00:00"),
    },
).map(lambda record: orjson.dumps(_one_due_time(record)))


_deep = b"[" * 300 + b"]" * 300
_bad_lines = st.one_of(
    st.binary(max_size=20).map(lambda raw: raw.replace(b"\n", b"")),
    st.sampled_from(
        [
            b"{}",
            b"[]",
            b"null",
            b'{"type": 1}',
            b'{"type": ""}',
            b'{"type": "a", "backoff": 3}',
            b'{"type": "a", "backoff": {"base": 2, "cap": 1}}',
            b'{"type": "a", "backoff": {"nope": 1}}',
            b'{"type": "a", "run_at": "2020-01-01"}',
            b'{"type": "a", "run_at": 5}',
            b'{"type": "a", "run_at": "2030-01-01T00:00:00+00:00", "delay": 5}',
            b'{"type": "a", "payload": ' + _deep + b"}",
            b'{"type": "a", "payload": "' + b"x" * DEFAULT_MAX_PAYLOAD + b'"}',
            b'{"type": "a", "nope": 1}',
            b'{"type": "a", "self": 1}',
            b'{"type": "a", "max_attempts": 1e400}',
            b'{"type": "a", "priority": "urgent"}',
            b"\xff\xfe",
            b'\xef\xbb\xbf{"type": "a"}',
            b'{"type": "a\\ud800"}',
        ]
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["a"]) | _json},
        optional={
            name: _json
            for name in ("payload", "priority", "group", "max_attempts", "timeout", "delay")
        },
    ).map(orjson.dumps),
)
_blank_lines = st.sampled_from([b"", b"  ", b"\t", b"\r"])


@fuzz(scale=1.0)
@given(
    lines=st.lists(
        st.tuples(st.sampled_from(["good", "bad", "blank"]), st.data()), min_size=0, max_size=8
    ),
    ending=st.sampled_from([b"\n", b"\r\n"]),
)
def test_a_stdin_batch_is_enqueued_whole_or_not_at_all(
    redis_server: RedisServer, queue: Queue, lines: list[tuple[str, Any]], ending: bytes
) -> None:
    _empty(queue)
    drawn = []
    for kind, data in lines:
        strategy = {"good": _good_lines, "bad": _bad_lines, "blank": _blank_lines}[kind]
        drawn.append((kind, data.draw(strategy, label=kind)))
    stdin = ending.join(line for _, line in drawn)
    before = snapshot(queue.client, queue.keys)

    result = run(redis_server.url, queue.keys.queue, "enqueue", "--stdin", input=stdin)
    jobs = sum(1 for _, line in drawn if line.strip())
    if result.exit_code != 0:
        assert result.exit_code == 1
        assert snapshot(queue.client, queue.keys) == before, "a refused batch stored some jobs"
        number = int(re.match(r"Error: line (\d+)", result.stderr)[1])  # type: ignore[index]
        assert drawn[number - 1][0] == "bad", f"line {number} was good: {drawn[number - 1]}"
        assert "nothing was enqueued" in result.stderr
        return
    counts = re.search(r"(\d+) enqueued, (\d+) deduplicated", result.stdout)
    assert counts, result.stdout
    created, deduplicated = int(counts[1]), int(counts[2])
    assert created + deduplicated == jobs
    sound = census(queue.client, queue.keys)
    sound.assert_sound()
    assert len(sound.placed) == created


def test_a_bad_line_after_the_first_chunk_enqueues_nothing_and_is_named(
    redis_server: RedisServer, queue: Queue
) -> None:
    # Chunks used to be sent as they were read: the first 5,000 jobs stayed enqueued and the
    # error (raised by the send, not the reader) named no line.
    _empty(queue)
    good = b'{"type": "a", "payload": 1}\n' * BATCH_LIMIT
    bad = b'{"type": "a", "payload": "' + b"x" * DEFAULT_MAX_PAYLOAD + b'"}\n'
    result = run(redis_server.url, queue.keys.queue, "enqueue", "--stdin", input=good + bad)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: line {BATCH_LIMIT + 1}: payload is ")
    assert census(queue.client, queue.keys).placed == set()


def test_a_batch_over_two_chunks_is_enqueued_whole(redis_server: RedisServer, queue: Queue) -> None:
    _empty(queue)
    lines = b"".join(b'{"type": "a", "payload": %d}\n' % n for n in range(BATCH_LIMIT + 5))
    result = run(redis_server.url, queue.keys.queue, "enqueue", "--stdin", input=lines)
    assert result.exit_code == 0
    assert f"{BATCH_LIMIT + 5} enqueued, 0 deduplicated" in result.stdout
    assert len(census(queue.client, queue.keys).placed) == BATCH_LIMIT + 5


def test_a_redis_error_part_way_says_how_many_jobs_were_enqueued(
    redis_server: RedisServer, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    _empty(queue)
    monkeypatch.setattr(producing, "BATCH_LIMIT", 2)
    # A real Redis error in the second chunk only: the job id sequence reaches 2**53 there, so
    # enqueue.lua refuses it before it writes anything.
    queue.client.set(queue.keys.base + "seq", 2**53 - 3)
    stdin = b'{"type": "a"}\n{"type": "a"}\n{"type": "a"}\n'
    result = run(redis_server.url, queue.keys.queue, "enqueue", "--stdin", input=stdin)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: 2 of 3 jobs were enqueued and the next 1 may or may not be: BackendError: "
    )
    assert len(census(queue.client, queue.keys).placed) == 2


@pytest.mark.parametrize(
    ("limit", "value", "message"),
    [("STDIN_MAX_JOBS", 3, "over 3 jobs (at line 4)"), ("STDIN_MAX_BYTES", 50, "over 50 bytes")],
)
def test_input_over_the_limits_is_refused_whole(
    redis_server: RedisServer,
    queue: Queue,
    monkeypatch: pytest.MonkeyPatch,
    *,
    limit: str,
    value: int,
    message: str,
) -> None:
    _empty(queue)
    # The real limits (a million jobs, 256 MiB) are too large to reach in a unit of CI time.
    monkeypatch.setattr(producing, limit, value)
    stdin = b'{"type": "a"}\n' * 4
    result = run(redis_server.url, queue.keys.queue, "enqueue", "--stdin", input=stdin)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "nothing was enqueued" in result.stderr
    assert census(queue.client, queue.keys).placed == set()


# -- dead letters ------------------------------------------------------------------------------


def _kill(queue: Queue, worker: ScriptedWorker, n: int) -> list[str]:
    ids = [e.id for e in queue.enqueue_batch("doomed", range(n), group="g1")]
    claimed = worker.claim(n, classes=None).jobs
    worker.fail(*claimed, reason="error", permanent=True)
    return ids


_dates = st.sampled_from(
    ["2020-01-01", "2020-01-01 10:00:00", "2020-13-01", "0001-01-01", "9999-12-31", "x", ""]
)


@st.composite
def dlq_commands(draw: st.DrawFn, dead: list[str]) -> list[str]:
    sub = draw(st.sampled_from(["list", "show", "replay", "purge"]))
    ids = st.sampled_from([*dead, "nope"]) | _texts
    args = [sub]
    if sub == "show":
        return [*args, "--", *draw(st.lists(ids, min_size=0, max_size=2))]
    filters = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "--type": st.sampled_from(["doomed"]) | _texts,
                "--group": st.sampled_from(["g1"]) | _texts,
                "--reason": st.sampled_from(["error", "timeout"]) | _texts,
                "--since": _dates,
                "--until": _dates,
            },
        )
    )
    args += [arg for pair in filters.items() for arg in pair]
    if sub == "list":
        if draw(st.booleans()):
            args += ["--limit", draw(st.sampled_from(["1", "100"]) | _numbers)]
        return args
    if draw(st.booleans()):
        args.append("--all")
    return [*args, "--", *draw(st.lists(ids, max_size=3))]


@fuzz(scale=0.5)
@given(data=st.data())
@example(data=["show", "--", "a\ud800"])  # raw UnicodeEncodeError
@example(data=["list", "--limit", "-1"])  # listed nothing, successfully
def test_dead_letter_commands_answer_or_refuse_cleanly(
    redis_server: RedisServer, queue: Queue, data: Any
) -> None:
    _empty(queue)
    with ScriptedWorker(redis_server.url, queue.keys) as worker:
        dead = _kill(queue, worker, 2)
    args = data if isinstance(data, list) else data.draw(dlq_commands(dead), label="args")
    before = snapshot(queue.client, queue.keys)
    result = run(redis_server.url, queue.keys.queue, "dlq", *args)
    if result.exit_code != 0:
        assert snapshot(queue.client, queue.keys) == before, "a refused command changed Redis"
        return
    if args[0] == "show":
        assert args[2] in dead
        assert orjson.loads(result.stdout)["id"] == args[2]
    elif args[0] == "purge":
        left = {i.decode() for i in cast(list[bytes], queue.client.zrange(queue.keys.dead, 0, -1))}
        purged = int(result.stdout.split()[0])
        assert len(left) == len(dead) - purged
        assert not left & {arg for arg in args if arg in dead}, "a named dead letter survived"
    elif args[0] == "replay":
        assert re.match(r"\d+ replayed, \d+ missing, \d+ skipped", result.stdout)
    census(queue.client, queue.keys).assert_sound()


# -- rate limits -------------------------------------------------------------------------------


@fuzz(scale=0.3)
@given(
    group=st.sampled_from(["*", "acme"]) | _texts,
    count=st.sampled_from(["1", "10", str(2**53), str(2**53 + 1)]) | _numbers,
    per=st.sampled_from(["0.001", "1", "60", str(MAX_SECONDS)]) | _numbers,
)
@example(group="g", count="1", per="nan")  # raw ValueError from round()
@example(group="g", count="1", per="inf")  # raw OverflowError
@example(group="g", count="1", per="1e300")  # stored, a window no Lua number holds exactly
@example(group="g", count="1", per="0.0004")  # stored as a 0 ms window: no limit at all
@example(group="g\ud800", count="1", per="1")  # raw UnicodeEncodeError
def test_rate_limit_stores_exactly_what_it_accepts(
    redis_server: RedisServer, queue: Queue, group: str, count: str, per: str
) -> None:
    _empty(queue)
    result = run(redis_server.url, queue.keys.queue, "rate-limit", "--", group, count, per)
    stored = queue.client.hget(queue.keys.limits, group.encode(errors="replace"))
    if result.exit_code != 0:
        assert stored is None
        return
    seconds = float(per)
    assert 1 <= int(count) <= 2**53
    assert 0.001 <= seconds <= MAX_SECONDS
    assert stored == f"{int(count)}:{round(seconds * 1000)}".encode()


# -- history -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history_urls(postgres_server: PostgresServer, closed_port: int) -> list[str]:
    return [
        postgres_server.url,
        postgres_server.url,
        "",
        " ",
        "nonsense",
        f"postgresql://127.0.0.1:{closed_port}/conveyor?connect_timeout=1",
        f"postgresql://127.0.0.1:{postgres_server.url.rpartition(':')[2]}x",
    ]


@fuzz(scale=0.3)
@given(
    which_url=st.integers(0, 6),
    job_id=st.none() | st.sampled_from(["nope"]) | _texts,
    summary=st.booleans(),
    since=st.none() | _dates,
    until=st.none() | _dates,
)
@example(which_url=0, job_id=None, summary=True, since=None, until="0001-01-01")  # OverflowError
@example(which_url=2, job_id="x", summary=False, since=None, until=None)  # libpq's defaults
def test_history_answers_or_refuses_cleanly(
    redis_server: RedisServer,
    history_urls: list[str],
    *,
    which_url: int,
    job_id: str | None,
    summary: bool,
    since: str | None,
    until: str | None,
) -> None:
    args = ["history", "--database-url", history_urls[which_url]]
    args += ["--summary"] if summary else []
    args += [] if since is None else ["--since", since]
    args += [] if until is None else ["--until", until]
    args += [] if job_id is None else ["--", job_id]
    result = run(redis_server.url, "fzhistory", *args)
    if result.exit_code == 0:
        assert summary, "answered without --summary"
        assert job_id is None, "answered for a job that has no history"


# -- worker --------------------------------------------------------------------------------------

_worker_values = {
    "--processes": st.sampled_from(["1", "2"]),
    "--concurrency": st.sampled_from(["1", "16"]),
    "--lease-ttl": st.sampled_from(["30", "0.5"]),
    "--grace": st.sampled_from(["0", "25"]),
    "--heartbeat": st.sampled_from(["0", "5"]),
    "--classes": st.sampled_from(["critical,high", "normal", "", "urgent", ",,"]),
    "--metrics-port": st.sampled_from(["0", "9100", "65536", "-1"]),
    "--log-level": st.sampled_from(["INFO", "debug", "LOUD", "", "5"]),
    "--log-format": st.sampled_from(["text", "json", "xml"]),
    "--claim-batch": st.sampled_from(["64"]),
    "--history-batch": st.sampled_from(["500"]),
}


@fuzz(scale=0.5)
@given(
    options=st.fixed_dictionaries(
        {}, optional={name: values | _numbers | _texts for name, values in _worker_values.items()}
    ),
    modules=st.lists(st.sampled_from(["app.tasks", "x"]) | _texts, max_size=2),
    help_too=st.booleans(),
)
@example(options={"--lease-ttl": "nan"}, modules=[], help_too=False)  # a NaN lease, accepted
@example(options={"--log-level": "LOUD"}, modules=[], help_too=False)  # ValueError at start
@example(options={"--metrics-port": "65536"}, modules=[], help_too=False)  # OverflowError
def test_worker_settings_are_validated_before_anything_starts(
    redis_server: RedisServer, options: dict[str, str], modules: list[str], help_too: bool
) -> None:
    # --check first, so no fuzzed value can swallow it: the worker never starts.
    args = ["worker", "--check", *(arg for pair in options.items() for arg in pair)]
    args += ["--help"] if help_too else ["--", *modules]
    result = run(redis_server.url, "fzworker", *args)
    if result.exit_code == 0 and not help_too:
        shown = orjson.loads(result.stdout)
        if modules:
            assert shown["import_path"] == modules
        for name, value in shown.items():
            assert not isinstance(value, float) or math.isfinite(value), name
        assert 0 <= shown["metrics_port"] <= 65535
