"""What a job prints: its plan, one progress line per stage, evaluations, warnings, errors and
the summary. Everything else (Ray's, Ray Data's, Train's, Serve's and DeepSpeed's own INFO
output, and every line Ray workers print) goes to the job's log file, whose path is printed
first; ``--verbose`` brings it all back to the console as well.

    log = console.start(console.log_path_for(run_dir, "pretrain"), verbose=flags.verbose)
    init_ray(cfg.ray)                       # routes worker output through console.route_worker_output

Progress lines come from training workers (``observe.Observer``) as text; the driver shows them
as a live tqdm bar on a terminal, and otherwise (``ray job logs``, a file) one line every
``PROGRESS_EVERY_S`` seconds, the last step always.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

PROGRESS_EVERY_S = float(os.environ.get("BEIT_PROGRESS_EVERY_S", "30"))
"""Seconds between progress lines when the console is not a terminal."""

# Loggers whose INFO output is library chatter: it goes to the log file only.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "DeepSpeed")
PROGRESS_RE = re.compile(r"^step (\d+)/(\d+)\b")
# Lines a worker prints that a person reads: the loop's progress and eval lines, fault injection.
OURS_RE = re.compile(r"^(step \d+/\d+\b|eval\b|\[debug\])")
# A worker line that is a warning or an error (DeepSpeed's "[WARNING]", Ray's "WARNING x.py:1",
# Python's "x.py:1: UserWarning:", a traceback's last line "ValueError: ...").
ALERT_RE = re.compile(
    r"\[(WARNING|ERROR|CRITICAL)\]|\b(WARNING|ERROR|CRITICAL) \S+:\d+|\w+Warning: "
)
STAMP_RE = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\]?\s*")
# Warnings that say nothing a person can act on here (DeepSpeed on a CPU-only machine), and
# Ray Data's announcements of a task failure that run_job reports once, unwrapped.
BENIGN = (
    "Setting accelerator to CPU",
    "An exception was raised from a task of operator",
    "Exception occurred in user code",
)


class _State:
    out: TextIO = sys.stdout
    log: TextIO | None = None
    path: str | None = None
    verbose: bool = False
    bar: Any = None
    last_progress: float = 0.0
    data_t0: float | None = None
    data_n0: int = 0
    alerts: set[str] = set()


_s = _State()


def log_path_for(run_dir: str, job: str, name: str = "job.log") -> str:
    """``<run_dir>/<name>`` for a local run; ``./runs/logs/<job>-<time>.log`` for one on an
    object store or without a run folder."""
    from beit_ray import storage

    if run_dir and not storage.is_remote(run_dir):
        return os.path.join(storage.strip_scheme(run_dir), name)
    return os.path.join("runs", "logs", f"{job}-{time.strftime('%Y%m%d-%H%M%S')}.log")


def begin(lines: list[str], flags: Any, log_path: str) -> bool:
    """A job's opening lines: with ``--dry-run`` print the plan and return False (the job then
    exits 0); otherwise open the job's log at ``log_path`` (:func:`start`), show the plan on
    the console and return True."""
    if flags.dry_run:
        print("\n".join(lines))
        return False
    start(log_path, flags.verbose)
    for line in lines:
        show(line)
    return True


def start(path: str, verbose: bool = False) -> str:
    """Open the job's log file (appending: a resumed run keeps its history) and send library
    logging there; warnings and errors stay on the console. Prints the path; returns it."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if _s.log is not None and _s.path != path:
        _s.log.close()
    if _s.path != path:
        _s.log = open(path, "a", buffering=1)  # noqa: SIM115 (open for the job's lifetime)
        _s.path = path
    _s.verbose = verbose
    _s.out = sys.stdout  # the console, even while library prints are captured
    _s.log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    show(
        f"log: {path}"
        + ("" if verbose else "  (Ray, DeepSpeed and worker output; --verbose shows it here)")
    )
    _quiet_deepspeed()
    with contextlib.suppress(ImportError):  # Ray's loggers exist from its import: adopt them
        import ray  # noqa: F401  before ray.init logs its start-up

    adopt_loggers()
    return path


