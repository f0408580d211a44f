"""The output folder of a run: its name, its lock, and whether this run may use it.

A run's folder holds its results (config.json, metrics.jsonl, last.pt, best.pt). Two rules keep them safe:

* One run at a time. The main process holds `run.lock` in the folder for the run's whole life; a second
  run into the same folder stops at once and names the first.
* Nothing starts over an earlier run. A folder that holds a run is used only to continue it
  (`--resume auto`, or a torchrun restart of the same job); continuing needs its last.pt.

The lock is a file made by hard-linking a complete record to the lock's name: link() fails if the name
exists, atomically, on local file systems and on the shared ones clusters use (NFS, Lustre, GPFS,
BeeGFS), so it works between nodes, and the lock is never seen half-written. It holds the holder's host,
pid and start time as JSON. flock/fcntl locks are not used: on NFS they depend on the lock daemon, on
Lustre and BeeGFS they are node-local or fail unless the file system is mounted with the `flock` option,
and a lock alone cannot say who holds it.

A lock whose holder is gone is stale and taken over, with a message:
* same host: the pid is not alive, or it was reused by another process (its start time in
  /proc/<pid>/stat differs from the recorded one) - this is the case after kill -9;
* another host: its pid cannot be checked, so the holder refreshes the lock file's modification time
  every HEARTBEAT_SECONDS from a daemon thread, and a lock not refreshed for STALE_SECONDS is stale.
  The age is measured against the modification time of a file this process has just written in the same
  folder, so both times come from the file server's clock and clock skew between nodes does not matter;
* an earlier attempt of the same job (the same Slurm job, or the same torchrun rendezvous with a lower
  restart count): Slurm and torchrun end an attempt before they start the next, so the next takes over
  at once, on whichever node it lands.

`OutputFileLock` is the same lock on one file a command writes (dtrain predict's CSV): FILE.lock beside
it, held from the command's start until FILE is written, so that a second writer of FILE stops at once,
naming the first, instead of one silently replacing the other.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from dtrain.errors import TrainingDiverged, UserError
from dtrain.files import make_folder, temp_file_beside, write_error, write_text

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 4 * HEARTBEAT_SECONDS
RESULTS = ("config.json", "metrics.jsonl", "last.pt", "best.pt")
JOB_NAME = "run.job"  # which job (Slurm job, torchrun rendezvous) claimed the folder, and how it failed, if it did


def default_output_dir(arch: str, name: str | None = None, env=os.environ) -> Path:
    """runs/<job>-<id>[_<task>] under Slurm (the same folder for every requeue of a job); else runs/<name>
    when given (a sweep's combination); else, under torchrun, runs/<arch>-<run id> (the same folder on every
    process and every restart of the job); else runs/<arch>-<time>."""
    job, job_id = env.get("SLURM_JOB_NAME"), env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if job and job_id:
        task = env.get("SLURM_ARRAY_TASK_ID")
        return Path("runs") / (f"{job}-{job_id}" + (f"_{task}" if task else ""))
    if name:
        return Path("runs") / name
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    stamp = run_id[:8] if run_id and run_id != "none" else time.strftime('%Y%m%d-%H%M%S')
    return Path("runs") / f"{arch.replace(':', '-')}-{stamp}"


def _count(env, name: str) -> int:
    try:
        return int(env.get(name) or 0)
    except ValueError:
        return 0


def restart_count(env=os.environ) -> int:
    """How many times torchrun has restarted this job's workers (0 outside torchrun)."""
    return _count(env, "TORCHELASTIC_RESTART_COUNT")


def resume_for(out: Path, resume: str | None, restarts: int = 0) -> str | None:
    """The --resume this run uses in `out`, or a UserError if starting would destroy an earlier run's results.

    `--resume auto` and a torchrun restart of the same job (restarts > 0) continue the run in `out` from its
    last.pt; without one they start afresh only where no results (best.pt, metrics.jsonl) would be replaced.
    """
    out = Path(out)
    found = [name for name in RESULTS if (out / name).exists()]
    if not found:
        return "auto" if resume is None and restarts > 0 else resume
    held = ", ".join(found)
    if resume == "auto" or restarts > 0:
        if "last.pt" in found:
            return "auto"  # a restarted job continues from its own progress, not from the checkpoint it began with
        results = [name for name in found if name in ("best.pt", "metrics.jsonl")]
        if results:
            raise UserError(f"{out} holds results of an earlier run ({', '.join(results)}) but no last.pt to "
                            f"continue it from, and a fresh start would replace them: pass another --output-dir "
                            f"(or move those files away)")
        return resume or "auto"  # only a config.json: a run that stopped before its first checkpoint starts again
    if resume is None:
        raise UserError(f"{out} holds an earlier run ({held}): continue it with --resume auto, or pass another "
                        f"--output-dir for a new run")
    if Path(resume).resolve() == (out / "last.pt").resolve():
        return resume
    raise UserError(f"{out} holds an earlier run ({held}): --resume {resume} would start over it from another "
                    f"point and replace its results; pass another --output-dir, or --resume auto to continue the "
                    f"run in {out}")


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """A process's state letter and start time in clock ticks since boot (/proc/<pid>/stat fields 3 and 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def _proc_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


def _job(env) -> str | None:
    """This job's identity across its attempts: the Slurm job (and array task) and the torchrun rendezvous."""
    slurm = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if slurm and env.get("SLURM_ARRAY_TASK_ID"):
        slurm += "_" + env["SLURM_ARRAY_TASK_ID"]
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv in ("", "none"):  # torchrun's default id is shared by unrelated jobs
        rdzv = None
    return "/".join(p or "" for p in (slurm, rdzv)) if slurm or rdzv else None


