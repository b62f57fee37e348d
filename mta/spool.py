"""The spool on disk: the only thing the listeners, the queue runner and
the CLI share.

Layout under the spool folder:

- ``tmp/``: files being written; never read by anyone else.
- ``queue/ID.msg``: the queue file, one per message, as Postfix has: the
  message bytes as they will go out (with our Received header), a line
  feed, then the envelope it was committed with, as one line of JSON.  Written once and
  never changed; its presence is what makes a message exist.  Its
  modification time is the moment the message is next due
  (`mta.envelope.due_time`), so that due mail is found with one stat a
  message; a new one is due at once.
- ``queue/ID.env``: the envelope as JSON, once it has changed (a
  delivery attempt that left recipients to do, a hold, a notice): it then
  says what the end of ``ID.msg`` said before.  Most messages are
  delivered at their first attempt and never have one.
- ``corrupt/``: spool files that could not be read, moved aside.

A spool of the first layout (``ID.env`` beside every ``ID.msg``, which held
the message alone) reads the same: the envelope file is what counts when
there is one, and the message is the first ``size`` octets either way.

Durability (SPEC.md section 6): each file is written under a temporary name,
fsync'd, renamed into place, and the folder fsync'd, before anyone is told
the message is queued: one file and one fsync a message, and one fsync of
the folder for every commit waiting together.  An envelope update is a
whole new file renamed over the old one, so a reader never sees half an
envelope, and a crash leaves either the old or the new one.

Locking: a process that acts on a message (delivering it, or the CLI
changing it) holds an exclusive `flock` on ``ID.msg``.  That file is never
replaced, so the lock is stable across envelope rewrites.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mta.envelope import (
    Envelope,
    checked_json,
    due_time,
    from_checked,
    is_queue_id,
    to_json,
)


class SpoolError(Exception):
    """A spool file that cannot be used; ``queue_id`` names the message."""

    def __init__(self, message: str, queue_id: str = "") -> None:
        super().__init__(message)
        self.queue_id = queue_id or message.split(":", 1)[0]


class Locked(SpoolError):
    """Another process holds the message (it is being delivered)."""


class Unreadable(SpoolError):
    """A file this process cannot read now (permissions): not damaged."""


def new_queue_id() -> str:
    """Sortable by arrival, unique across processes: microseconds then
    random bits, in upper-case hex like Postfix's short ids."""
    return f"{time.time_ns() // 1000:013X}{secrets.token_hex(2).upper()}"


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class FolderSync:
    """Group commit for a folder: every thread that renamed a file into it
    and calls `sync` returns once an fsync of the folder that began after
    its call has finished.  One fsync then serves every commit that was
    waiting for it, instead of one each."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._changed = threading.Condition()
        self._asked = 0  # tickets handed out
        self._synced = 0  # every ticket up to this one is durable
        self._syncing = False

    def sync(self) -> None:
        with self._changed:
            self._asked += 1
            ticket = self._asked
            while self._synced < ticket:
                if self._syncing:
                    self._changed.wait()
                    continue
                # Lead a round: it covers every ticket asked so far, since
                # each was asked after its rename.
                covered = self._asked
                self._syncing = True
                self._changed.release()
                try:
                    _fsync_folder(self._path)
                finally:
                    self._changed.acquire()
                    self._syncing = False
                    self._changed.notify_all()
                # Reached only when the fsync worked; after an error the
                # others lead a round of their own.
                self._synced = max(self._synced, covered)


def _create(path: Path | str) -> int:
    """A new file only this user can read (mail is private), as a plain
    descriptor: no file object, whose buffering and checks cost system
    calls per message."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _write_all(descriptor: int, data: bytes | bytearray) -> None:
    written = os.write(descriptor, data)
    while written < len(data):  # rare: a short write
        written += os.write(descriptor, data[written:])


def _write_durably(path: Path | str, data: bytes) -> None:
    """A new file holding ``data``, fsync'd; on any failure (a full disk)
    nothing is left behind, so a retry does not eat more space."""
    try:
        descriptor = _create(path)
        try:
            _write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        _unlink_quietly(path)
        raise


def _read_regular(path: str, folder: int | None = None) -> bytes:
    """The bytes of a regular file.  Anything else in the spool (a FIFO,
    a device, a symbolic link) is `SpoolError`: opening a FIFO would block
    the reactor, and a link may point anywhere.  A folder is
    `IsADirectoryError`, as reading it always was.

    ``path`` is relative to the open ``folder`` when it is given.  Plain
    descriptors, no file object: `mta queue list` reads every envelope of
    the spool this way."""
    descriptor, status = _open_regular(path, folder)
    try:
        # One read for the size fstat gave, one byte more to see the end;
        # only a file that changed meanwhile needs more.
        size = status.st_size
        data = os.read(descriptor, size + 1)
        if len(data) == size:
            return data
        chunks = [data]
        while data:
            data = os.read(descriptor, max(size, 65536))
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(descriptor)


