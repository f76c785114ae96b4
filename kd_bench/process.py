"""Running the recipes' commands: line-by-line logs and progress on the console."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

#: Lines of a failed command's log shown on the console.
TAIL_LINES = 25


class CommandError(RuntimeError):
    """A command exited with a non-zero status.

    Args:
        argv: the command line.
        returncode: its exit status.
        log_file: where its whole output is (or None).
        tail: its last output lines.
    """

    def __init__(self, argv, returncode, log_file, tail):
        self.argv, self.returncode = argv, returncode
        self.log_file, self.tail = log_file, tail
        where = f" (log: {log_file})" if log_file else ""
        super().__init__(
            f"command failed with exit code {returncode}{where}: "
            + " ".join(map(str, argv))
            + f"\n--- last {len(tail)} lines ---\n"
            + "".join(tail)
        )


def format_seconds(seconds):
    """``1h02m03s`` / ``2m03s`` / ``3.4s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


_UPDATES = re.compile(r"\bnum_updates[=\":\s]+(\d+)")
_RESUMED = re.compile(r"Loaded checkpoint .*\(epoch \d+ @ (\d+) updates\)")
_TQDM = re.compile(r"([\d.]+)([kMGT]?)/([\d.]+)([kMGT]?) \[")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_LOSS = re.compile(r"\bloss[=\":\s]+([\d.]+)")


def _count(n):
    """A count as a short number (``1234``, ``26.1k``)."""
    if n < 1e4:
        return str(int(round(n)))
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"


class Progress:
    """Turns a command's output lines into progress lines for the console.

    Args:
        kind: ``"train"`` (fairseq-train's ``num_updates=`` log lines, against
            ``total`` updates), ``"translate"`` (fairseq-generate's ``H-``
            lines, against ``total`` sentences) or ``"bar"`` (a tqdm bar's
            ``done/total [``, e.g. fairseq-kd-dump-topk and fairseq-kd-distill).
        total: the updates or sentences expected (None for ``"bar"``: read
            from the bar).
        label: what the line names (``teacher``, ``test beam 5``...).
        interval: the fewest seconds between two lines (the last one is
            always shown by :meth:`finish`).
        clock: the time function (tests pass a fake one).
    """

    UNITS = {"train": "updates", "translate": "sentences", "bar": "done"}

    def __init__(self, kind, total=None, label="", interval=10.0, clock=time.time):
        if kind not in self.UNITS:
            raise ValueError(f"unknown progress kind {kind!r}")
        self.kind, self.total, self.label = kind, total, label
        self.interval, self.clock = interval, clock
        self.start = clock()
        self.first = 0  # the count when this run started (a resumed training)
        self.done = 0
        self.loss = None
        self.last_print = None
        self.last_done = None
        self.first_seen = None  # (time, count) of the first count

    def _count(self, line):
        if self.kind == "train":
            m = _RESUMED.search(line)
            if m:
                self.first = self.done = int(m.group(1))
                self.start = self.clock()
                return False
            m = _UPDATES.search(line)
            if m:
                self.done = int(m.group(1))
                loss = _LOSS.search(line)
                self.loss = loss.group(1) if loss else self.loss
                return True
        elif self.kind == "translate":
            if line.startswith("H-"):
                self.done += 1
                return True
        else:
            m = None
            for m in _TQDM.finditer(line):
                pass
            if m:
                self.done = float(m.group(1)) * _SCALE[m.group(2)]
                self.total = float(m.group(3)) * _SCALE[m.group(4)]
                return True
        return False

    def message(self):
        """The progress line for what has been seen so far."""
        elapsed = self.clock() - self.start
        unit = self.UNITS[self.kind]
        head = f"    {self.label + ': ' if self.label else ''}{_count(self.done)}"
        if not self.total:
            return f"{head} {unit}, {format_seconds(elapsed)} elapsed"
        pct = 100.0 * self.done / self.total
        text = f"{head}/{_count(self.total)} {unit} ({pct:.0f}%), "
        text += format_seconds(elapsed)
        text += " elapsed"
        # training: the rate since the start (or the resumed checkpoint);
        # translation and bars: since the first count (model loading excluded)
        since, ran = elapsed, self.done - self.first
        if self.kind != "train" and self.first_seen is not None:
            since = self.clock() - self.first_seen[0]
            ran = self.done - self.first_seen[1]
        if 0 < ran and self.done < self.total and since > 0:
            left = (self.total - self.done) * since / ran
            text += f", ~{format_seconds(left)} left"
        if self.loss is not None:
            text += f", loss {self.loss}"
        return text

    def feed(self, line):
        """Read one output line; return a progress line to print, or None."""
        if not self._count(line):
            return None
        now = self.clock()
        if self.first_seen is None:
            self.first_seen = (now, self.done)
        if self.last_print is not None and now - self.last_print < self.interval:
            return None
        self.last_print, self.last_done = now, self.done
        return self.message()

    def finish(self):
        """The final progress line (None when nothing was counted or shown)."""
        return self.message() if self.done and self.done != self.last_done else None


def bin_path(name):
    """Path of a console script installed beside this Python (else ``name``)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def child_env():
    """The environment of every command: unbuffered Python output.

    ``PYTHONUNBUFFERED=1`` makes fairseq's log lines reach the pipe (and so the
    stage log and the console) as they are written, not in 8 KB blocks.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(proc, grace=10.0):
    """End a child process: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def exit_on_termination():
    """SIGTERM and SIGHUP end the harness as Ctrl-C does: through its clean-up.

    Python's default for them is to die at once, which would leave the running
    command (a training, say) orphaned and still writing into the stage's
    ``.partial`` outputs, where a rerun then trains beside it.
    """

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def run_command(argv, log_file=None, show=(), progress=None, out=None):
    """Run a command; its output goes to ``log_file`` line by line, flushed.

    Args:
        argv: the command line; a first item naming a console script is
            resolved next to the running Python.
        log_file: where to keep the whole output (optional).
        show: substrings of the lines to echo as they come.
        progress: a :class:`Progress` fed every line; its lines are printed.
        out: where echoed and progress lines go (default stdout).

    Returns:
        The command's whole output (stdout and stderr together).

    Raises:
        CommandError: the command failed (its last lines are in the message).
    """
    out = out or sys.stdout
    argv = [bin_path(str(argv[0]))] + [str(a) for a in argv[1:]]
    logger.info("$ %s", " ".join(argv))
    lines = []
    log = open(log_file, "w", encoding="utf-8") if log_file else None
    try:
        proc = subprocess.Popen(
            argv,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        try:
            for line in proc.stdout:  # universal newlines: tqdm's \r ends a line
                lines.append(line)
                if log:
                    log.write(line)
                    log.flush()
                if any(s in line for s in show):
                    print("    " + line.rstrip()[-150:], file=out, flush=True)
                if progress is not None:
                    msg = progress.feed(line)
                    if msg:
                        print(msg, file=out, flush=True)
            proc.wait()
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM): the command must not go on
            # writing into the stage's outputs after the harness is gone
            stop_process(proc)
            raise
    finally:
        if log:
            log.close()
    if progress is not None and proc.returncode == 0:
        msg = progress.finish()
        if msg:
            print(msg, file=out, flush=True)
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, log_file, lines[-TAIL_LINES:])
    return "".join(lines)
