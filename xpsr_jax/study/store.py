"""The blind study's votes in SQLite (WAL, synchronous=FULL): a vote is on disk before it is
acknowledged, so a killed server loses none that it answered.

    store = VoteStore.open("votes.sqlite", methods=[...], images=[...])   # creates or checks the study
    store.show(participant, image) -> ["SeeSR", "XPSR", ...]   # a fresh random order, remembered
    store.vote(participant, image, slot=2) -> Vote              # slot of the last order shown
    store.counts() -> {(image, method): votes}                  # for the report

Tables: `study` (the methods and images it was created with: a database never mixes two studies),
`participants`, `displays` (the last order each participant saw each image in), `votes` (one per
participant and image: a second vote replaces the first and counts `revisions`), `vote_log`
(every vote ever cast, replaced ones included). Every write is one transaction on its own
connection, so the server's worker threads share nothing.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (participant TEXT PRIMARY KEY, started_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS displays (
    participant TEXT NOT NULL, image TEXT NOT NULL, slot_methods TEXT NOT NULL, shown_at REAL NOT NULL,
    PRIMARY KEY (participant, image));
CREATE TABLE IF NOT EXISTS votes (
    participant TEXT NOT NULL, image TEXT NOT NULL, method TEXT NOT NULL, slot INTEGER NOT NULL,
    slot_methods TEXT NOT NULL, voted_at REAL NOT NULL, revisions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (participant, image));
CREATE TABLE IF NOT EXISTS vote_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, participant TEXT NOT NULL, image TEXT NOT NULL,
    method TEXT NOT NULL, replaces TEXT, voted_at REAL NOT NULL);
"""
MAX_NAME = 64


class StudyError(ValueError):
    """A request or a database the study cannot take (the message says why)."""


@dataclass(frozen=True)
class Vote:
    participant: str
    image: str
    method: str
    replaced: str | None  # the method of the vote this one replaced, if any


def check_participant(name) -> str:
    """The participant's name or token, stripped; StudyError when empty, too long or not text."""
    if not isinstance(name, str) or not name.strip():
        raise StudyError("participant: give a name or token (the same one resumes the study)")
    name = name.strip()
    if len(name) > MAX_NAME or not name.isprintable():
        raise StudyError(f"participant: {name[:MAX_NAME]!r}... must be at most {MAX_NAME} printable characters")
    return name