# An envelope at the end of a queue file is read from this many octets
# before the end, more when it is longer (a thousand recipients); past
# `MAX_ENVELOPE` the file is no queue file.
TAIL_READ = 8192
MAX_ENVELOPE = 16 * 1024 * 1024


def _open_regular(path: str, folder: int | None) -> tuple[int, os.stat_result]:
    """A regular file opened for reading, and its status; `SpoolError` for
    anything else, `IsADirectoryError` for a folder (see `_read_regular`)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW,
                             dir_fd=folder)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENXIO):
            raise SpoolError(f"{os.path.basename(path)} is not a regular "
                             "file") from None
        raise
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        raise SpoolError(f"{os.path.basename(path)} is not a regular file")
    return descriptor, status


def _read_trailer(path: str, folder: int | None) -> tuple[bytes, int]:
    """The last line of a queue file (the envelope it was committed with)
    and where the message ends: at the line feed before it, which the
    commit writes whatever the message's last octet."""
    descriptor, status = _open_regular(path, folder)
    try:
        size = status.st_size
        reach = TAIL_READ
        while True:
            start = max(0, size - reach)
            tail = os.pread(descriptor, size - start, start)
            if not tail.endswith(b"\n"):
                raise SpoolError("no envelope at the end of the message file")
            # The envelope has no line break: the one before it is ours.
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                return tail[cut + 1:], start + cut
            if start == 0 or reach >= MAX_ENVELOPE:
                raise SpoolError("no envelope at the end of the message file")
            reach *= 8
    finally:
        os.close(descriptor)


def _read_envelope(
    name: str, folder: int | None, envelope_file: bool
) -> tuple[dict[str, Any], bool]:
    """`Spool._load_with_origin` for the message whose files are ``name``
    and an extension, without its checks of the name."""
    if envelope_file:
        try:
            return checked_json(_read_regular(f"{name}.env", folder)), False
        except FileNotFoundError:
            pass  # unchanged since its commit: the queue file's is the word
    data, end = _read_trailer(f"{name}.msg", folder)
    raw = checked_json(data)
    # What the envelope says the message is must be what comes before it,
    # octet for octet.
    if raw["size"] != end:
        raise SpoolError(f"message file has {end} bytes before its "
                         f"envelope, which says {raw['size']}")
    return raw, True