def _attempt(env) -> list[int]:
    return [_count(env, "SLURM_RESTART_COUNT"), _count(env, "TORCHELASTIC_RESTART_COUNT")]


class RunLock:
    """The lock on a run's output folder, held by the run's main process.

        with RunLock(out):          # or lock = RunLock(out).acquire() ... lock.release()
            train()

    acquire() creates the folder, takes the lock (taking over a stale one, with a message on `say`)
    or raises a UserError naming the run that holds it.
    """
    holder = "run"                        # what holds such a lock, as the messages name it
    busy = "is in use by"                 # "<guarded> <busy> the <holder> started ... on <host> (pid N)"
    remedy = "use another --output-dir"   # what a refused user can do instead

    def __init__(self, out, env=os.environ, say=None):
        self.out = Path(out)              # the folder that holds the lock file
        self.path = self.out / LOCK_NAME
        self.guarded = self.out           # what the lock keeps to one writer
        self.env = env
        self.say = say or (lambda message: print(message, flush=True))
        self.token = uuid.uuid4().hex
        self.owner_pid = None  # the process that holds the lock
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": _job(self.env),
                "attempt": _attempt(self.env), "token": self.token}

    def acquire(self) -> "RunLock":
        make_folder(self.out, self.remedy)
        for _ in range(5):
            if self._create():
                break
            holder, age, seen = self._read()
            why = self._stale(holder, age)
            if why is None:
                raise UserError(self._in_use(holder))
            self._take_over(seen, holder, why)
        else:
            raise UserError(f"{self.path} keeps changing hands: another {self.holder} is starting in {self.out}; "
                            f"{self.remedy}")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Take the lock if nobody holds it. This run's record is written whole to a file of its own, then
        linked to the lock's name, which fails if the name exists: a kill at any moment leaves no lock or a
        whole one, never an empty one that would refuse the next run. A write that fails (a full disk)
        leaves nothing behind."""
        linked, new = False, None
        try:  # a temp file as atomic_write's: one a kill -9 leaves, the next run removes
            fd, new = temp_file_beside(self.path, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(new, self.path)
            except (FileExistsError, FileNotFoundError):  # held, or the holder cleared our file away
                return False
            except OSError:
                if os.stat(new).st_nlink != 2:  # NFS can report a link it made as failed (a lost reply)
                    raise
            linked = True
            self.owner_pid = os.getpid()
            atexit.register(self.release)
            return True
        except BaseException as e:  # a full disk, or a stop signal during start-up: no lock stays
            if linked:
                self.path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise write_error(self.path, e, self.remedy) from None
            raise
        finally:
            if new:
                Path(new).unlink(missing_ok=True)

    def _read(self):
        """The holder's record (None if unreadable), the lock's age in seconds on the file server's clock and
        its bytes (None: no lock)."""
        probe = self.out / f".{self.path.name}.{self.token}"
        try:
            probe.write_bytes(b"")
            now = probe.stat().st_mtime
        except OSError:
            now = time.time()
        finally:
            probe.unlink(missing_ok=True)
        try:
            with open(self.path, "rb") as f:  # opening revalidates the attributes NFS caches
                age = now - os.fstat(f.fileno()).st_mtime
                seen = f.read()
        except FileNotFoundError:
            return None, None, None
        except OSError as e:
            raise UserError(f"cannot read the lock file {self.path}: {e.strerror}; {self.remedy}")
        try:
            holder = json.loads(seen)
        except ValueError:
            holder = None
        return (holder if isinstance(holder, dict) else None), age, seen

    def _stale(self, holder, age) -> str | None:
        """Why the lock's holder is gone, or None if it may still be running."""
        if age is None:
            return "it was released"
        if holder is None:  # not a record dtrain wrote (it writes the lock whole): judged by its age alone
            return f"it is unreadable and {age:.0f} s old" if age > STALE_SECONDS else None
        attempt = holder.get("attempt")
        if holder.get("job") and holder.get("job") == _job(self.env) and isinstance(attempt, list) \
                and _attempt(self.env) > attempt:
            return "it was left by an earlier attempt of this job"
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _alive(pid):
                return f"its process {pid} is gone"
            start = _proc_start(pid)
            if start is not None and holder.get("proc_start") not in (None, start):
                return f"its process {pid} is gone (the pid now belongs to another process)"
            return None
        if age > STALE_SECONDS:
            return f"it was last refreshed {age:.0f} s ago (a live run refreshes it every {HEARTBEAT_SECONDS:.0f} s)"
        return None

    def _take_over(self, seen: bytes, holder, why: str) -> None:
        """Move the stale lock aside, compare-and-swap: only if what was moved is what was judged stale (the
        same bytes); a lock another run created in between, readable or not yet, is put back."""
        aside = self.out / f".{self.path.name}.stale.{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_bytes()
        except OSError:
            moved = None
        if moved != seen:
            try:  # another run took the lock in between: give it back
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = _describe(holder, self.holder) if holder else f"an unknown {self.holder}"
        self.say(f"taking over the stale lock {self.path} of {who}: {why}")

    def _in_use(self, holder) -> str:
        who = _describe(holder, self.holder) if holder else f"a {self.holder} that is starting now"
        return f"{self.guarded} {self.busy} {who}: wait for it, or {self.remedy}"

    def _owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if not self._owned():
                self.say(f"warning: {self.path} was taken over by another {self.holder}; {self._taken_over_risk()}")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _taken_over_risk(self) -> str:
        return f"results in {self.out} may be mixed"

    def release(self) -> None:
        """Remove the lock if this run holds it (safe to call more than once; a forked child never does)."""
        if self.owner_pid != os.getpid():
            return
        self.owner_pid = None
        self._stop.set()
        atexit.unregister(self.release)
        if self._owned():
            self.path.unlink(missing_ok=True)


