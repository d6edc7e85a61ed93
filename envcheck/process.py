"""What every envcheck command shares as a process: stop signals (Ctrl-C, SIGTERM, SIGHUP) that
end it with one line and 128 + N after its cleanup, stdout whose write errors end it cleanly
(141 for a reader that has gone, as SIGPIPE would; 2 for a full disk), and the command group
where usage errors become one line and an EnvcheckError its line and its exit code."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys

import click

from envcheck.errors import EXIT_INTERRUPTED, EXIT_USAGE, EnvcheckError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal (Ctrl-C, scancel's and kubectl delete's SIGTERM, a closed terminal's
    SIGHUP) raised in the main thread, so `finally` blocks run on the way out: the gpu-smoke
    container is removed (dockerd would otherwise keep it, and the GPU, until the model test
    ends), layer streams stop, the Slurm allocation is released, the cursor comes back.
    Not a KeyboardInterrupt: click would turn that into "Aborted!" and exit 1, a failed check."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    for stop in STOP_SIGNALS:  # a second signal ends envcheck at once, cleanup or not
        if signal.getsignal(stop) is _interrupt:
            signal.signal(stop, signal.SIG_DFL)
    raise Interrupted(signum)


def catch_stop_signals() -> None:
    """Stop signals raise Interrupted; one that is ignored (nohup, a background job) stays
    ignored."""
    for stop in STOP_SIGNALS:
        if signal.getsignal(stop) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(stop, _interrupt)


class OutputFailed(BaseException):
    """Writing to stdout failed: its reader has gone (`| head`, a closed ssh session), or the
    file it goes to cannot take it (a full disk). Not an OSError, so that neither click (exit 1,
    a failed check, for a broken pipe; a traceback for anything else) nor rich (exit 1) takes
    it for theirs."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


class CheckedStdout:
    """sys.stdout, whose write errors raise OutputFailed."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise OutputFailed(error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise OutputFailed(error) from None


def _output_failed(error: OSError) -> int:
    """The exit code for a failed write to stdout, after saying why (unless nobody reads)."""
    with contextlib.suppress(OSError, ValueError):  # what is left in the buffer goes nowhere,
        devnull = os.open(os.devnull, os.O_WRONLY)  # instead of failing again at exit
        os.dup2(devnull, sys.__stdout__.fileno())
    if error.errno == errno.EPIPE:  # as a shell reports a program SIGPIPE ended, silently
        return EXIT_INTERRUPTED + signal.SIGPIPE
    with contextlib.suppress(OSError):  # stderr on the same full disk (`2>&1`): the code says it
        click.echo(f"Error: cannot write to standard output ({error.strerror or error}): what "
                   "was written is incomplete; write the output elsewhere", err=True)
    return EXIT_USAGE


def fail(error: EnvcheckError) -> int:
    """Say an EnvcheckError on stderr (`Error: <message>`, then its detail lines); its code."""
    first, *rest = error.lines()
    click.echo(f"Error: {first}", err=True)
    for line in rest:
        click.echo(line, err=True)
    return error.exit_code


def run(command: click.Command) -> None:
    """Run the click command as envcheck's process: signals, checked stdout, errors, codes."""
    catch_stop_signals()
    if sys.stdout is not None:  # None: started with stdout closed (`>&-`); click writes nothing
        sys.stdout = CheckedStdout(sys.stdout)
    try:
        try:
            command()
        finally:
            if sys.stdout is not None:  # what is still buffered fails here, not at the exit
                sys.stdout.flush()
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        click.echo(f"Error: interrupted ({name}): stopped before a verdict, nothing reported",
                   err=True)
        sys.exit(EXIT_INTERRUPTED + stop.signum)
    except OutputFailed as failed:
        sys.exit(_output_failed(failed.error))


class _OneLineUsageError(click.UsageError):
    """A usage error shown as one line, like every other error envcheck prints (click's own
    shows the usage and a hint on lines above it)."""

    def show(self, file=None) -> None:
        usage = " ".join(self.ctx.get_usage().split()) if self.ctx else ""
        where = f" ({usage.replace('Usage: ', 'usage: ', 1)}; --help for more)" if usage else ""
        click.echo(f"Error: {self.format_message()}{where}", file=file, err=True)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare `envcheck` or `envcheck fleet` shows its help
    except click.UsageError as error:
        if isinstance(error, _OneLineUsageError):
            raise
        raise _OneLineUsageError(error.format_message(), error.ctx) from None


class OneLineGroup(click.Group):
    """The command group: usage errors, wherever they are raised (parsing, a nested group, a
    command's own check), are one line with the exit code 2; an EnvcheckError from a pipeline
    is its line and its own exit code (the one place it is caught)."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with _one_line_usage_errors():
            try:
                return super().invoke(ctx)
            except EnvcheckError as error:
                ctx.exit(fail(error))
