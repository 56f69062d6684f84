"""The ``concurrent-runs`` command: deploy the library and inspect limit keys.

Each subcommand calls the plain functions of ``deploy`` and ``slots`` and
prints their results: reports to stdout, errors to stderr as one line, with a
non-zero exit status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import click

from concurrent_runs._core import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_REDIS_URL,
    check_token,
    redis_url_from_env,
)

from .deploy import (
    DEFAULT_REPLICA_TIMEOUT_S,
    NodeStatus,
    deploy_library,
    library_status,
)
from .nodes import LoaderError
from .slots import SlotAdmin

URL_ENV_VARS = ("CONCURRENT_RUNS_REDIS_URL", "REDIS_URL")
LOGGER_NAMES = ("concurrent_runs", "concurrent_runs_loader")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


# Shared options ------------------------------------------------------------


def url_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--url",
        metavar="URL",
        envvar=list(URL_ENV_VARS),
        default=lambda: redis_url_from_env(os.environ),
        help=(
            "Redis URL of the server, or of any node of a Redis Cluster "
            "(redis://, rediss:// or unix://). Default: $CONCURRENT_RUNS_REDIS_URL, "
            f"else $REDIS_URL, else {DEFAULT_REDIS_URL}."
        ),
    )(command)


def prefix_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--prefix",
        default=DEFAULT_KEY_PREFIX,
        show_default=True,
        help="Prefix added to KEY to form the Redis key, as the limiter's key_prefix.",
    )(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of text."
    )(command)


def check_key_argument(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value:
        raise click.BadParameter("must not be empty")
    return value


def check_token_argument(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        check_token(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


key_argument = click.argument("key", callback=check_key_argument)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a LoaderError into a one-line error message and exit status 1."""
    try:
        yield
    except LoaderError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None


def configure_logging(ctx: click.Context, verbosity: int) -> None:
    """Send the package loggers to stderr until the command ends.

    -v logs at INFO, -vv at DEBUG. The handler and the old levels are undone
    when the command ends, so that repeated runs in one process (tests) do not
    stack handlers.
    """
    if verbosity <= 0:
        return
    level = logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        ctx.call_on_close(partial(_restore_logger, logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(level)


def _restore_logger(
    logger: logging.Logger, handler: logging.Handler, level: int
) -> None:
    logger.removeHandler(handler)
    logger.setLevel(level)


# Commands ------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log progress to stderr; repeat (-vv) to log each step in detail.",
)
@click.version_option(package_name="concurrent-runs")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Deploy the concurrent_runs Redis library and inspect limit keys.

    Every command connects to --url, a Redis 7.0 or newer server or any node
    of a Redis Cluster. KEY is the logical key that the limiter is given; the
    command adds --prefix to it to form the Redis key.
    """
    configure_logging(ctx, verbose)


@main.command()
@url_option
@click.option(
    "--force",
    is_flag=True,
    help=(
        "Also downgrade, change the major version, replace a library of "
        "unrecognised version, or reload an unchanged version."
    ),
)
@click.option(
    "--dry-run", is_flag=True, help="Report what load would do, and change nothing."
)
@click.option(
    "--replica-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_REPLICA_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="How long replicas may take to receive the library; 0 skips the check.",
)
@click.pass_context
def load(
    ctx: click.Context, url: str, force: bool, dry_run: bool, replica_timeout: float
) -> None:
    """Deploy or upgrade the library on the server or cluster.

    On a cluster the library is loaded on every primary. Prints one line per
    node: installed, upgraded X -> Y or unchanged for a primary, and the
    version each replica received. A downgrade, or a change
    of major version (clients of the old major version stop working), is
    rejected unless --force is given. Exits with status 1 when any node was
    rejected or failed; those lines go to stderr.
    """
    with reported_errors():
        result = deploy_library(
            url, force=force, dry_run=dry_run, replica_timeout_s=replica_timeout
        )
    for node in result.nodes:
        click.echo(node.describe(), err=not node.ok)
    if not result.ok:
        ctx.exit(1)


@main.command()
@url_option
@json_option
@click.pass_context
def status(ctx: click.Context, url: str, as_json: bool) -> None:
    """Show the Redis and library versions of each node.

    The text form is a table with one row per node (a plain primary lists its
    replicas too), then the version this package would load. --json prints a
    list with one object per node. Exits with status 1 when a node could not
    be read.
    """
    with reported_errors():
        rows = library_status(url)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        click.echo(format_status_table(rows))
    failed = [row for row in rows if row.error is not None]
    for row in failed:
        click.echo(f"{row.address} {row.role}: {row.error}", err=True)
    if failed:
        ctx.exit(1)


def format_status_table(rows: Sequence[NodeStatus]) -> str:
    """Return the status table, ending with the packaged library version."""
    table = [("ADDRESS", "ROLE", "REDIS", "LIBRARY")]
    for row in rows:
        missing = "?" if row.error else "none"
        table.append(
            (
                row.address,
                row.role,
                row.redis_version or "?",
                row.library_version or missing,
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(3)]
    lines = []
    for line in table:
        padded = [cell.ljust(width) for cell, width in zip(line, widths)]
        lines.append("  ".join([*padded, line[3]]))
    lines.append(f"packaged library: {rows[0].packaged_version}")
    return "\n".join(lines)


@main.command()
@key_argument
@url_option
@prefix_option
def count(key: str, url: str, prefix: str) -> None:
    """Print the number of live slots of KEY."""
    with reported_errors(), SlotAdmin(url) as admin:
        click.echo(admin.count(prefix + key))


@main.command()
@key_argument
@url_option
@prefix_option
@json_option
def holders(key: str, url: str, prefix: str, as_json: bool) -> None:
    """List the live slots of KEY, soonest lease end first.

    Prints one line per slot: the token and the seconds left on its lease.
    --json prints a list of {"token", "seconds_left"} objects.
    """
    redis_key = prefix + key
    with reported_errors(), SlotAdmin(url) as admin:
        slots = admin.holders(redis_key)
    if as_json:
        listed = [
            {"token": slot.token, "seconds_left": slot.seconds_left} for slot in slots
        ]
        click.echo(json.dumps(listed, indent=2))
        return
    for slot in slots:
        click.echo(f"{slot.token} {slot.seconds_left:.3f}s")
    if not slots:
        click.echo(f"no live slots at {redis_key}", err=True)


@main.command()
@key_argument
@click.argument("token", callback=check_token_argument)
@url_option
@prefix_option
def release(key: str, token: str, url: str, prefix: str) -> None:
    """Free the slot of TOKEN at KEY.

    Use it for a holder that is stuck but still extends its lease. Exits with
    status 1 when TOKEN held no live slot: it was never granted, was released
    already, or its lease had ended.
    """
    redis_key = prefix + key
    with reported_errors(), SlotAdmin(url) as admin:
        released = admin.release(redis_key, token)
    if not released:
        raise click.ClickException(
            f"Could not release token {token}: it has no live slot at {redis_key}"
        )
    click.echo(f"released {token}")


@main.command()
@key_argument
@url_option
@prefix_option
def reap(key: str, url: str, prefix: str) -> None:
    """Remove the ended slots of KEY and print how many.

    Ended slots never count, and an acquire that finds its key full removes
    a few, so this only tidies a key that many crashed holders left behind.
    """
    redis_key = prefix + key
    with reported_errors(), SlotAdmin(url) as admin:
        removed = admin.reap(redis_key)
    noun = "slot" if removed == 1 else "slots"
    click.echo(f"removed {removed} ended {noun} from {redis_key}")