class VoteStore:
    def __init__(self, path: Path, methods: list[str], images: list[str]):
        self.path, self.methods, self.images = path, methods, images
        self._image_set = set(images)

    @classmethod
    def open(cls, path: str | Path, *, methods: Sequence[str], images: Sequence[str]) -> VoteStore:
        """The study database at `path`, created for these methods and images, or checked to be
        of them (StudyError naming the difference: use another database for another study)."""
        path = Path(path)
        if path.is_dir():
            raise StudyError(f"--db {path}: is a folder; give a database file (e.g. votes.sqlite)")
        if not path.parent.is_dir():
            raise StudyError(f"--db {path}: the folder {path.parent} does not exist")
        methods, images = list(methods), list(images)
        wanted = {"methods": json.dumps(methods), "images": json.dumps(images)}
        try:
            with _connect(path) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and "study" not in tables:  # someone else's database: leave it untouched
                    raise StudyError(f"--db {path}: an SQLite database of something else (tables "
                                     f"{_listed(sorted(tables))}); give a new file for the study")
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    raise StudyError(f"--db {path}: SQLite cannot use write-ahead logging there")
                db.executescript(SCHEMA)
                with _transaction(db):
                    stored = dict(db.execute("SELECT key, value FROM study").fetchall())
                    if not stored:
                        db.executemany("INSERT INTO study VALUES (?, ?)", wanted.items())
                        stored = wanted
        except sqlite3.DatabaseError as error:
            raise StudyError(f"--db {path}: cannot be used as the study database ({error})") from None
        for key, label in (("methods", "methods"), ("images", "image names")):
            before, now = json.loads(stored[key]), json.loads(wanted[key])
            if sorted(before) != sorted(now):
                gone = sorted(set(before) - set(now))
                new = sorted(set(now) - set(before))
                raise StudyError(f"--db {path} holds a study of other {label} (missing now: {_listed(gone)}; new: "
                                 f"{_listed(new)}); give another --db for another study")
        return cls(path, json.loads(stored["methods"]), json.loads(stored["images"]))

    @classmethod
    def read(cls, path: str | Path) -> VoteStore:
        """An existing study database, for the report (StudyError when it is not one)."""
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"--db {path}: no such file")
        try:
            with _connect(path) as db:
                stored = dict(db.execute("SELECT key, value FROM study").fetchall())
        except sqlite3.DatabaseError as error:
            raise StudyError(f"--db {path}: not a study database ({error})") from None
        if set(stored) != {"methods", "images"}:
            raise StudyError(f"--db {path}: not a study database (no study recorded)")
        return cls(path, json.loads(stored["methods"]), json.loads(stored["images"]))

    # ------------------------------------------------------------------ participants

    def start(self, participant: str) -> str:
        participant = check_participant(participant)
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO participants VALUES (?, ?)", (participant, time.time()))
        return participant

    def _known(self, db, participant: str) -> str:
        participant = check_participant(participant)
        if db.execute("SELECT 1 FROM participants WHERE participant = ?", (participant,)).fetchone() is None:
            raise StudyError(f"participant {participant!r} has not started; start (or resume) with that name first")
        return participant

    def order(self, participant: str) -> list[str]:
        """The participant's own order of the images (fixed per name, so a resume keeps it)."""
        return random.Random(f"xpsr-study:{participant}").sample(self.images, len(self.images))

    def voted(self, participant: str) -> dict[str, str]:
        """image -> method of the participant's current votes."""
        with _connect(self.path) as db:
            return dict(db.execute("SELECT image, method FROM votes WHERE participant = ?", (participant,)))

    def next_image(self, participant: str, after: str | None = None) -> str | None:
        """The first image in the participant's order, after `after` (wrapping round), without a
        vote; None when every image has one."""
        order, voted = self.order(participant), self.voted(participant)
        start = order.index(after) + 1 if after in self._image_set else 0
        return next((image for image in order[start:] + order[:start] if image not in voted), None)

    def previous_image(self, participant: str, image: str) -> str | None:
        order = self.order(participant)
        index = order.index(self.check_image(image))
        return order[index - 1] if index > 0 else None

    def check_image(self, image) -> str:
        if image not in self._image_set:
            shown = ", ".join(self.images[:5]) + (", ..." if len(self.images) > 5 else "")
            raise StudyError(f"unknown image id {image!r}; the study's {len(self.images)} images are {shown}")
        return image

    # ------------------------------------------------------------------ showing and voting

    def show(self, participant: str, image: str, *, rng: random.Random | None = None) -> list[str]:
        """A fresh random order of the methods for `image`, remembered as what `participant` sees
        (a vote names a slot of it)."""
        image = self.check_image(image)
        order = (rng or random.SystemRandom()).sample(self.methods, len(self.methods))
        with self._write() as db:
            participant = self._known(db, participant)
            db.execute("INSERT OR REPLACE INTO displays VALUES (?, ?, ?, ?)",
                       (participant, image, json.dumps(order), time.time()))
        return order

    def vote(self, participant: str, image: str, slot: int) -> Vote:
        """Records the choice of `slot` (0-based) of the order last shown; a second vote for the same
        image replaces the first (logged, counted in `revisions`). Committed before it returns."""
        image = self.check_image(image)
        with self._write() as db:
            participant = self._known(db, participant)
            row = db.execute("SELECT slot_methods FROM displays WHERE participant = ? AND image = ?",
                             (participant, image)).fetchone()
            if row is None:
                raise StudyError(f"image {image!r} has not been shown to {participant!r}; show it first")
            order = json.loads(row[0])
            if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(order):
                raise StudyError(f"choice {slot!r}: pick one of the {len(order)} results")
            method = order[slot]
            before = db.execute("SELECT method FROM votes WHERE participant = ? AND image = ?",
                                (participant, image)).fetchone()
            now = time.time()
            db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (participant, image) DO UPDATE "
                       "SET method = excluded.method, slot = excluded.slot, slot_methods = excluded.slot_methods, "
                       "voted_at = excluded.voted_at, revisions = revisions + 1",
                       (participant, image, method, slot, row[0], now))
            db.execute("INSERT INTO vote_log (participant, image, method, replaces, voted_at) VALUES (?, ?, ?, ?, ?)",
                       (participant, image, method, before[0] if before else None, now))
        return Vote(participant, image, method, before[0] if before else None)

    # ------------------------------------------------------------------ reading back

    def counts(self) -> dict[tuple[str, str], int]:
        with _connect(self.path) as db:
            return {(image, method): count for image, method, count in
                    db.execute("SELECT image, method, COUNT(*) FROM votes GROUP BY image, method")}

    def totals(self) -> dict[str, int]:
        """participants (with a vote), votes, replaced (votes that replaced an earlier one), cast (all)."""
        with _connect(self.path) as db:
            participants, votes, replaced = db.execute(
                "SELECT COUNT(DISTINCT participant), COUNT(*), COALESCE(SUM(revisions), 0) FROM votes").fetchone()
            cast = db.execute("SELECT COUNT(*) FROM vote_log").fetchone()[0]
        return {"participants": participants, "votes": votes, "replaced": replaced, "cast": cast}

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with _connect(self.path) as db, _transaction(db):
            yield db


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
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