def finish() -> None:
    """Close the job's log (``run_job`` does it when the job ends): from then on worker output
    and library logging reach the console as without a log, e.g. in a test process."""
    close_bar()
    if _s.log is not None:
        _s.log.close()
    _s.log = _s.path = None
    _s.alerts.clear()
    _s.last_progress, _s.data_t0 = 0.0, None


def log_file() -> str | None:
    """The open log file's path (None before :func:`start`)."""
    return _s.path


def show(line: str, log: bool = True) -> None:
    """One line a person reads: on the console (above a live progress bar) and in the log."""
    if _s.bar is not None:
        _s.bar.write(line, file=_s.out)
    else:
        print(line, file=_s.out, flush=True)
    if log:
        write_log(line)


def write_log(line: str) -> None:
    if _s.log is not None:
        _s.log.write(line.rstrip("\n") + "\n")


# --------------------------------------------------------------------------- Python logging


class _FileHandler(logging.Handler):
    """Writes records to the job's log file, whichever file is open when they arrive."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if _s.log is not None:
            try:
                _s.log.write(self.format(record) + "\n")
            except Exception:  # a log line must never fail the job
                self.handleError(record)


DATA_PROGRESS_RE = re.compile(r"^Total Progress: (\d+)/(\d+|\?)")


class _ConsoleGate(logging.Filter):
    """Lets only warnings and errors through a console handler (everything with --verbose).
    Ray Data's periodic progress block (a dozen lines when stdout is not a terminal) becomes
    one ``data: rows, rate, ETA`` line every PROGRESS_EVERY_S."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _s.verbose or _s.log is None:
            return True
        if record.levelno >= logging.WARNING:
            return not any(b in str(record.msg) for b in BENIGN)
        m = DATA_PROGRESS_RE.match(str(record.msg))
        if m and record.name.endswith("logging_progress"):
            data_progress(int(m.group(1)), None if m.group(2) == "?" else int(m.group(2)))
        return False


def data_progress(done: int, total: int | None) -> None:
    """A Ray Data execution's rows so far, with rate and ETA, at most every PROGRESS_EVERY_S."""
    now = time.monotonic()
    if _s.data_t0 is None or done < _s.data_n0:
        _s.data_t0, _s.data_n0 = now, done
    if done == 0 or (_s.last_progress and now - _s.last_progress < PROGRESS_EVERY_S):
        return  # nothing done yet says nothing
    rate = (done - _s.data_n0) / max(now - _s.data_t0, 1e-9)
    eta = f", eta {_duration((total - done) / rate)}" if total and rate > 0 else ""
    print(f"data: {done}/{total or '?'} rows, {rate:.1f} rows/s{eta}", file=_s.out, flush=True)
    _s.last_progress = now


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_FILE = _FileHandler()
_GATE = _ConsoleGate()


def adopt_loggers() -> None:
    """Send the library loggers' records to the log file and gate their console handlers.

    Idempotent; called again after Ray starts and before stages, since Ray Data, Train and
    Serve install their handlers when first imported or started.
    """
    root = logging.getLogger()
    if _FILE not in root.handlers:
        root.addHandler(_FILE)
        if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            console.addFilter(_GATE)
            root.addHandler(console)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    # DeepSpeed's logger is diverted by a filter on the logger itself (_quiet_deepspeed).
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "ray"]
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers:
            continue  # propagates to a parent that is handled here
        if logger.propagate is False and _FILE not in logger.handlers:
            logger.addHandler(_FILE)
        for h in logger.handlers:
            if h is not _FILE and _GATE not in h.filters and _is_console(h):
                h.addFilter(_GATE)


