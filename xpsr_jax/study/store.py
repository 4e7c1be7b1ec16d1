"""The blind study's votes in SQLite (WAL, synchronous=FULL): a vote is on disk before it is
acknowledged, so a killed server loses none that it answered.

    store = VoteStore.open("votes.sqlite", methods=[...], images=[...], sources=catalog.sources())
    showing = store.show(participant, image)   # Showing(token="k3J...", methods=["SeeSR", "XPSR", ...])
    store.vote(participant, image, slot=2, showing=showing.token) -> Vote   # slot 2 of THAT showing
    store.counts() -> {(image, method): votes}                                # for the report

Tables: `study` (the methods and images it was created with: a database never mixes two studies),
`sources` (the LR folder and each method's folder with a fingerprint of their images: the same
names over other images are refused), `participants`, `showings` (every order shown, under an
unguessable token: a vote names the showing it answers, so two windows of one participant never
mix), `displays` (the last order per participant and image, what databases made before showings
held; still written for them), `votes` (one per participant and image: a second vote replaces the
first, and counts in `revisions` when it changes the method), `vote_log` (every vote ever cast,
replaced ones included) and
`server_starts` (one row per open: the write that proves at start-up that the file takes writes).
Every write is one transaction on its own connection, so the server's worker threads share
nothing; a database error during a request (disk full, file made read-only) is a StudyError that
says what was not done.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import reprlib
import secrets
import shutil
import socket
import sqlite3
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, folder TEXT NOT NULL, fingerprint TEXT NOT NULL, "
    "recorded_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS participants (participant TEXT PRIMARY KEY, started_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS showings (token TEXT PRIMARY KEY, participant TEXT NOT NULL, image TEXT NOT NULL, "
    "slot_methods TEXT NOT NULL, shown_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS displays (participant TEXT NOT NULL, image TEXT NOT NULL, slot_methods TEXT NOT NULL, "
    "shown_at REAL NOT NULL, PRIMARY KEY (participant, image))",
    "CREATE TABLE IF NOT EXISTS votes (participant TEXT NOT NULL, image TEXT NOT NULL, method TEXT NOT NULL, "
    "slot INTEGER NOT NULL, slot_methods TEXT NOT NULL, voted_at REAL NOT NULL, revisions INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (participant, image))",
    "CREATE TABLE IF NOT EXISTS vote_log (id INTEGER PRIMARY KEY AUTOINCREMENT, participant TEXT NOT NULL, "
    "image TEXT NOT NULL, method TEXT NOT NULL, replaces TEXT, voted_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS server_starts (id INTEGER PRIMARY KEY AUTOINCREMENT, started_at REAL NOT NULL, "
    "pid INTEGER NOT NULL, host TEXT NOT NULL)",
)
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
LR_SOURCE = "--lr"  # the LR folder's row in `sources` (no method name starts with "-")
MAX_NAME = 64
MAX_TOKEN = 64
OUT_OF_DATE = "this page is out of date ({}): show the image again"

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 3, 3, 2


class StudyError(ValueError):
    """A request or a database the study cannot take (the message says why; `detail`, when given,
    is for the server's log only: it may name files a participant must not see)."""

    def __init__(self, message: str, *, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Vote:
    participant: str
    image: str
    method: str
    replaced: str | None  # the method of the vote this one replaced, if it was another one


@dataclass(frozen=True)
class Showing:
    """An image shown to a participant: the methods in slot order (A, B, ...), under a token that
    the page sends back with its vote."""
    token: str
    methods: list[str]


@dataclass(frozen=True)
class Source:
    """A folder of images the votes are cast on: resolved path, and a digest of its images."""
    folder: str
    fingerprint: str  # sha256 over the sorted image ids and each file's bytes


def short(value) -> str:
    """`value` for a message: repr, cut to about 60 characters (a request may send megabytes)."""
    return _SHORT.repr(value)


def check_participant(name) -> str:
    """The participant's name or token, stripped and NFC-normalized (the same name typed on any
    system is the same participant); StudyError when empty, too long or not text."""
    if name is not None and not isinstance(name, str):
        raise StudyError(f"participant: expected text (a name or token), got {type(name).__name__} {short(name)}")
    if not name or not name.strip():
        raise StudyError("participant: give a name or token (the same one resumes the study)")
    name = unicodedata.normalize("NFC", name.strip())
    if len(name) > MAX_NAME or not name.isprintable():
        raise StudyError(f"participant: {name[:MAX_NAME]!r}... must be at most {MAX_NAME} printable characters")
    return name


def check_showing(token) -> str:
    """The showing token a vote answers (StudyError when it cannot be one)."""
    if not isinstance(token, str):
        raise StudyError(f"showing: expected the token of the page's showing (text), got {type(token).__name__} "
                         f"{short(token)}")
    if not token or len(token) > MAX_TOKEN:
        raise StudyError(OUT_OF_DATE.format(f"no showing token: {short(token)}"))
    return token


class VoteStore:
    def __init__(self, path: Path, methods: list[str], images: list[str]):
        self.path, self.methods, self.images = path, methods, images
        self._image_set = set(images)
        self.notes: list[str] = []  # what `open` found worth a note line (a folder recorded or moved)

    @classmethod
    def open(cls, path: str | Path, *, methods: Sequence[str], images: Sequence[str],
             sources: Mapping[str, Source] | None = None) -> VoteStore:
        """The study database at `path`, created for these methods and images (and `sources`:
        method or LR_SOURCE -> Source), or checked to be of them; StudyError naming the difference
        (use another database for another study), or why the file cannot be written. Opening
        writes a `server_starts` row: a file that cannot take writes is refused here, not at the
        first vote."""
        path = Path(path)
        _check_new_or_sqlite(path)
        methods, images = list(methods), list(images)
        wanted = {"methods": json.dumps(methods), "images": json.dumps(images)}
        try:
            with _connect(path) as db:
                _refuse_other_database(db, path)
                _use_wal(db, path)
                with _transaction(db):  # all or nothing: a refused open leaves the file as it was
                    for statement in SCHEMA:  # new tables for databases made before them
                        db.execute(statement)
                    stored = dict(db.execute("SELECT key, value FROM study").fetchall())
                    new_study = not stored
                    if new_study:
                        db.executemany("INSERT INTO study VALUES (?, ?)", wanted.items())
                        stored = wanted
                    _check_same_study(path, stored, wanted)
                    notes = [] if sources is None else _check_sources(db, path, dict(sources), new_study)
                    db.execute("INSERT INTO server_starts (started_at, pid, host) VALUES (?, ?, ?)",
                               (time.time(), os.getpid(), socket.gethostname()))
        except sqlite3.Error as error:
            raise _unusable(path, error) from None
        store = cls(path, json.loads(stored["methods"]), json.loads(stored["images"]))
        store.notes = notes
        return store

    @classmethod
    def read(cls, path: str | Path) -> VoteStore:
        """An existing study database, for the report (StudyError when it is not one)."""
        path = Path(path)
        if path.is_dir():
            raise StudyError(f"--db {path}: is a folder; give the study's database file (e.g. votes.sqlite)")
        if not path.is_file():
            raise StudyError(f"--db {path}: no such file")
        try:
            with _connect(path) as db:
                stored = dict(db.execute("SELECT key, value FROM study").fetchall())
        except sqlite3.Error as error:
            raise StudyError(f"--db {path}: not a study database ({error})") from None
        if not {"methods", "images"} <= set(stored):
            raise StudyError(f"--db {path}: not a study database (no study recorded)")
        return cls(path, json.loads(stored["methods"]), json.loads(stored["images"]))

    # ------------------------------------------------------------------ participants

    def start(self, participant) -> str:
        """Starts `participant` (a name already started resumes: no write, so a read-only database
        still says what else it cannot do)."""
        participant = check_participant(participant)
        with self._read("could not start") as db:
            if db.execute("SELECT 1 FROM participants WHERE participant = ?", (participant,)).fetchone():
                return participant
        with self._write("could not start") as db:
            db.execute("INSERT OR IGNORE INTO participants VALUES (?, ?)", (participant, time.time()))
        return participant

    def _known(self, db, participant) -> str:
        participant = check_participant(participant)
        if db.execute("SELECT 1 FROM participants WHERE participant = ?", (participant,)).fetchone() is None:
            raise StudyError(f"participant {participant!r} has not started; start (or resume) with that name first")
        return participant

    def order(self, participant: str) -> list[str]:
        """The participant's own order of the images (fixed per name, so a resume keeps it)."""
        return random.Random(f"xpsr-study:{participant}").sample(self.images, len(self.images))

    def voted(self, participant: str) -> dict[str, str]:
        """image -> method of the participant's current votes."""
        with self._read() as db:
            return dict(db.execute("SELECT image, method FROM votes WHERE participant = ?", (participant,)))

    def next_image(self, participant: str, after: str | None = None) -> str | None:
        """The first image in the participant's order, after `after` (wrapping round), without a
        vote; None when every image has one."""
        order, voted = self.order(participant), self.voted(participant)
        start = order.index(after) + 1 if isinstance(after, str) and after in self._image_set else 0
        return next((image for image in order[start:] + order[:start] if image not in voted), None)

    def previous_image(self, participant: str, image) -> str | None:
        order = self.order(participant)
        index = order.index(self.check_image(image))
        return order[index - 1] if index > 0 else None

    def check_image(self, image) -> str:
        if not isinstance(image, str):
            raise StudyError(f"image_id: expected text (an image id such as {self.images[0]!r}), got "
                             f"{type(image).__name__} {short(image)}")
        if image not in self._image_set:
            shown = ", ".join(self.images[:5]) + (", ..." if len(self.images) > 5 else "")
            raise StudyError(f"unknown image id {short(image)}; the study's {len(self.images)} images are {shown}")
        return image

    # ------------------------------------------------------------------ showing and voting

    def show(self, participant, image, *, rng: random.Random | None = None) -> Showing:
        """A fresh random order of the methods for `image`, recorded under a new token as what
        `participant` sees (a vote names the token and a slot of that order)."""
        participant, image = check_participant(participant), self.check_image(image)
        order = (rng or random.SystemRandom()).sample(self.methods, len(self.methods))
        showing = Showing(secrets.token_urlsafe(12), order)
        now = time.time()
        with self._write("the image cannot be shown") as db:
            participant = self._known(db, participant)
            db.execute("INSERT INTO showings VALUES (?, ?, ?, ?, ?)",
                       (showing.token, participant, image, json.dumps(order), now))
            db.execute("INSERT OR REPLACE INTO displays VALUES (?, ?, ?, ?)",  # for servers before showings
                       (participant, image, json.dumps(order), now))
        return showing

    def vote(self, participant, image, slot: int, *, showing: str) -> Vote:
        """Records the choice of `slot` (0-based) of the order shown under the token `showing`
        (StudyError when that showing is unknown, or of another participant or image). A vote for
        an image voted on before replaces that vote, and counts in `revisions` when it names
        another method (the same one again, as a double click sends, changes nothing); every vote
        cast is in `vote_log`. Committed before it returns."""
        participant, image, token = check_participant(participant), self.check_image(image), check_showing(showing)
        with self._write("the vote was NOT recorded") as db:
            participant = self._known(db, participant)
            slot_methods = _shown_order(db, token, participant, image)
            order = json.loads(slot_methods)
            if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(order):
                raise StudyError(f"choice {short(slot)}: pick one of the {len(order)} results")
            method = order[slot]
            before = db.execute("SELECT method FROM votes WHERE participant = ? AND image = ?",
                                (participant, image)).fetchone()
            replaced = before[0] if before and before[0] != method else None  # the same choice again (a double
            now = time.time()                                                 # click) changes nothing
            db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (participant, image) DO UPDATE "
                       "SET method = excluded.method, slot = excluded.slot, slot_methods = excluded.slot_methods, "
                       "voted_at = excluded.voted_at, revisions = revisions + ?",
                       (participant, image, method, slot, slot_methods, now, int(replaced is not None)))
            db.execute("INSERT INTO vote_log (participant, image, method, replaces, voted_at) VALUES (?, ?, ?, ?, ?)",
                       (participant, image, method, before[0] if before else None, now))
        return Vote(participant, image, method, replaced)

    # ------------------------------------------------------------------ reading back

    def counts(self) -> dict[tuple[str, str], int]:
        with self._read() as db:
            return {(image, method): count for image, method, count in
                    db.execute("SELECT image, method, COUNT(*) FROM votes GROUP BY image, method")}

    def totals(self) -> dict[str, int]:
        """participants (with a vote), votes, replaced (votes that changed an earlier one to another
        method), cast (all, replaced and repeated ones included)."""
        with self._read() as db:
            participants, votes, replaced = db.execute(
                "SELECT COUNT(DISTINCT participant), COUNT(*), COALESCE(SUM(revisions), 0) FROM votes").fetchone()
            cast = db.execute("SELECT COUNT(*) FROM vote_log").fetchone()[0]
        return {"participants": participants, "votes": votes, "replaced": replaced, "cast": cast}

    @contextlib.contextmanager
    def _write(self, undone: str) -> Iterator[sqlite3.Connection]:
        """One transaction; a database error (disk full, file made read-only since start-up)
        becomes a StudyError that begins with `undone`, what did not happen."""
        try:
            with _connect(self.path) as db, _transaction(db):
                yield db
        except sqlite3.Error as error:
            raise StudyError(f"{undone}: the study database {self.path.name} cannot be written now "
                             f"({error}{_why_unwritable(self.path, full_paths=False)})") from None

    @contextlib.contextmanager
    def _read(self, undone: str | None = None) -> Iterator[sqlite3.Connection]:
        """A connection for reading (WAL: it needs the -shm file, so a full disk stops reads too)."""
        try:
            with _connect(self.path) as db:
                yield db
        except sqlite3.Error as error:
            raise StudyError(f"{undone + ': ' if undone else ''}the study database {self.path.name} cannot be read "
                             f"now ({error}{_why_unwritable(self.path, full_paths=False)})") from None


def _shown_order(db: sqlite3.Connection, token: str, participant: str, image: str) -> str:
    """The slot order (JSON) of the showing `token`, which must be of this participant and image."""
    row = db.execute("SELECT participant, image, slot_methods FROM showings WHERE token = ?", (token,)).fetchone()
    if row is None:
        raise StudyError(OUT_OF_DATE.format("the server has no record of what it showed"))
    if (row[0], row[1]) != (participant, image):
        raise StudyError(OUT_OF_DATE.format("it showed another image or participant"))
    return row[2]


# ---------------------------------------------------------------------- opening a database


def _check_new_or_sqlite(path: Path) -> None:
    """Refuses, before SQLite touches it, a path that is neither new, nor empty (0 bytes: a file made
    with `touch` holds nothing to lose and becomes the study), nor an SQLite database."""
    if path.is_dir():
        raise StudyError(f"--db {path}: is a folder; give a database file (e.g. votes.sqlite)")
    if not path.parent.is_dir():
        raise StudyError(f"--db {path}: the folder {path.parent} does not exist")
    if not path.exists():
        return
    if not path.is_file():
        raise StudyError(f"--db {path}: not a regular file; give a database file (e.g. votes.sqlite)")
    try:
        with path.open("rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except OSError as error:
        raise StudyError(f"--db {path}: cannot be read ({error.strerror})") from None
    if head and head != SQLITE_HEADER:  # SQLite would take a short file of junk as empty and overwrite it
        size = path.stat().st_size
        raise StudyError(f"--db {path}: not an SQLite database ({size} byte{'' if size == 1 else 's'} without "
                         "SQLite's header); give a new or empty file for the study")


def _refuse_other_database(db: sqlite3.Connection, path: Path) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "study" not in tables:  # someone else's database: leave it untouched
        raise StudyError(f"--db {path}: an SQLite database of something else (tables "
                         f"{_listed(sorted(tables))}); give a new file for the study")


def _use_wal(db: sqlite3.Connection, path: Path) -> None:
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower()
    if mode != "wal":
        why = _why_unwritable(path)
        raise StudyError(f"--db {path}: cannot be written{why}; give a writable file" if why else
                         f"--db {path}: SQLite cannot use write-ahead logging there (journal mode {mode})")


def _check_same_study(path: Path, stored: dict[str, str], wanted: dict[str, str]) -> None:
    for key, label in (("methods", "methods"), ("images", "image names")):
        before, now = json.loads(stored[key]), json.loads(wanted[key])
        if sorted(before) != sorted(now):
            gone = sorted(set(before) - set(now))
            new = sorted(set(now) - set(before))
            raise StudyError(f"--db {path} holds a study of other {label} (missing now: {_listed(gone)}; new: "
                             f"{_listed(new)}); give another --db for another study")


def _check_sources(db: sqlite3.Connection, path: Path, given: dict[str, Source], new_study: bool) -> list[str]:
    """Records the folders the votes are cast on, or checks them against those recorded: other
    images under a name are refused (StudyError); the same images in another folder are taken,
    and the new folder recorded (a note). Returns the note lines."""
    recorded = {name: Source(folder, fingerprint) for name, folder, fingerprint in
                db.execute("SELECT name, folder, fingerprint FROM sources")}
    notes, unrecorded = [], []
    for name, source in given.items():
        before = recorded.get(name)
        if before is not None and before.fingerprint != source.fingerprint:
            raise StudyError(_other_images(name, before, source, recorded))
        if before == source:
            continue
        if before is None:
            unrecorded.append(name)
        else:
            notes.append(f"{_flag(name, source.folder)}: the same images as in {before.folder}, where the study's "
                         "votes were cast; the study now records the new folder")
        db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)",
                   (name, source.folder, source.fingerprint, time.time()))
    if unrecorded and not new_study:
        notes.append(f"--db {path} was made before studies recorded their folders; recorded them now ("
                     + ", ".join(_flag(name, given[name].folder) for name in unrecorded)
                     + "): later runs check that they hold the same images")
    return notes


