"""The legacy front end: the xm-era optparse parser is the oracle.

``old_parser()`` rebuilds the 4.4 ``tools/remus/remus`` option table with
optparse, and its ``getargs`` rules (truthy values only, "Missing domain").
Over thousands of generated argument vectors, ``remus.cli.parse`` must reach
the same outcome: the same help, the same rejection, or the same settings.
"""

from __future__ import annotations

import io
import optparse
import random
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Sequence

import pytest

from remus import cli
from remus.cli import HELP, OLD_HELP, MissingDomain, Settings, ShowText, parse
from remus.cli_common import match_long
from remus.errors import UsageError


def old_parser() -> optparse.OptionParser:
    parser = optparse.OptionParser(prog="remus")
    parser.usage = "%prog [options] domain [destination]"
    parser.add_option("-i", "--interval", dest="interval", type="int", metavar="MS",
                      help="checkpoint every MS milliseconds")
    parser.add_option("-p", "--port", dest="port", type="int", help="send stream to port PORT", metavar="PORT")
    parser.add_option("", "--blackhole", dest="nullremus", action="store_true",
                      help="replicate to /dev/null (no disk checkpoints, only memory & net buffering)")
    parser.add_option("", "--no-net", dest="nonet", action="store_true",
                      help="run without net buffering (benchmark option)")
    parser.add_option("", "--no-compression", dest="nocompress", action="store_true",
                      help="run without checkpoint compression")
    parser.add_option("", "--timer", dest="timer", action="store_true",
                      help="force pause at checkpoint interval (experimental)")
    return parser


def old_outcome(argv: Sequence[str]) -> tuple[str, Any]:
    """What the xm-era remus did with ``argv``: help, error, missing, or its settings."""
    parser = old_parser()
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            opts, args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return ("help", out.getvalue()) if exc.code == 0 else ("error", err.getvalue())
    if not args:
        return ("missing", None)
    return ("settings", dict(
        domain=args[0],
        destination=args[1] if len(args) > 1 else "localhost",
        interval_ms=opts.interval if opts.interval else 200,
        port=opts.port if opts.port else 8002,
        blackhole=bool(opts.nullremus),
        net_buffering=not opts.nonet,
        compression=not opts.nocompress,
        timer=bool(opts.timer),
    ))


def new_outcome(argv: Sequence[str]) -> tuple[str, Any]:
    try:
        settings = parse(argv)
    except ShowText as shown:
        return ("help", shown.text)
    except MissingDomain:
        return ("missing", None)
    except UsageError as exc:
        return ("error", str(exc))
    return ("settings", settings)


def semantically_invalid(old: dict[str, Any]) -> bool:
    """Values the old parser took but that cannot work: we refuse them with a reason."""
    return not (0 < old["interval_ms"] <= 3_600_000) or not (0 < old["port"] <= 65535)


def assert_same(argv: Sequence[str]) -> None:
    old_kind, old_value = old_outcome(argv)
    new_kind, new_value = new_outcome(argv)
    if old_kind == "settings" and semantically_invalid(old_value):
        assert new_kind == "error", (argv, new_kind, new_value)
        return
    assert new_kind == old_kind, (argv, old_kind, old_value, new_kind, new_value)
    if old_kind == "settings":
        got = {k: getattr(new_value, k) for k in old_value}
        assert got == old_value, argv


# --------------------------------------------------------------------------- the oracle

VALUES = ["100", "50", "0", "-5", "abc", "", "0x10", "010", "0b11", "1_000", " 7", "+20", "8003",
          "70000", "65535", "4000000", "-", "--", "-h", "9" * 25]
LONG_SPELLINGS = {
    "interval": ["--interval", "--inter", "--i", "--in", "--interv"],
    "port": ["--port", "--p", "--po", "--por"],
    "blackhole": ["--blackhole", "--black", "--b", "--bl"],
    "no-net": ["--no-net", "--no-n", "--no-ne"],
    "no-compression": ["--no-compression", "--no-c", "--no-comp"],
    "timer": ["--timer", "--t", "--tim"],
    "help": ["--help", "--h", "--he"],
}
ODD = ["--no", "--no-", "--bogus", "-x", "-5", "-", "--", "-ip", "-hi", "-i-1", "--help=1", "--timer=1",
       "--interval=", "--=x", "---x"]