def _is_console(h: logging.Handler) -> bool:
    stream = getattr(h, "stream", None)
    return type(h).__name__ in ("PlainRayHandler", "_StderrHandler") or stream in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


class _DeepSpeedDivert(logging.Filter):
    """On DeepSpeed's logger itself: its handler (stdout) is made when deepspeed is imported,
    and logs at import time, so the filter sits on the logger before that happens."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _s.log is None:
            return True
        _FILE.handle(record)
        if any(b in str(record.msg) for b in BENIGN):
            return _s.verbose
        return _s.verbose or record.levelno >= logging.WARNING


def _quiet_deepspeed() -> None:
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedDivert) for f in ds.filters):
        ds.addFilter(_DeepSpeedDivert())


# --------------------------------------------------------------------------- worker output


def route_worker_output() -> None:
    """Replace Ray's printer of worker stdout/stderr on this driver: every line goes to the log
    file (prefixed as Ray prefixes it); the console gets the training progress and eval lines,
    and each distinct warning or error once. Ray's own printer stays on with --verbose."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        original = dict(dispatcher.handlers).get("ray_print_logs")
        dispatcher.remove_handler("ray_print_logs")
    except Exception as e:  # a Ray without this internal: keep its printer
        write_log(f"console: worker output stays on Ray's printer ({e!r})")
        return

    def route(data: dict[str, Any]) -> None:
        try:
            if _s.log is None:  # the job's log is closed: print as Ray does
                if original is not None:
                    original(data)
                return
            _route(data, original if _s.verbose else None)
        except Exception as e:  # never lose the log thread to a formatting bug
            write_log(f"console: could not route worker output: {e!r}")

    dispatcher.add_handler("ray_print_logs", route)


def _route(data: dict[str, Any], ray_printer: Any) -> None:
    if ray_printer is not None:
        ray_printer(data)
    who = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = f"({who} pid={data.get('pid')}{'' if ip == data.get('localhost') else f', ip={ip}'})"
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its raw status dumps: only events, as Ray shows them
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    for line in lines:
        write_log(f"{where} {line}")
        if ray_printer is not None:
            continue
        if OURS_RE.match(line):  # already in the log, with the worker's prefix
            progress(line, log=False) if PROGRESS_RE.match(line) else show(line, log=False)
        else:
            alert(line, where, log=False)


def alert(line: str, where: str = "", log: bool = True) -> None:
    """Show a warning or error line once (repeats and known-benign ones only in the log)."""
    if not ALERT_RE.search(line) or any(b in line for b in BENIGN):
        return
    key = STAMP_RE.sub("", line).strip()
    if key not in _s.alerts:
        _s.alerts.add(key)
        show(f"{where} {line}".strip(), log)


class _LogStream(io.TextIOBase):
    """A stdout/stderr stand-in: lines go to the log; warnings among them also to the console."""

    def __init__(self) -> None:
        self.buf = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = re.split(r"[\n\r]", self.buf)
        for line in lines:
            if line.strip():
                write_log(line)
                alert(line, log=False)
        return len(text)

    def flush(self) -> None:
        if _s.log is not None:
            _s.log.flush()


@contextlib.contextmanager
def capture_output() -> Iterator[None]:
    """Library prints in this process (DeepSpeed's checkpoint consolidation, transformers'
    load bars) go to the log file; warnings among them still reach the console."""
    if _s.log is None or _s.verbose:
        yield
        return
    with contextlib.redirect_stdout(_LogStream()), contextlib.redirect_stderr(_LogStream()):
        yield


def progress(line: str, log: bool = True) -> None:
    """A ``step N/T ...`` line: a live bar on a terminal, else one line every PROGRESS_EVERY_S."""
    m = PROGRESS_RE.match(line)
    step, total = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if log:
        write_log(line)
    if _s.out.isatty() and m:
        from tqdm import tqdm

        if _s.bar is None or _s.bar.total != total or step < _s.bar.n:
            close_bar()
            _s.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=_s.out)
        _s.bar.set_postfix_str(line[m.end() :].strip()[:120], refresh=False)
        _s.bar.update(step - _s.bar.n)
        if step >= total:
            close_bar()
        return
    now = time.monotonic()
    if now - _s.last_progress >= PROGRESS_EVERY_S or (m and step >= total) or _s.last_progress == 0:
        print(line, file=_s.out, flush=True)
        _s.last_progress = now