def _unlink_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        self.corrupt = self.root / "corrupt"
        self.queue_sync = FolderSync(self.queue)
        # The queue folder as a string ending in "/": the names of its
        # files without a Path each (a listing reads them all).
        self._queue_prefix = os.path.join(self.queue, "")
        self._tmp_prefix = os.path.join(self.tmp, "")

    def create(self) -> None:
        for folder in (self.root, self.tmp, self.queue, self.corrupt):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """Raise `OSError` unless this process can write and read the spool
        (the folders may belong to another user)."""
        probe = self.tmp / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        os.listdir(self.queue)

    # --- writing a new message -----------------------------------------

    def new_message(self) -> MessageWriter:
        queue_id = new_queue_id()
        path = f"{self._tmp_prefix}{queue_id}.msg"
        return MessageWriter(self, queue_id, path, _create(path))

    # --- reading and updating ------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.msg"

    def envelope_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.env"

    def queue_ids(self) -> list[str]:
        """Every committed message, oldest first."""
        try:
            names = os.listdir(self.queue)
        except FileNotFoundError:
            return []
        return sorted(name[:-4] for name in names if name.endswith(".msg"))

    def load(self, queue_id: str) -> Envelope:
        """The envelope; `FileNotFoundError` when the message is gone,
        `SpoolError` when the file cannot be an envelope (quarantine it),
        another `OSError` when it cannot be read now (permissions, no file
        descriptor left: try again later)."""
        return from_checked(self.load_checked(queue_id))

    def load_checked(self, queue_id: str) -> dict[str, Any]:
        """As `load`, with the same checks and errors, but the envelope's
        checked JSON form (`mta.envelope.checked_json`) rather than an
        `Envelope`."""
        return self._load_checked(queue_id, None)

    def _load_checked(self, queue_id: str, folder: int | None) -> dict[str, Any]:
        return self._load_with_origin(queue_id, folder)[0]

    def _load_with_origin(
        self, queue_id: str, folder: int | None, envelope_file: bool = True
    ) -> tuple[dict[str, Any], bool]:
        """The checked envelope, and whether it came from the queue file
        itself (then the message file is whole by construction).  The
        envelope file wins when there is one: it is the later word.  With
        ``envelope_file`` false none is looked for (the caller's listing
        showed none): the queue file's envelope is the word."""
        # folder: the queue folder, open (names relative to it), or None.
        if not is_queue_id(queue_id):
            raise SpoolError(f"{queue_id!r}: not a queue id", queue_id)
        prefix = "" if folder is not None else self._queue_prefix
        try:
            raw, trailer = _read_envelope(f"{prefix}{queue_id}", folder,
                                          envelope_file)
        except (SpoolError, ValueError) as error:
            raise SpoolError(f"{queue_id}: {error}", queue_id) from None
        # The name decides which files are the message's: an envelope that
        # names another message would act on that one's files.
        if raw["queue_id"] != queue_id:
            raise SpoolError(f"{queue_id}: the envelope names another message, "
                             f"{raw['queue_id']}", queue_id)
        return raw, trailer

    def read_message(self, envelope: Envelope) -> bytes:
        """The message as it will go out: the first ``size`` octets of its
        queue file (for the CLI and tests; delivery streams it)."""
        with open(self.message_path(envelope.queue_id), "rb") as stream:
            return stream.read(envelope.size)

    def earliest_due(self, limit: int) -> list[tuple[float, str]]:
        """The ``limit`` messages due soonest, as (due, queue id), from the
        queue files' modification times (`mta.envelope.due_time`): one
        stat a message, and memory for ``limit`` entries, whatever the size
        of the queue.  A file whose time is wrong (an older spool, a copy)
        is only taken up too early, then stamped again."""
        def stamps() -> Iterator[tuple[float, str]]:
            try:
                entries = os.scandir(self.queue)
            except FileNotFoundError:
                return
            with entries:
                for entry in entries:
                    if not entry.name.endswith(".msg"):
                        continue
                    try:
                        yield entry.stat().st_mtime, entry.name[:-4]
                    except FileNotFoundError:
                        continue  # removed while we looked

        return heapq.nsmallest(limit, stamps())

    def stamp(self, queue_id: str, due: float) -> None:
        """Set the queue file's due time (not fsync'd: a lost stamp only
        makes the message come up early)."""
        os.utime(self.message_path(queue_id), (due, due))

    def envelopes(self) -> Iterator[Envelope]:
        """Every readable envelope (see `scan` for the unreadable ones)."""
        for queue_id in self.queue_ids():
            try:
                yield self.load(queue_id)
            except (FileNotFoundError, SpoolError):
                continue

    def scan(self) -> tuple[list[Envelope], list[SpoolError]]:
        """Every committed message: the envelopes, and a `SpoolError` for
        each one that cannot be used (unreadable envelope, missing or
        short message file)."""
        envelopes, bad = [], []
        for item in self.scan_checked():
            if isinstance(item, SpoolError):
                bad.append(item)
            else:
                envelopes.append(from_checked(item))
        return envelopes, bad

    def scan_checked(self) -> Iterator[dict[str, Any] | SpoolError]:
        """`scan` one message at a time, oldest first, in constant memory:
        for each, its envelope's checked JSON form (`load_checked`) once
        its message file is found whole, or the `SpoolError` that `scan`
        would report for it.  The queue is listed at the call."""
        return self._scan_checked(self.queue_ids(), None)

    def listing(self) -> Listing:
        """The queue folder's names now, in one listing: for
        `scan_listed`."""
        try:
            names = os.listdir(self.queue)
        except FileNotFoundError:
            names = []
        queue_ids = [name[:-4] for name in names if name.endswith(".msg")]
        queue_ids.sort()
        return Listing(queue_ids, frozenset(names))

    def scan_listed(
        self, listing: Listing, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, Any] | SpoolError]:
        """`scan_checked` for the messages ``listing.queue_ids[start:stop]``,
        as of the listing: a message that had no envelope file then is
        read from its queue file alone, which said what was true then (one
        file opened a message instead of two, for `mta queue list`)."""
        return self._scan_checked(listing.queue_ids[start:stop], listing.names)

    def _scan_checked(
        self, queue_ids: list[str], listed: frozenset[str] | None
    ) -> Iterator[dict[str, Any] | SpoolError]:
        # listed: the folder's names, when only the envelope files among
        # them are to be looked for; None: look for every one.
        if not queue_ids:
            return
        try:
            # File names relative to the folder: no path to walk for each.
            folder = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return  # removed since it was listed
        try:
            for queue_id in queue_ids:
                try:
                    raw, whole = self._load_with_origin(
                        queue_id, folder,
                        listed is None or f"{queue_id}.env" in listed)
                    if not whole:
                        self._check_message_file(queue_id, raw["size"], folder)
                except FileNotFoundError:
                    continue  # removed while we looked
                except SpoolError as error:
                    yield error
                    continue
                except OSError as error:
                    # Unreadable for this process (permissions): say so and
                    # go on; it is no reason to quarantine anything.
                    yield Unreadable(f"{queue_id}: cannot read: "
                                     f"{error.strerror or error}", queue_id)
                    continue
                yield raw
        finally:
            os.close(folder)

    def check_message(self, envelope: Envelope) -> None:
        """Raise `SpoolError` unless the message file is there, whole: its
        size is recorded in the envelope when it is committed."""
        self._check_message_file(envelope.queue_id, envelope.size, None)

    def _check_message_file(self, queue_id: str, expected: int,
                            folder: int | None) -> None:
        name = (f"{queue_id}.msg" if folder is not None
                else f"{self._queue_prefix}{queue_id}.msg")
        size = os.stat(name, dir_fd=folder).st_size
        # The first ``expected`` octets are the message; a queue file has
        # its first envelope after them, a file of the first layout not.
        if size < expected:
            raise SpoolError(f"{queue_id}: message file has {size} bytes, the "
                             f"envelope says {expected}")

    def save(self, envelope: Envelope) -> None:
        """Replace the envelope durably (temporary file, fsync, rename,
        folder fsync), and set the queue file's due time."""
        queue_id = envelope.queue_id
        temporary = self.tmp / f"{queue_id}.env.{secrets.token_hex(4)}"
        # On a full disk the new file fails before the rename: the old
        # envelope stays whole, and no temporary file is left to fill tmp/.
        _write_durably(temporary, to_json(envelope))
        try:
            os.replace(temporary, self.envelope_path(queue_id))
        except BaseException:
            _unlink_quietly(temporary)
            raise
        self.queue_sync.sync()
        due = due_time(envelope)
        try:
            self.stamp(queue_id, due)
        except OSError:
            pass  # a lost stamp only makes it come up early

    def remove(self, queue_id: str, lock: MessageLock | None = None) -> None:
        """Remove the message; with its ``lock``, release that too, once the
        removal is durable.  Blocking: run it off the reactor thread (the
        last close of an unlinked file is what frees its blocks)."""
        self.unlink(queue_id)
        self.queue_sync.sync()
        if lock is not None:
            lock.release()

    def unlink(self, queue_id: str) -> None:
        """`remove` but the folder's fsync, which the caller owes (one may
        serve several removals: `mta.spoolworker`)."""
        # The queue file first: without it the message no longer exists,
        # and a crash in between leaves only an orphan .env for
        # `clean_orphans`.
        prefix = self._queue_prefix
        for name in (f"{prefix}{queue_id}.msg", f"{prefix}{queue_id}.env"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    def quarantine(self, queue_id: str) -> None:
        for path in (self.message_path(queue_id), self.envelope_path(queue_id)):
            try:
                os.replace(path, self.corrupt / path.name)
            except FileNotFoundError:
                pass
        self.queue_sync.sync()

    def clean_orphans(self, older_than: float = 3600.0) -> list[str]:
        """Remove what a crash left half-done: temporary files, and
        envelope files whose message was being removed.  Only old ones,
        since another process may be committing right now.

        Run as the relay starts, over the whole queue: names only, the
        messages' ids in a set and then the envelope files not in it, and
        a `Path` and an lstat only for those few."""
        removed = []
        limit = time.time() - older_than
        candidates = list(self.tmp.iterdir())
        try:
            with os.scandir(self.queue) as entries:
                messages = {entry.name[:-4] for entry in entries
                            if entry.name.endswith(".msg")}
            with os.scandir(self.queue) as entries:
                candidates += [self.queue / entry.name for entry in entries
                               if entry.name.endswith(".env")
                               and entry.name[:-4] not in messages]
        except FileNotFoundError:
            pass  # no queue folder: no message files either
        for path in candidates:
            try:
                # Only our own files: a folder or anything else someone put
                # here is none of ours to remove.
                status = path.lstat()
                if stat.S_ISREG(status.st_mode) and status.st_mtime < limit:
                    path.unlink()
                    removed.append(path.name)
            except OSError:
                continue  # gone meanwhile, or not ours to remove
        return removed

    # --- locking -------------------------------------------------------

    def lock(self, queue_id: str, wait: bool = False) -> MessageLock:
        """Take the message's lock, or raise `Locked` (when ``wait`` is
        false and another process holds it) or `FileNotFoundError`."""
        if not is_queue_id(queue_id):
            raise SpoolError(f"{queue_id!r}: not a queue id", queue_id)
        try:
            descriptor = os.open(self.message_path(queue_id),
                                 os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENXIO):
                raise SpoolError(f"{queue_id}: message file is not a regular "
                                 "file", queue_id) from None
            raise
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise SpoolError(f"{queue_id}: message file is not a regular file",
                             queue_id)
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(descriptor, flags)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Locked(f"{queue_id} is being delivered") from None
            raise
        # It may have been removed while we waited for the lock.
        if os.fstat(descriptor).st_nlink == 0:
            os.close(descriptor)
            raise FileNotFoundError(queue_id)
        return MessageLock(descriptor)


@dataclass(frozen=True, slots=True)
class Listing:
    """The queue folder's names at one moment (`Spool.listing`)."""

    queue_ids: list[str]  # every committed message, oldest first
    names: frozenset[str]  # every file name: ID.msg, ID.env and others


@dataclass
class MessageLock:
    descriptor: int

    def release(self) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1

    def __enter__(self) -> MessageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MessageWriter:
    """A message being received: bytes go to ``tmp/`` as they arrive (in
    writes of `FLUSH_AT` octets), so memory stays flat whatever the size;
    `commit` makes it durable."""

    # What a buffered file would hold back (io.DEFAULT_BUFFER_SIZE): a full
    # disk is found as early as before, and a small message is written at
    # its commit, in one call.
    FLUSH_AT = 8192

    def __init__(
        self, spool: Spool, queue_id: str, path: str, descriptor: int
    ) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.path = path
        self.descriptor = descriptor
        self.size = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= self.FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        _write_all(self.descriptor, self._pending)
        self._pending.clear()

    def commit(self, envelope: Envelope) -> None:
        """Blocking (fsync): run it off the reactor thread.  When it returns,
        the message and its envelope survive a crash.  When it raises (a
        full disk at the last flush or at the envelope), nothing of the
        message is left: the client is told to send it again."""
        try:
            self.prepare(envelope)
            self.spool.queue_sync.sync()
        except BaseException:
            self.undo()
            raise

    def prepare(
        self, envelope: Envelope, keep_lock: bool = False
    ) -> MessageLock | None:
        """`commit` but the queue folder's fsync, which the caller owes
        before anyone is told (one may serve a batch: `mta.spoolworker`).
        With ``keep_lock`` the message is locked before it appears in the
        queue, and the lock is returned: no other process can take it up
        before its first delivery here.  On an error the caller calls
        `undo`."""
        if envelope.size != self.size or envelope.queue_id != self.queue_id:
            raise ValueError(f"{self.queue_id}: the envelope is not this "
                             "message's (its id or size)")
        # The envelope goes after the message, in the same file: one file
        # and one fsync a message (see the module's docstring).
        self._pending += b"\n" + to_json(envelope)
        self._flush()
        due = due_time(envelope)
        if due > time.time():
            # Not due yet (a notice may be): the file's time says when.  A
            # message due now needs no stamp, the file's own time is now.
            os.utime(self.descriptor, (due, due))
        os.fsync(self.descriptor)
        lock = None
        if keep_lock:
            # A new file nobody else knows: the lock is had at once.
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock = MessageLock(self.descriptor)
        else:
            os.close(self.descriptor)
        self.descriptor = -1
        try:
            os.replace(self.path, f"{self.spool._queue_prefix}{self.queue_id}.msg")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return lock

    def undo(self) -> None:
        """Throw away what `prepare` did, or what it got to before an
        error: nothing of the message is left."""
        self._close()
        for path in (f"{self.spool._queue_prefix}{self.queue_id}.msg", self.path):
            _unlink_quietly(path)

    def _close(self) -> None:
        self._pending.clear()
        if self.descriptor >= 0:
            descriptor, self.descriptor = self.descriptor, -1
            try:
                os.close(descriptor)
            except OSError:
                pass

    def abort(self) -> None:
        """Throw the message away; safe to call again, and after a failed
        write or commit."""
        self._close()
        _unlink_quietly(self.path)