POSITIONALS = ["dom", "sim:demo", "backup.example", "[::1]", "extra", "-"]


def random_argv(rng: random.Random) -> list[str]:
    argv: list[str] = []
    for _ in range(rng.randint(0, 7)):
        kind = rng.random()
        if kind < 0.3:
            argv.append(rng.choice(POSITIONALS))
        elif kind < 0.55:
            name = rng.choice(["interval", "port"])
            spelled = rng.choice(LONG_SPELLINGS[name] + ["-i" if name == "interval" else "-p"])
            value = rng.choice(VALUES)
            style = rng.random()
            if spelled.startswith("--") and style < 0.4:
                argv.append(f"{spelled}={value}")
            elif not spelled.startswith("--") and style < 0.4:
                argv.append(spelled + value)
            else:
                argv += [spelled, value]
        elif kind < 0.85:
            name = rng.choice(["blackhole", "no-net", "no-compression", "timer", "timer", "blackhole"])
            argv.append(rng.choice(LONG_SPELLINGS[name]))
        elif kind < 0.9:
            argv.append(rng.choice(LONG_SPELLINGS["help"] + ["-h"]))
        else:
            argv.append(rng.choice(ODD))
    return argv


@pytest.mark.slow
def test_oracle_over_generated_argument_vectors() -> None:
    rng = random.Random(20261125)
    vectors = [random_argv(rng) for _ in range(3000)]
    kinds: dict[str, int] = {}
    for argv in vectors:
        assert_same(argv)
        kind = old_outcome(argv)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    # The generator must exercise every outcome, not just one.
    assert all(kinds.get(k, 0) >= 100 for k in ("settings", "error", "missing", "help")), kinds


@pytest.mark.parametrize("argv", [
    ["-i100", "dom"], ["-i", "100", "dom"], ["--interval=100", "dom"], ["--interval", "100", "dom"],
    ["--inter=50", "dom"], ["--black", "dom"], ["dom", "-i", "50", "host", "--timer"],
    ["--", "dom"], ["-i", "5", "--", "-dom", "-dest"], ["dom", "--", "--"], ["--no-c", "--no-n", "dom", "h"],
    ["-p", "8003", "dom", "backup"], ["-i", "0", "dom"], ["-p", "0", "dom"], ["-i", "010", "dom"],
    ["-i", "0x20", "dom"], ["dom", "a", "b", "c"], ["-h", "--bogus"], ["-i", "abc", "-h"], ["-h", "-i", "abc"],
    ["--help=1"], ["-i"], ["--no", "dom"], ["-"], [], ["-i", "-5", "dom"], ["-p", "70000", "dom"],
], ids=repr)
def test_oracle_on_hand_picked_vectors(argv: list[str]) -> None:
    assert_same(argv)


def test_old_prefixes_keep_their_meaning() -> None:
    """New long options must not make an old abbreviation ambiguous or change its target."""
    old_longs = [o.get_opt_string() for o in old_parser().option_list]
    for full in old_longs:
        for end in range(3, len(full) + 1):
            prefix = full[:end]
            old_matches = [o for o in old_longs if o.startswith(prefix)]
            if prefix in old_longs:
                old_matches = [prefix]
            if len(old_matches) != 1:
                continue
            assert match_long(cli._TABLE, prefix).long == old_matches[0], prefix


# --------------------------------------------------------------------------- exact behaviour


def test_help_begins_with_the_old_help_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    expected = old_parser().format_help()
    assert OLD_HELP == expected
    assert HELP.startswith(expected)
    with pytest.raises(ShowText) as shown:
        parse(["--help"])
    assert shown.value.text == HELP


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def test_main_help_exits_0_and_prints_help() -> None:
    assert run_main(["-h"]) == (0, HELP, "")


def test_missing_domain_prints_message_and_help_and_exits_1() -> None:
    status, out, err = run_main(["-i", "100"])
    assert status == 1
    assert out == "Missing domain\n" + HELP
    assert err == ""