def close_bar() -> None:
    if _s.bar is not None:
        _s.bar.close()
        _s.bar = None


def stage(title: str) -> None:
    """A stage's heading; the next stage's progress starts fresh."""
    close_bar()
    _s.last_progress, _s.data_t0 = 0.0, None
    adopt_loggers()
    show(title)


# --------------------------------------------------------------------------- errors


def original_error(exc: BaseException) -> tuple[BaseException, str, str]:
    """(the user's exception, where it ran, its innermost frame) under Ray's wrappers:
    RayTaskError (``.cause``), Train's worker-group and controller errors, Ray Data's
    UserCodeException, and ``raise ... from`` chains that those use."""
    where: list[str] = []
    frame = text = ""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            rank = min(failures)
            where.append(f"training worker rank {rank}")
            exc = failures[rank]
            continue
        if getattr(exc, "controller_failure", None) is not None:
            where.append("the Ray Train controller")
            exc = exc.controller_failure  # type: ignore[attr-defined]
            continue
        cause = getattr(exc, "cause", None)
        if _is_ray_error(exc) and isinstance(cause, BaseException) and cause is not exc:
            # The instance ray.get raises subclasses the cause and forwards attribute reads to
            # it, so what it knows of the task is read from its message.
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # without Ray's colour codes
            task = re.search(r"(\S+)\(\) \(pid=(\d+)", text)
            where.append(f"{task.group(1)} (pid {task.group(2)})" if task else "a Ray task")
            frame = _last_frame(text) or frame
            exc = cause
            continue
        if _is_ray_error(exc) and exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    if _is_ray_error(exc) and text:
        # A wrapper made in the worker (Ray Data's UserCodeException) arrives without its
        # __cause__; the original is the first exception of the remote traceback's chain.
        first = re.search(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.*)$", text, re.M)
        if first and first.group(1).split(".")[-1] != type(exc).__name__:
            exc = RemoteError(first.group(1).split(".")[-1], first.group(2))
            frame = _last_frame(text[: first.start()]) or frame
    if not frame and exc.__traceback__ is not None:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        frame = f"{last.filename}:{last.lineno} in {last.name}"
    return exc, " in ".join(reversed(where)), frame


class RemoteError(Exception):
    """An exception known only from a remote traceback's text (its class is not importable)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


def _is_ray_error(exc: BaseException) -> bool:
    return any(
        c.__module__.startswith("ray.") and c.__name__ in ("RayError", "RayTrainError")
        for c in type(exc).__mro__
    )


def _last_frame(tb: str) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
    if not frames:
        return ""
    path, line, fn = frames[-1]
    return f"{path}:{line} in {fn}"


def report_error(exc: BaseException) -> int:
    """Print an exception as a person acts on it: the original exception and one line of
    context (where it ran, its innermost frame, where the full traceback is). Returns 1."""
    close_bar()
    orig, where, frame = original_error(exc)
    full = "".join(traceback.format_exception(exc))
    write_log(full)
    message = str(orig).strip().splitlines()
    name = getattr(orig, "type_name", None) or type(orig).__name__
    print(f"error: {name}: {message[0] if message else ''}", file=sys.stderr)
    context = ", ".join(x for x in (where and f"in {where}", frame and f"at {frame}") if x)
    tail = f"full traceback: {_s.path}" if _s.path else ""
    if _s.verbose or not _s.path:
        sys.stderr.write(full)
    print(f"  ({'; '.join(x for x in (context, tail) if x)})", file=sys.stderr, flush=True)
    return 1