def _other_images(name: str, before: Source, now: Source, recorded: dict[str, Source]) -> str:
    whose = "the study's votes" if name == LR_SOURCE else f"the study's votes for {name}"
    where = (f"beside the LR images in {before.folder}" if name == LR_SOURCE else
             f"on the results in {before.folder}")
    state = "they have changed since" if before.folder == now.folder else "other images now"
    swapped = next((other for other, source in recorded.items() if other != name
                    and source.fingerprint == now.fingerprint), None)
    hint = f"; {now.folder} holds what the study recorded for {swapped}: names swapped?" if swapped else ""
    return f"{_flag(name, now.folder)}: {whose} were cast {where} ({state}){hint}; give another --db for another study"


def _flag(name: str, folder: str) -> str:
    return f"--lr {folder}" if name == LR_SOURCE else f"--method {name}={folder}"


def _unusable(path: Path, error: sqlite3.Error) -> StudyError:
    """The one-line refusal of a database file SQLite failed on at start-up."""
    code = getattr(error, "sqlite_errorname", "")
    if code.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return StudyError(f"--db {path}: cannot be used as the study database ({error}); give a new or empty file")
    return StudyError(f"--db {path}: cannot be written ({error}{_why_unwritable(path)}); give a writable file "
                      "(the study records every vote in it)")


def _why_unwritable(path: Path, *, full_paths: bool = True) -> str:
    """What the file system says against writing the database, as ": ..." for a message, or "".
    (Clients get it without the server's paths.)"""
    folder = path.parent
    with contextlib.suppress(OSError):
        if path.exists() and not os.access(path, os.W_OK):
            return ": the file is read-only or immutable (ls -l, lsattr)" if full_paths else ": the file is read-only"
        if not os.access(folder, os.W_OK):
            return (f": the folder {folder} is not writable (SQLite keeps {path.name}-wal and {path.name}-shm "
                    "beside the database)" if full_paths else ": its folder is not writable")
        free = shutil.disk_usage(folder).free
        if free < 1 << 20:
            return f": the disk is full ({free // 1024} KiB free)"
    return ""


def _listed(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") if names else "none"


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)  # transactions are explicit
    try:
        db.execute("PRAGMA synchronous=FULL")  # the commit is on disk (WAL fsynced) before it returns
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock between threads
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # the error that got here is the one to tell
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
