"""The stage runner: stamps, atomic outputs, resumable stages, --from/--only, dry runs.

A recipe is a list of :class:`Stage`. Each stage names the files or folders
it reads (``inputs``), the ones it writes (``outputs``) and the settings that
change what it writes (``params``); its work is a list of steps, each a
:class:`Command` (an external program) or a :class:`PyStep` (a Python
function). A stage writes every output ``X`` as ``X.partial`` first and renames
it into place only when all its steps succeeded, then records a stamp
(``STAMPS/<stage>.json``) with its parameters and the sizes, modification
times and sha256 of its inputs and outputs. A later run skips the stage when
the stamp matches: same parameters, same input and output contents (sha256 is
recomputed only for files whose size or modification time moved), so editing
an input, or changing a setting, reruns exactly the stages that depend on it.
"""

import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from kd_bench.files import sha256_file, write_json
from kd_bench.process import CommandError, Progress, format_seconds, run_command

STAMP_VERSION = 1
PARTIAL = ".partial"


@dataclass
class Command:
    """An external program run as one step of a stage.

    Args:
        argv: the command line; the first item is a console script or program.
        on_output: called as ``on_output(output, seconds)`` after a successful
            run, with the command's whole output (stdout and stderr) and its
            wall time; use it to parse results into the stage's outputs.
        show: substrings of output lines to echo while the command runs.
        describe: a comment printed before the command in dry runs.
        progress: ``progress()`` makes the :class:`~kd_bench.process.Progress`
            that turns the command's output into progress lines (None: none).
    """

    argv: List[str]
    on_output: Optional[Callable[[str, float], Any]] = None
    show: Sequence[str] = ()
    describe: str = ""
    progress: Optional[Callable[[], Progress]] = None


@dataclass
class PyStep:
    """A Python function run as one step of a stage.

    Args:
        describe: what it does, printed in dry runs (one line).
        fn: called without arguments.
    """

    describe: str
    fn: Callable[[], Any]


Step = Union[Command, PyStep]


@dataclass
class Stage:
    """One stage of a pipeline.

    Args:
        name: unique name (``--from``/``--only`` take it).
        outputs: paths (files or folders) the stage writes; each is produced
            as ``path + ".partial"`` and renamed into place on success.
        steps: ``steps(tmp)`` returns the stage's steps; ``tmp(path)`` gives
            the temporary path under which an output must be written.
        inputs: paths the stage reads (files or folders, or files inside an
            earlier stage's output folder).
        params: JSON-serialisable settings that change the outputs.
        group: a name shared by related stages (``--from students``).
        resumable: keep the ``.partial`` outputs of an interrupted run and
            reuse them when the stage is rerun with the same inputs and
            parameters (training resumes from its last checkpoint).
    """

    name: str
    outputs: List[str]
    steps: Callable[[Callable[[str], str]], List[Step]]
    inputs: List[str] = field(default_factory=list)
    params: Dict[str, Any] = field(default_factory=dict)
    group: str = ""
    resumable: bool = False


def tmp_path(path):
    """The temporary path under which ``path`` is written."""
    return path + PARTIAL


def _file_signature(path, previous=None):
    st = os.stat(path)
    sig = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if (
        previous
        and previous.get("size") == sig["size"]
        and previous.get("mtime_ns") == sig["mtime_ns"]
        and "sha256" in previous
    ):
        sig["sha256"] = previous["sha256"]  # unchanged on disk: no rehash
    else:
        sig["sha256"] = sha256_file(path)
    return sig