class OutputFileLock(RunLock):
    """The lock on one output file (see the module): FILE.lock beside FILE, held by the process that writes
    FILE, by `command` (as the messages name it); a refused user is told `remedy`.

        with OutputFileLock("submission.csv", "dtrain predict", "pass another --output"):
            compute(); write("submission.csv")
    """
    busy = "is being written by"

    def __init__(self, file, command: str, remedy: str, env=os.environ, say=None):
        file = Path(file)
        super().__init__(file.parent, env, say)
        self.path = file.parent / f"{file.name}.lock"
        self.guarded = file
        self.holder, self.remedy = command, remedy

    def _taken_over_risk(self) -> str:
        return f"{self.guarded} may be written by both"


def _describe(holder: dict, what: str = "run") -> str:
    return f"the {what} started {holder.get('started')} on {holder.get('host')} (pid {holder.get('pid')})"


def open_output_dir(out, resume: str | None, env=os.environ, say=None) -> tuple[RunLock, str | None]:
    """Lock `out` for this run and check that it may start there: the held lock (released at exit at the
    latest) and the --resume to use. Call on the main process only, before anything is written to `out`.

    A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) continues the run in `out` only when this same job
    claimed the folder (run.job says so): a restart of a job that was refused, or that meets another run's
    folder, is judged like a first start. A restart of a job whose previous attempt ended with an error a
    restart cannot fix (a UserError, a divergence) ends at once with that error."""
    lock = RunLock(out, env, say).acquire()
    try:
        job, record = _job(env), _read_job(Path(out))
        same_job = job is not None and record.get("job") == job
        restarts = restart_count(env) if same_job else 0
        if restarts and record.get("failure"):
            kind, message = record["failure"].get("kind"), record["failure"].get("message")
            message = f"{message} (the same error ended this job's previous attempt: a restart cannot fix it)"
            raise TrainingDiverged(message) if kind == "diverged" else UserError(message)
        resume = resume_for(Path(out), resume, restarts)
        if job is not None:
            _write_job(Path(out), {"job": job, "failure": None})
        return lock, resume
    except BaseException:
        lock.release()
        raise


def remember_failure(out, error: BaseException, env=os.environ) -> None:
    """Main process: note in run.job that this job ended with `error` (a UserError or a divergence), so
    torchrun's restarts of the job stop at once instead of loading the data and failing again."""
    job = _job(env)
    if job is not None:
        kind = "diverged" if isinstance(error, TrainingDiverged) else "user"
        _write_job(Path(out), {"job": job, "failure": {"kind": kind, "message": str(error)}})


def _read_job(out: Path) -> dict:
    try:
        record = json.loads((out / JOB_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_job(out: Path, record: dict) -> None:
    try:
        write_text(out / JOB_NAME, json.dumps(record))
    except UserError:
        pass  # only a help to restarts: a folder that cannot take it fails at its next write anyway