@pytest.mark.parametrize("argv,reason", [
    (["-i", "abc", "dom"], "option -i: invalid integer value: 'abc'"),
    (["-p", "70000", "dom"], "option -p/--port: 70000 is not between 1 and 65535 (a TCP port)"),
    (["--bogus", "dom"], "no such option: --bogus"),
    (["-x", "dom"], "no such option: -x"),
    (["--no", "dom"], "ambiguous option: --no (--no-compression, --no-disk, --no-net?)"),
    (["dom", "-i"], "-i option requires 1 argument"),
    (["-i", "-5", "dom"], "option -i/--interval: -5 is not between 1 and 3600000 milliseconds"),
    (["--timer=yes", "dom"], "--timer option does not take a value"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], reason: str) -> None:
    status, out, err = run_main(argv)
    assert status == 2
    assert out == ""
    assert err == f"remus: error: {reason} (see remus --help)\n"


def test_ignored_zero_values_keep_defaults_with_a_warning() -> None:
    settings = parse(["-i", "0", "-p", "0", "dom"])
    assert (settings.interval_ms, settings.port) == (200, 8002)
    assert len(settings.warnings) == 2 and "-i 0" in settings.warnings[0] and "-p 0" in settings.warnings[1]


def test_defaults() -> None:
    assert parse(["dom"]) == Settings(domain="dom")
    s = parse(["dom"])
    assert (s.destination, s.interval_ms, s.port, s.blackhole, s.net_buffering, s.compression, s.timer) == (
        "localhost", 200, 8002, False, True, True, False)


def test_new_options() -> None:
    s = parse(["--stats-json", "/tmp/x.json", "--ack-timeout=900", "dom", "host"])
    assert s.stats_json == "/tmp/x.json" and s.ack_timeout_ms == 900
    with pytest.raises(ShowText) as shown:
        parse(["--version"])
    assert shown.value.text.startswith("remus ")
    with pytest.raises(UsageError):
        parse(["--ack-timeout=0", "dom"])


def test_last_repeated_value_wins_like_optparse() -> None:
    assert parse(["-i", "100", "--interval=300", "dom"]).interval_ms == 300


def test_bad_sim_spec_is_a_usage_error_exit_2() -> None:
    status, out, err = run_main(["--blackhole", "sim:demo,colour=blue"])
    assert status == 2
    assert "unknown key 'colour'" in err and err.count("\n") == 1


def test_docopt_version_in_use_is_reported() -> None:
    # The same tests run on docopt-ng and on Debian's docopt 0.6.2 (see .ci/run).
    import docopt

    assert hasattr(docopt, "docopt")
    print("docopt module:", getattr(docopt, "__version__", "?"), docopt.__file__, file=sys.stderr)


def test_no_disk_turns_disk_replication_off() -> None:
    assert parse(["dom"]).disk_replication is True
    assert parse(["--no-disk", "dom"]).disk_replication is False
    assert parse(["--no-d", "dom"]).disk_replication is False


# --------------------------------------------------------------------------- fencing options (issue 9)


def test_fence_options() -> None:
    settings = parse(["--fence", "fence_ipmilan -o off", "--fence-timeout=1500", "sim:x", "backup"])
    assert settings.fence == "fence_ipmilan -o off" and settings.fence_timeout_ms == 1500
    defaults = parse(["sim:x"])
    assert defaults.fence is None and defaults.fence_timeout_ms == 30000
    with pytest.raises(UsageError, match="--fence: the command is empty"):
        parse(["--fence=", "sim:x"])
    with pytest.raises(UsageError, match="--fence-timeout"):
        parse(["--fence-timeout=0", "sim:x"])
    with pytest.raises(UsageError, match="ambiguous option: --fen"):
        parse(["--fen=x", "sim:x"])


def test_new_options_are_listed_only_in_the_additional_block() -> None:
    extra = HELP[len(OLD_HELP):]
    for option in ("--fence=CMD", "--fence-timeout=MS", "--key-file=FILE"):
        assert option in extra and option not in OLD_HELP