def signature(path, previous=None):
    """Size, modification time and sha256 of a file, or of every file in a folder.

    Args:
        path: a file or a folder.
        previous: the signature recorded earlier for the same path; files whose
            size and modification time did not move keep their recorded sha256
            instead of being hashed again.

    Returns:
        ``{"size", "mtime_ns", "sha256"}`` for a file, ``{"files": {relative
        path: file signature}}`` for a folder, ``None`` when ``path`` is missing.
    """
    if os.path.isfile(path):
        return _file_signature(path, previous if previous else None)
    if not os.path.isdir(path):
        return None
    old = (previous or {}).get("files", {})
    files = {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            files[rel] = _file_signature(full, old.get(rel))
    return {"files": files}


def same_content(a, b):
    """Whether two signatures describe the same bytes (sha256 only)."""
    if a is None or b is None:
        return False
    if "files" in a or "files" in b:
        fa, fb = a.get("files"), b.get("files")
        if fa is None or fb is None or set(fa) != set(fb):
            return False
        return all(fa[k]["sha256"] == fb[k]["sha256"] for k in fa)
    return a.get("sha256") == b.get("sha256")


def _normalise(obj):
    """``obj`` as JSON would give it back (tuples become lists, etc.)."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class StageRunner:
    """Runs stages in order, skipping those whose stamp is current.

    Args:
        stages: the stages, in the order they run.
        stamp_dir: folder of the per-stage JSON stamps.
        log_dir: folder of the commands' full output (one file per command).
        dry_run: print what would run (every command) without running it.
        out: where progress is printed.
        aliases: ``{"$WORK": "/abs/work"}``: printed commands show the
            variable instead of the path (the commands run are unchanged).
    """

    def __init__(
        self, stages, stamp_dir, log_dir=None, dry_run=False, out=None, aliases=None
    ):
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate stage names: {', '.join(duplicates)}")
        self.stages = list(stages)
        self.stamp_dir = stamp_dir
        self.log_dir = log_dir or os.path.join(stamp_dir, "logs")
        self.dry_run = dry_run
        self.out = out or sys.stdout
        # longest paths first, so that nested aliases win
        self.aliases = sorted(
            (aliases or {}).items(), key=lambda kv: len(kv[1]), reverse=True
        )

    # -- selection --------------------------------------------------------

    def _matches(self, stage, pattern):
        return (
            stage.name == pattern
            or stage.group == pattern
            or (
                any(c in pattern for c in "*?[")
                and fnmatch.fnmatch(stage.name, pattern)
            )
        )

    def select(self, start=None, only=None):
        """Which stages to consider and which to force.

        Args:
            start: ``--from``: a stage or group name; it and every later stage
                run even when up to date, earlier stages are not run.
            only: ``--only``: stage names, group names or shell patterns
                (``student:*``), comma-separated or a list; exactly these run,
                even when up to date.

        Returns:
            A list of ``(stage, forced)`` in pipeline order.
        """
        if start and only:
            raise ValueError("--from and --only cannot be used together")
        if only:
            patterns = only.split(",") if isinstance(only, str) else list(only)
            chosen = []
            for pattern in patterns:
                hits = [s for s in self.stages if self._matches(s, pattern.strip())]
                if not hits:
                    raise ValueError(
                        f"--only {pattern}: no such stage; stages: "
                        + ", ".join(s.name for s in self.stages)
                    )
                chosen.extend(hits)
            return [(s, True) for s in self.stages if s in chosen]
        if start:
            hits = [i for i, s in enumerate(self.stages) if self._matches(s, start)]
            if not hits:
                raise ValueError(
                    f"--from {start}: no such stage; stages: "
                    + ", ".join(s.name for s in self.stages)
                )
            return [(s, True) for s in self.stages[hits[0] :]]
        return [(s, False) for s in self.stages]

    # -- stamps -------------------------------------------------------------

    def stamp_path(self, stage):
        """Where a stage's stamp lives."""
        safe = stage.name.replace(os.sep, "_").replace(":", "__")
        return os.path.join(self.stamp_dir, safe + ".json")

    def read_stamp(self, stage):
        """The stage's recorded stamp, or None."""
        try:
            with open(self.stamp_path(stage)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _key(self, stage, input_sigs):
        """A digest of what determines a stage's outputs."""
        blob = json.dumps(
            {
                "params": _normalise(stage.params),
                "inputs": {
                    p: (
                        {k: v["sha256"] for k, v in s["files"].items()}
                        if s and "files" in s
                        else (s or {}).get("sha256")
                    )
                    for p, s in input_sigs.items()
                },
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def why_stale(self, stage):
        """Why a stage must run (a short reason), or None when it is current."""
        stamp = self.read_stamp(stage)
        if stamp is None:
            return "never run"
        if stamp.get("version") != STAMP_VERSION:
            return "stamp from another version"
        if stamp.get("params") != _normalise(stage.params):
            old, new = stamp.get("params") or {}, _normalise(stage.params)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return "settings changed: " + ", ".join(changed)
        if sorted(stamp.get("inputs", {})) != sorted(stage.inputs):
            return "different inputs"
        for path in stage.inputs:
            recorded = stamp["inputs"][path]
            if not same_content(signature(path, recorded), recorded):
                return f"input changed: {path}"
        for path in stage.outputs:
            recorded = stamp.get("outputs", {}).get(path)
            if not os.path.exists(path):
                return f"output missing: {path}"
            if not same_content(signature(path, recorded), recorded):
                return f"output changed: {path}"
        return None

    def _write_stamp(self, stage, input_sigs, seconds):
        os.makedirs(self.stamp_dir, exist_ok=True)
        stamp = {
            "version": STAMP_VERSION,
            "stage": stage.name,
            "params": _normalise(stage.params),
            "inputs": input_sigs,
            "outputs": {p: signature(p) for p in stage.outputs},
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json(self.stamp_path(stage), stamp)

    # -- running --------------------------------------------------------

    def _print(self, text):
        for name, path in self.aliases:
            text = text.replace(path, name)
        print(text, file=self.out, flush=True)

    @staticmethod
    def format_command(argv):
        """A command line as a shell would read it."""
        return shlex.join(str(a) for a in argv)

    def _producer(self, path):
        """The stage whose output contains ``path``, or None."""
        for stage in self.stages:
            for out in stage.outputs:
                if path == out or path.startswith(out.rstrip(os.sep) + os.sep):
                    return stage
        return None

    def run(self, start=None, only=None):
        """Run the pipeline; returns ``{stage name: "ran" | "skipped"}``.

        Args:
            start: ``--from`` (see :meth:`select`).
            only: ``--only`` (see :meth:`select`).
        """
        selected = self.select(start, only)
        chosen = {s.name for s, _ in selected}
        total, status, t0 = len(self.stages), {}, time.time()
        if not self.dry_run:
            # stages left out by --from/--only must already have their outputs
            for stage, _ in selected:
                for path in stage.inputs:
                    producer = self._producer(path)
                    if (
                        not os.path.exists(path)
                        and producer is not None
                        and producer.name not in chosen
                    ):
                        raise RuntimeError(
                            f"stage {stage.name} needs {path}, written by stage "
                            f"{producer.name}, which has not run: run it first "
                            "(or run without --from/--only)"
                        )
        for stage, forced in selected:
            index = self.stages.index(stage) + 1
            head = f"[{index}/{total}] {stage.name}"
            reason = "forced (--from/--only)" if forced else self.why_stale(stage)
            if reason is None:
                self._print(f"{head}: up to date, skipped")
                status[stage.name] = "skipped"
                continue
            if self.dry_run:
                self._print(f"{head}: would run ({reason})")
                self._print_steps(stage)
                status[stage.name] = "would run"
                continue
            self._print(f"{head}: running ({reason})")
            start_time = time.time()
            self._run_stage(stage)
            seconds = time.time() - start_time
            status[stage.name] = "ran"
            self._print(
                f"{head}: done in {format_seconds(seconds)} "
                f"(total {format_seconds(time.time() - t0)})"
            )
        return status

    def _print_steps(self, stage):
        for step in stage.steps(tmp_path):
            if isinstance(step, Command):
                if step.describe:
                    self._print(f"    # {step.describe}")
                self._print("    " + self.format_command(step.argv))
            else:
                self._print(f"    # python: {step.describe}")
        for out in stage.outputs:
            self._print(f"    # then: {tmp_path(out)} -> {out}")

    def _run_stage(self, stage):
        for path in stage.inputs:
            if not os.path.exists(path):
                raise FileNotFoundError(f"stage {stage.name}: input {path} is missing")
        input_sigs = {p: signature(p) for p in stage.inputs}
        key = self._key(stage, input_sigs)
        key_file = os.path.join(self.stamp_dir, "partial", stage.name + ".key")
        key_file = key_file.replace(":", "__")
        keep = False
        if stage.resumable and os.path.exists(key_file):
            with open(key_file) as f:
                keep = f.read().strip() == key
        for out in stage.outputs:
            if not keep:
                _remove(tmp_path(out))
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if stage.resumable:
            os.makedirs(os.path.dirname(key_file), exist_ok=True)
            with open(key_file, "w") as f:
                f.write(key + "\n")
        os.makedirs(self.log_dir, exist_ok=True)
        start = time.time()
        try:
            for i, step in enumerate(stage.steps(tmp_path)):
                if isinstance(step, Command):
                    log = os.path.join(
                        self.log_dir, f"{stage.name.replace(':', '__')}.{i}.log"
                    )
                    self._print("    $ " + self.format_command(step.argv))
                    t = time.time()
                    output = run_command(
                        step.argv,
                        log_file=log,
                        show=step.show,
                        progress=step.progress() if step.progress else None,
                        out=self.out,
                    )
                    if step.on_output is not None:
                        step.on_output(output, time.time() - t)
                else:
                    self._print(f"    python: {step.describe}")
                    step.fn()
            for out in stage.outputs:
                if not os.path.exists(tmp_path(out)):
                    raise RuntimeError(
                        f"stage {stage.name} did not write {tmp_path(out)}"
                    )
        except BaseException as e:
            if isinstance(e, CommandError):
                self._print(
                    f"    stage {stage.name} failed: exit code {e.returncode}; "
                    f"last {len(e.tail)} lines of {e.log_file}:"
                )
                for line in e.tail:
                    self._print("    | " + line.rstrip("\n"))
            # nothing half-written is left under a final name; a resumable
            # stage keeps its .partial outputs for the next run
            if not stage.resumable:
                for out in stage.outputs:
                    _remove(tmp_path(out))
            raise
        # the old outputs go first, so a stamp never describes a mix
        stamp = self.stamp_path(stage)
        if os.path.exists(stamp):
            os.remove(stamp)
        for out in stage.outputs:
            _remove(out)
            os.replace(tmp_path(out), out)
        if stage.resumable and os.path.exists(key_file):
            os.remove(key_file)
        self._write_stamp(stage, input_sigs, time.time() - start)
