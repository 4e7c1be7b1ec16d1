"""The blind user study (`python -m xpsr_jax.study serve|report`): the SQLite store, the method
folders, the report's rates and Wilson intervals, and the running server driven by gradio_client
(two windows of one participant, concurrent clients, inputs of every wrong type) and by a real
headless Chromium, killed with SIGKILL between and during votes; databases that cannot be
written (immutable, full disk), are not databases, or are of a study over other folders."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers.web import (REPO, WebServer, free_port, headless_chromium, python_module, save_screenshot,
                               server_env)
from xpsr_jax.study.app import StudyPage, answered
from xpsr_jax.study.catalog import Catalog, parse_method
from xpsr_jax.study.cli import identical_methods
from xpsr_jax.study.report import summarize, to_markdown, write_report
from xpsr_jax.study.store import LR_SOURCE, StudyError, VoteStore

PHOTOS = ("astronaut", "chelsea", "coffee")
METHODS = {"BicubicUp": Image.BICUBIC, "NearestUp": Image.NEAREST, "GroundTruthHR": None}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """LR photos (32 px) and three methods' 128 px results: bicubic, nearest and the original."""
    root = tmp_path_factory.mktemp("study")
    folders = {name: root / name for name in ("LR", *METHODS)}
    for folder in folders.values():
        folder.mkdir()
    pixels: dict[tuple[str, str], np.ndarray] = {}
    for photo in PHOTOS:
        hr = Image.open(REPO / "xpsr_jax" / "examples" / "hr" / f"{photo}.png").convert("RGB")
        lr = hr.resize((32, 32), Image.BICUBIC)
        lr.save(folders["LR"] / f"{photo}.png")
        for method, resample in METHODS.items():
            result = hr if resample is None else lr.resize((128, 128), resample)
            result.save(folders[method] / f"{photo}.png")
            pixels[(photo, method)] = np.asarray(result)
    return {"root": root, "folders": folders, "pixels": pixels}


def method_of(study, image: str, shown) -> str:
    """Which method's result a displayed image is (exact pixels: the page shows PNGs)."""
    array = np.asarray(Image.open(shown).convert("RGB"))
    found = [method for method in METHODS if np.array_equal(study["pixels"][(image, method)], array)]
    assert len(found) == 1, found
    return found[0]


def method_flags(study, folders: dict | None = None) -> list[str]:
    folders = {**study["folders"], **(folders or {})}
    return [arg for method in METHODS for arg in ("--method", f"{method}={folders[method]}")]


def study_catalog(study, folders: dict | None = None) -> Catalog:
    folders = {**study["folders"], **(folders or {})}
    return Catalog.scan(folders["LR"], {method: folders[method] for method in METHODS})


def open_study(study, db: Path, folders: dict | None = None) -> VoteStore:
    """The study's database as `serve` (with these folders) opens it."""
    catalog = study_catalog(study, folders)
    return VoteStore.open(db, methods=catalog.methods, images=catalog.images, sources=catalog.sources())


def vote_for(store: VoteStore, participant: str, image: str, method: str):
    showing = store.show(participant, image)
    return store.vote(participant, image, showing.methods.index(method), showing=showing.token)


class Answer(NamedTuple):
    """An endpoint's answer: (image_id, progress, LR, results..., message, choice, showing)."""
    image: str
    progress: str
    lr: str | None
    results: list
    message: str
    token: str


def answer_of(response) -> Answer:
    image, progress, lr, *results, message, _choice, token = response
    return Answer(image, progress, lr, results, message, token)


@contextlib.contextmanager
def unwritable(path: Path):
    """`path` (a file or a folder) made unwritable: immutable (chattr +i) as root, else read-only
    (a file's folder too, so no -wal file can be made beside it); skips the test when neither
    holds here."""
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"chattr +i {path} failed ({made.stderr.strip()}): cannot make it unwritable as root")
        undo = [(["chattr", "-i", str(path)], None)]
    else:
        folder = path if path.is_dir() else path.parent
        undo = [(folder, 0o755)] + ([] if path.is_dir() else [(path, 0o644)])
        if not path.is_dir():
            path.chmod(0o444)
        folder.chmod(0o555)
    try:
        if os.access(path, os.W_OK):
            pytest.skip(f"{path} stays writable here")
        yield path
    finally:
        for target, mode in undo:
            if mode is None:
                subprocess.run(target, check=True)
            else:
                target.chmod(mode)


# ---------------------------------------------------------------------------- store, catalog, report


def test_one_vote_per_participant_and_image_a_second_replaces_the_first(tmp_path):
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["A", "B", "C"], images=["1", "2"])
    with sqlite3.connect(tmp_path / "votes.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.start("  alice ") == "alice"
    showing = store.show("alice", "1")
    assert sorted(showing.methods) == ["A", "B", "C"] and len(showing.token) >= 16
    first = store.vote("alice", "1", 2, showing=showing.token)
    assert (first.method, first.replaced) == (showing.methods[2], None)
    showing = store.show("alice", "1")
    second = store.vote("alice", "1", showing.methods.index("A" if first.method != "A" else "B"), showing=showing.token)
    assert second.replaced == first.method and second.method != first.method
    assert store.totals() == {"participants": 1, "votes": 1, "replaced": 1, "cast": 2}
    again = store.vote("alice", "1", showing.methods.index(second.method), showing=showing.token)  # a double click
    assert (again.method, again.replaced) == (second.method, None)
    assert store.totals() == {"participants": 1, "votes": 1, "replaced": 1, "cast": 3}
    assert store.counts() == {("1", second.method): 1}
    assert store.next_image("alice") == "2" and store.voted("alice") == {"1": second.method}
    for call, message in [(lambda: store.show("alice", "3"), "unknown image id '3'"),
                          (lambda: store.vote("alice", "2", 0, showing=showing.token), "out of date"),
                          (lambda: store.vote("alice", "1", 3, showing=showing.token), "choice 3: pick one of the 3"),
                          (lambda: store.show("bob", "1"), "participant 'bob' has not started"),
                          (lambda: store.start("   "), "give a name or token"),
                          (lambda: store.start("x" * 65), "at most 64 printable")]:
        with pytest.raises(StudyError, match=message):
            call()


def test_a_vote_counts_for_the_order_of_the_showing_it_answers_not_the_last_one(tmp_path):
    """One participant, two windows: each vote is resolved against its own window's order."""
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["A", "B", "C"], images=["1", "2"])
    store.start("alice")
    store.start("bob")
    first = store.show("alice", "1", rng=random.Random(0))
    second = store.show("alice", "1", rng=random.Random(3))
    assert first.methods[0] != second.methods[0] and first.token != second.token
    assert store.vote("alice", "1", 0, showing=first.token).method == first.methods[0]
    assert store.vote("alice", "1", 0, showing=second.token).method == second.methods[0]
    assert store.voted("alice") == {"1": second.methods[0]}
    with sqlite3.connect(store.path) as db:  # every showing is kept (under its token); only the order travels
        assert db.execute("SELECT COUNT(*) FROM showings WHERE participant = 'alice'").fetchone()[0] == 2
    other_image, other_participant = store.show("alice", "2"), store.show("bob", "1")
    for token, message in [(other_image.token, "it showed another image or participant"),
                           (other_participant.token, "it showed another image or participant"),
                           ("not-a-token", "the server has no record of what it showed"),
                           ("", "no showing token"), ("t" * 65, "no showing token")]:
        with pytest.raises(StudyError, match=r"this page is out of date \(" + re.escape(message)):
            store.vote("alice", "1", 0, showing=token)
    for value in (None, ["x"], {"token": first.token}, 5):
        with pytest.raises(StudyError, match="showing: expected the token"):
            store.vote("alice", "1", 0, showing=value)
    assert store.totals()["cast"] == 2  # the refused votes left nothing


def test_names_are_text_of_bounded_length_and_one_name_is_one_participant_in_any_unicode_form(tmp_path):
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["A", "B"], images=["café", "a b", "日本"])
    assert store.start("Zoe\u0308") == store.start("Zo\u00eb") == "Zo\u00eb"  # decomposed and composed ë
    assert store.start("李雷") == "李雷"
    for image in store.images:
        assert vote_for(store, "Zoë", image, "B").method == "B"
    assert store.totals()["participants"] == 1
    for name, message in [("a\nb", "printable"), ("a\x1b[31mred", "printable"), ("zero\u200bwidth", "printable"),
                          ("\u202eevil", "printable"), (["alice"], "expected text"), ({"name": "a"}, "expected text"),
                          (7, "expected text"), (None, "give a name or token")]:
        with pytest.raises(StudyError, match=message):
            store.start(name)
    for image, message in [(["café"], "image_id: expected text"), ({"café": 1}, "image_id: expected text"),
                           (None, "image_id: expected text"), ("x" * 1_000_000, "unknown image id 'xxx")]:
        with pytest.raises(StudyError, match=message) as refused:
            store.show("Zoë", image)
        assert len(str(refused.value)) < 200  # a megabyte sent comes back as a short message


def test_a_database_of_another_study_or_of_something_else_is_refused_untouched(tmp_path):
    path = tmp_path / "votes.sqlite"
    VoteStore.open(path, methods=["XPSR", "SeeSR"], images=["1", "2"])
    with pytest.raises(StudyError, match=r"other methods \(missing now: SeeSR; new: PASD\)"):
        VoteStore.open(path, methods=["XPSR", "PASD"], images=["1", "2"])
    with pytest.raises(StudyError, match=r"other image names \(missing now: 2; new: 3\)"):
        VoteStore.open(path, methods=["XPSR", "SeeSR"], images=["1", "3"])
    other = tmp_path / "inventory.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE stock (item TEXT)")
        db.execute("INSERT INTO stock VALUES ('bolts')")
    text = tmp_path / "notes.sqlite"
    text.write_text("my notes\n" * 100)
    before = {p: p.read_bytes() for p in (other, text)}
    for target, message in [(other, "an SQLite database of something else"), (text, "not an SQLite database")]:
        with pytest.raises(StudyError, match=message):
            VoteStore.open(target, methods=["A", "B"], images=["1"])
    assert {p: p.read_bytes() for p in (other, text)} == before
    with pytest.raises(StudyError, match="no such file"):
        VoteStore.read(tmp_path / "nothing.sqlite")


def test_an_empty_file_becomes_the_study_and_a_file_of_junk_is_refused_untouched(tmp_path):
    """0 bytes (`touch votes.sqlite`) hold nothing to lose: the file becomes the study. Any byte of
    something else is refused before SQLite (which would take a short file as empty) touches it."""
    touched = tmp_path / "touched.sqlite"
    touched.touch()
    VoteStore.open(touched, methods=["A", "B"], images=["1"])
    assert VoteStore.read(touched).methods == ["A", "B"]
    for name, content in [("one-byte.sqlite", b"x"), ("zero.sqlite", b"\0"), ("old.sqlite", b"SQLite format 2\0" * 8)]:
        junk = tmp_path / name
        junk.write_bytes(content)
        size = f"{len(content)} byte" + ("s" if len(content) > 1 else "")
        with pytest.raises(StudyError, match=rf"--db {re.escape(str(junk))}: not an SQLite database \({size} "
                                             r"without SQLite's header\); give a new or empty file"):
            VoteStore.open(junk, methods=["A", "B"], images=["1"])
        assert junk.read_bytes() == content
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old.sqlite", "one-byte.sqlite", "touched.sqlite",
                                                                 "zero.sqlite"]  # no -wal or -shm left either


def test_the_method_folders_must_hold_a_result_for_every_lr_image(study, tmp_path):
    folders = study["folders"]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "chelsea.png").write_bytes((folders["NearestUp"] / "chelsea.png").read_bytes())
    with pytest.raises(StudyError, match=r"Partial \(.*\) lacks 2 of 3: astronaut, coffee"):
        Catalog.scan(folders["LR"], {"BicubicUp": folders["BicubicUp"], "Partial": partial})
    with pytest.raises(StudyError, match="at least two"):
        Catalog.scan(folders["LR"], {"BicubicUp": folders["BicubicUp"]})
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("astronaut.png", "astronaut.jpg"):
        (clash / name).write_bytes(b"")
    with pytest.raises(StudyError, match="astronaut.jpg and astronaut.png share the name"):
        Catalog.scan(folders["LR"], {"BicubicUp": folders["BicubicUp"], "Clash": clash})
    for spec, message in [("XPSR", "give NAME=DIR"), ("=dir", "must be 1-40"), ("<b>=dir", "must be 1-40")]:
        with pytest.raises(StudyError, match=message):
            parse_method(spec)
    catalog = Catalog.scan(folders["LR"], {name: folders[name] for name in METHODS})
    lr, results = catalog.load("coffee", ["GroundTruthHR", "NearestUp"])
    assert lr.shape == (32, 32, 3) and [r.shape for r in results] == [(128, 128, 3)] * 2
    assert catalog.size_mismatches() == []


def test_page_copies_removed_while_serving_are_made_again(study, tmp_path):
    """A /tmp cleaner may delete the page's PNG copies during a study of weeks."""
    catalog = study_catalog(study)
    lr, results = catalog.display_files("coffee", list(METHODS), tmp_path)
    for path in (lr, *results):
        path.unlink()
    again = catalog.display_files("coffee", list(METHODS), tmp_path)
    assert again == (lr, results) and all(path.is_file() for path in (lr, *results))


def test_a_file_name_that_is_not_utf8_is_refused_by_name(study, tmp_path):
    folder = tmp_path / "latin1"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copyfile(study["folders"]["NearestUp"] / f"{photo}.png", folder / f"{photo}.png")
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(b"")  # a Latin-1 name on a UTF-8 system
    with pytest.raises(StudyError, match=r"the file name 'caf\\udce9.png' is not UTF-8 text; rename it"):
        Catalog.scan(study["folders"]["LR"], {"BicubicUp": study["folders"]["BicubicUp"], "Latin1": folder})


def test_the_study_records_its_folders_and_refuses_other_images_under_a_name(study, tmp_path):
    """Each method's folder and a fingerprint of its images are recorded: swapped names, results
    changed in place, or another LR folder are refused; the same images moved are taken, with a note."""
    folders = study["folders"]
    sources = study_catalog(study).sources()
    assert set(sources) == {LR_SOURCE, *METHODS}
    assert len({source.fingerprint for source in sources.values()}) == 4
    assert sources["NearestUp"].folder == str(folders["NearestUp"].resolve())
    db = tmp_path / "votes.sqlite"
    assert open_study(study, db).notes == []
    assert open_study(study, db).notes == []
    swapped = {"BicubicUp": folders["NearestUp"], "NearestUp": folders["BicubicUp"]}
    with pytest.raises(StudyError, match=re.escape(
            f"--method BicubicUp={folders['NearestUp']}: the study's votes for BicubicUp were cast on the results in "
            f"{folders['BicubicUp']} (other images now); {folders['NearestUp']} holds what the study recorded for "
            "NearestUp: names swapped?; give another --db for another study")):
        open_study(study, db, swapped)
    moved = shutil.copytree(folders["NearestUp"], tmp_path / "moved")
    assert open_study(study, db, {"NearestUp": moved}).notes == [
        f"--method NearestUp={moved}: the same images as in {folders['NearestUp']}, where the study's votes were "
        "cast; the study now records the new folder"]
    assert open_study(study, db, {"NearestUp": moved}).notes == []
    shutil.copyfile(folders["BicubicUp"] / "coffee.png", moved / "coffee.png")  # one result redone in place
    with pytest.raises(StudyError, match=re.escape(f"--method NearestUp={moved}: the study's votes for NearestUp "
                                                   f"were cast on the results in {moved} (they have changed since)")):
        open_study(study, db, {"NearestUp": moved})
    other_lr = shutil.copytree(folders["LR"], tmp_path / "LR2")
    Image.new("RGB", (32, 32)).save(other_lr / "chelsea.png")
    with pytest.raises(StudyError, match=re.escape(f"--lr {other_lr}: the study's votes were cast beside the LR "
                                                   f"images in {folders['LR']} (other images now)")):
        open_study(study, db, {"LR": other_lr, "NearestUp": folders["NearestUp"]})


def test_methods_with_identical_images_are_named(study):
    catalog = Catalog.scan(study["folders"]["LR"], {"BicubicUp": study["folders"]["BicubicUp"],
                                                   "Again": study["folders"]["BicubicUp"],
                                                   "NearestUp": study["folders"]["NearestUp"]})
    assert identical_methods(catalog.sources()) == [["BicubicUp", "Again"]]
    assert identical_methods(study_catalog(study).sources()) == []


OLD_SCHEMA = """
CREATE TABLE study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE participants (participant TEXT PRIMARY KEY, started_at REAL NOT NULL);
CREATE TABLE displays (participant TEXT NOT NULL, image TEXT NOT NULL, slot_methods TEXT NOT NULL,
    shown_at REAL NOT NULL, PRIMARY KEY (participant, image));
CREATE TABLE votes (participant TEXT NOT NULL, image TEXT NOT NULL, method TEXT NOT NULL, slot INTEGER NOT NULL,
    slot_methods TEXT NOT NULL, voted_at REAL NOT NULL, revisions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (participant, image));
CREATE TABLE vote_log (id INTEGER PRIMARY KEY AUTOINCREMENT, participant TEXT NOT NULL, image TEXT NOT NULL,
    method TEXT NOT NULL, replaces TEXT, voted_at REAL NOT NULL);
"""


def test_a_database_made_before_showings_and_folders_keeps_its_votes_and_records_them(study, tmp_path):
    db = tmp_path / "votes.sqlite"
    order = json.dumps(["NearestUp", "BicubicUp", "GroundTruthHR"])
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as old:  # as the study wrote it before
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(OLD_SCHEMA)
        old.executemany("INSERT INTO study VALUES (?, ?)", [("methods", json.dumps(list(METHODS))),
                                                             ("images", json.dumps(sorted(PHOTOS)))])
        old.execute("INSERT INTO participants VALUES ('olga', 1.0)")
        old.execute("INSERT INTO displays VALUES ('olga', 'coffee', ?, 2.0)", (order,))
        old.execute("INSERT INTO votes VALUES ('olga', 'coffee', 'NearestUp', 0, ?, 3.0, 0)", (order,))
        old.execute("INSERT INTO vote_log (participant, image, method, voted_at) VALUES "
                    "('olga', 'coffee', 'NearestUp', 3.0)")
    store = open_study(study, db)
    assert len(store.notes) == 1 and store.notes[0].startswith(
        f"--db {db} was made before studies recorded their folders; recorded them now (--lr {study['folders']['LR']}"
        f", --method BicubicUp={study['folders']['BicubicUp']}, ")
    assert open_study(study, db).notes == []
    assert store.voted("olga") == {"coffee": "NearestUp"}
    vote = vote_for(store, "olga", "coffee", "GroundTruthHR")
    assert (vote.method, vote.replaced) == ("GroundTruthHR", "NearestUp")
    assert summarize(VoteStore.read(db)).replaced == 1
    with sqlite3.connect(db) as opened:  # `displays` still holds the last order, for a server before showings
        shown = json.loads(opened.execute("SELECT slot_methods FROM displays WHERE participant = 'olga'").fetchone()[0])
        assert shown[opened.execute("SELECT slot FROM votes").fetchone()[0]] == "GroundTruthHR"


def test_a_database_made_unwritable_during_the_study_refuses_each_write_saying_what_was_not_done(tmp_path):
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["A", "B"], images=["1"])
    store.start("ivy")
    showing = store.show("ivy", "1")
    with unwritable(store.path):
        for call, message in [(lambda: store.vote("ivy", "1", 0, showing=showing.token), "the vote was NOT recorded"),
                              (lambda: store.show("ivy", "1"), "the image cannot be shown"),
                              (lambda: store.start("jo"), "could not start")]:
            with pytest.raises(StudyError, match=message + ": the study database votes.sqlite cannot be written now "
                                                 r"\(attempt to write a readonly database: the file is read-only\)"):
                call()
        assert store.voted("ivy") == {}
    assert store.vote("ivy", "1", 0, showing=showing.token).method == showing.methods[0]  # writable again: it goes on


def wilson(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out (an independent check of scipy's)."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return centre - half, centre + half


def test_the_report_counts_votes_exactly_with_wilson_intervals_in_table_1_layout(tmp_path):
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["SeeSR", "XPSR", "Mine"], images=list("abcd"))
    wanted = {("p1", "a"): "XPSR", ("p1", "b"): "XPSR", ("p1", "c"): "SeeSR", ("p1", "d"): "XPSR",
              ("p2", "a"): "XPSR", ("p2", "b"): "SeeSR", ("p2", "c"): "XPSR"}
    for (participant, image), method in wanted.items():
        store.start(participant)
        vote_for(store, participant, image, method)
    vote_for(store, "p2", "c", "SeeSR")  # p2 changes a vote: XPSR -> SeeSR
    report = summarize(VoteStore.read(store.path))
    assert (report.participants, report.votes, report.replaced, report.images) == (2, 7, 1, 4)
    rates = {m.method: m for m in report.methods}
    assert [rates[m].votes for m in ("SeeSR", "XPSR", "Mine")] == [3, 4, 0]
    for method, votes in (("SeeSR", 3), ("XPSR", 4), ("Mine", 0)):
        assert rates[method].rate == pytest.approx(votes / 7)
        assert rates[method].ci95 == pytest.approx(wilson(votes, 7), abs=1e-12)
    assert (rates["XPSR"].paper_rate, rates["SeeSR"].paper_rate, rates["Mine"].paper_rate) == (0.643, 0.148, None)
    assert report.per_image["c"] == {"SeeSR": 2, "XPSR": 0, "Mine": 0}
    markdown = to_markdown(report)
    assert "| selection rate | 42.9% | 57.1% | 0.0% |" in markdown
    assert "| paper (supplement Table 1) | 14.8% | 64.3% | - |" in markdown
    assert "2 participant(s), 7 vote(s) over 4 image(s) (1 changed by a later vote)" in markdown
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths[1].read_text())["methods"][1]["votes"] == 4
    with Image.open(paths[2]) as chart:
        assert chart.format == "PNG" and chart.width > 300


def test_the_report_keeps_one_table_cell_per_image_id_whatever_its_characters(tmp_path):
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["A", "B"], images=["x|y", "back\\slash"])
    store.start("p")
    vote_for(store, "p", "x|y", "B")
    markdown = to_markdown(summarize(store))
    assert "| x\\|y | 0 | 1 |" in markdown and "| back\\\\slash | 0 | 0 |" in markdown
    with pytest.raises(StudyError, match=r"--out .*file/report: cannot write report.md there \(Not a directory\)"):
        (tmp_path / "file").write_text("")
        write_report(summarize(store), tmp_path / "file" / "report")


def test_the_page_handlers_refuse_wrong_types_and_an_unforeseen_error_is_one_line(study, tmp_path, capsys):
    """Back (the page's own button, no API endpoint) checks its inputs as the endpoints do; an
    exception no handler foresaw reaches the client as a message and the log as one line."""
    catalog = study_catalog(study)
    page = StudyPage(catalog, VoteStore.open(tmp_path / "votes.sqlite", methods=catalog.methods,
                                             images=catalog.images), tmp_path / "shown")
    image, *_, token = page.start("pia")
    assert page.back("pia", "")[0] == page.store.order("pia")[-1]
    for call, message in [(lambda: page.back("pia", ["coffee"]), "image_id: expected text"),
                          (lambda: page.back({"p": 1}, image), "participant: expected text"),
                          (lambda: page.vote("pia", image, "A", None), "showing: expected the token"),
                          (lambda: page.vote("pia", image, 0, token), "choice 0: pick one of A, B, C")]:
        with pytest.raises(StudyError, match=message):
            call()

    class ClientError(Exception):
        def __init__(self, message, print_exception):
            super().__init__(message)

    def broken(participant):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(ClientError, match=r"^the server could not answer this request \(an internal error; the "):
        answered(broken, ClientError)("pia")
    assert capsys.readouterr().err == "request failed: ZeroDivisionError: 'division by zero'\n"


# ---------------------------------------------------------------------------- the running study


def serve_command(study, db: Path) -> list[str]:
    return python_module("xpsr_jax.study", "serve", "--lr", str(study["folders"]["LR"]), *method_flags(study),
                         "--db", str(db))


def report_json(db: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "xpsr_jax.study", "report", "--db", str(db), "--out", str(out)],
                          capture_output=True, text=True, env=server_env(out.parent), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def study_server(study):
    server = WebServer(serve_command(study, study["root"] / "votes.sqlite"), study["root"])
    with server:
        yield server


def test_two_participants_vote_blind_through_the_api_and_the_report_counts_them(study, study_server, tmp_path):
    planned = {"alice": ["GroundTruthHR", "GroundTruthHR", "BicubicUp"],
               "bob": ["NearestUp", "GroundTruthHR", "GroundTruthHR"]}
    voted: dict[tuple[str, str], str] = {}
    responses = []
    for participant, choices in planned.items():
        client = Client(study_server.url, verbose=False)
        answer = answer_of(client.predict(participant, api_name="/start"))
        for number, method in enumerate(choices):
            image = answer.image
            assert answer.progress == f"{number} / 3" and image in PHOTOS
            assert Image.open(answer.lr).size == (32, 32)
            assert {Image.open(r).size for r in answer.results} == {(128, 128)}
            shown = [method_of(study, image, r) for r in answer.results]
            assert sorted(shown) == sorted(METHODS)
            response = client.predict(participant, image, "ABC"[shown.index(method)], answer.token, api_name="/vote")
            answer = answer_of(response)
            assert answer.message.startswith(f"Vote for image {image} recorded.")
            responses.append(response)
            voted[(participant, image)] = method
        assert answer.image == "" and answer.progress == "3 / 3" and "Thank you" in answer.message
        assert answer.token == ""  # nothing shown: no showing to vote on

    # bob changes his vote for one image: counted once, and as a replacement.
    client = Client(study_server.url, verbose=False)
    answer = answer_of(client.predict("bob", "coffee", api_name="/show"))
    shown = [method_of(study, answer.image, r) for r in answer.results]
    changed_to = next(method for method in METHODS if method != voted[("bob", "coffee")])
    response = client.predict("bob", "coffee", "ABC"[shown.index(changed_to)], answer.token, api_name="/vote")
    assert answer_of(response).message.startswith("Vote for image coffee changed.")
    voted[("bob", "coffee")] = changed_to
    token = answer.token
    for call, message in [(lambda: client.predict("bob", "nope", "A", token, api_name="/vote"),
                           "unknown image id 'nope'"),
                          (lambda: client.predict("bob", "coffee", "Z", token, api_name="/vote"), "choice 'Z'"),
                          (lambda: client.predict("eve", "coffee", "A", token, api_name="/vote"),
                           "'eve' has not started"),
                          (lambda: client.predict("bob", "astronaut", "A", token, api_name="/vote"), "out of date"),
                          (lambda: client.predict("", api_name="/start"), "give a name or token")]:
        with pytest.raises(AppError, match=message):
            call()

    report = report_json(study["root"] / "votes.sqlite", tmp_path / "report")
    assert (report["participants"], report["votes"], report["replaced"]) == (2, 6, 1)
    tally = Counter(voted.values())
    assert {m["method"]: m["votes"] for m in report["methods"]} == {method: tally[method] for method in METHODS}
    assert report["per_image"] == {photo: {method: sum(1 for (_, image), chosen in voted.items()
                                                       if image == photo and chosen == method) for method in METHODS}
                                   for photo in PHOTOS}
    # Blind: no method name or folder reaches the page's config or any answer.
    with urllib.request.urlopen(study_server.url + "config") as page:
        config = page.read().decode()
    for text in [config, json.dumps(responses)]:
        for method in METHODS:
            assert method not in text and str(study["folders"][method]) not in text
    assert "Traceback" not in study_server.output()


def test_a_browser_casts_a_vote_on_the_study_page(study, study_server, tmp_path):
    """The page sends its own showing's token: a second window (here an API client) showing the
    same image meanwhile changes nothing; "back" and a new vote replace the first."""
    def field(browser, element_id: str) -> str:
        found = browser.find_element(By.CSS_SELECTOR, f"#{element_id} textarea, #{element_id} input")
        return found.get_attribute("value")

    def method_in(browser, image: str, letter: str) -> str:
        with urllib.request.urlopen(browser.find_element(By.CSS_SELECTOR, f"#result-{letter} img").get_attribute("src")
                                    ) as response:
            return method_of(study, image, response)

    def wait_for_message(browser, message: str) -> None:
        try:
            WebDriverWait(browser, 60).until(lambda b: message in b.find_element(By.ID, "message").text)
        except TimeoutException:
            raise AssertionError(f"no {message!r} in the page: message {browser.find_element(By.ID, 'message').text!r}"
                                 f", toasts {[t.text for t in browser.find_elements(By.CSS_SELECTOR, '.toast-body')]}"
                                 ) from None

    def vote(browser, letter: str, message: str) -> None:
        browser.find_element(By.XPATH, f"//*[@id='choice']//label[.//input[@value='{letter}']]").click()
        browser.find_element(By.ID, "vote").click()
        wait_for_message(browser, message)

    with headless_chromium(tmp_path, height=1250) as browser:
        browser.get(study_server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#participant textarea, #participant input")
                   ).send_keys("carol")
        browser.find_element(By.ID, "start").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "[id^=result-] img")) == 3)
        image = field(browser, "image-id")
        expected = method_in(browser, image, "B")
        save_screenshot(browser, "study.png", tmp_path)
        Client(study_server.url, verbose=False).predict("carol", image, api_name="/show")  # another window
        vote(browser, "B", f"Vote for image {image} recorded.")
        assert field(browser, "progress") == "1 / 3"
        assert VoteStore.read(study["root"] / "votes.sqlite").voted("carol") == {image: expected}
        browser.find_element(By.ID, "back").click()
        wait_for_message(browser, "You voted for this image before")
        assert field(browser, "image-id") == image
        letter, changed_to = next((letter, method) for letter in "ABC"
                                  if (method := method_in(browser, image, letter)) != expected)
        vote(browser, letter, f"Vote for image {image} changed.")
    assert VoteStore.read(study["root"] / "votes.sqlite").voted("carol") == {image: changed_to}


def test_two_windows_of_one_participant_each_vote_for_the_order_they_show(study, study_server):
    """Both windows show the same image; each vote counts for the result in its OWN window's slot
    (before showing tokens, the last order shown decided: wrong in about 2 of 3 tries)."""
    first, second = Client(study_server.url, verbose=False), Client(study_server.url, verbose=False)
    first.predict("frank", api_name="/start")
    db = study["root"] / "votes.sqlite"
    for attempt in range(8):
        in_first = answer_of(first.predict("frank", "coffee", api_name="/show"))
        in_second = answer_of(second.predict("frank", "coffee", api_name="/show"))
        assert in_first.token != in_second.token
        first.predict("frank", "coffee", "A", in_first.token, api_name="/vote")
        assert VoteStore.read(db).voted("frank")["coffee"] == method_of(study, "coffee", in_first.results[0]), attempt
        second.predict("frank", "coffee", "B", in_second.token, api_name="/vote")
        assert VoteStore.read(db).voted("frank")["coffee"] == method_of(study, "coffee", in_second.results[1]), attempt
    with pytest.raises(AppError, match=r"this page is out of date \(it showed another image or participant\)"):
        first.predict("frank", "chelsea", "A", in_first.token, api_name="/vote")


WRONG_TYPES = {"a list": ["coffee"], "a dict": {"image": "coffee"}, "a number": 5, "None": None}


def test_every_input_of_a_wrong_type_is_answered_with_a_message(study, study_server):
    client = Client(study_server.url, verbose=False)
    token = answer_of(client.predict("grace", "coffee", api_name="/show")).token
    calls = {"/start": {"participant": "grace"}, "/show": {"participant": "grace", "image_id": "coffee"},
             "/vote": {"participant": "grace", "image_id": "coffee", "choice": "A", "showing": token}}
    expected = {"participant": "participant: (expected text|give a name)", "image_id": "image_id: expected text",
                "choice": "choice .*: pick one of A, B, C", "showing": "showing: expected the token"}
    for endpoint, good in calls.items():
        for name in good:
            for kind, value in WRONG_TYPES.items():
                with pytest.raises(AppError, match=expected[name]):
                    client.predict(*{**good, name: value}.values(), api_name=endpoint)
    assert VoteStore.read(study["root"] / "votes.sqlite").voted("grace") == {}
    log = study_server.output()
    assert "Traceback" not in log and "request failed" not in log
    assert "request refused: image_id: expected text (an image id such as 'astronaut'), got list ['coffee']" in log


def test_long_and_unprintable_inputs_come_back_as_short_messages(study_server):
    client = Client(study_server.url, verbose=False)
    token = answer_of(client.predict("henry", "coffee", api_name="/show")).token
    for args, endpoint, message in [
            (["x" * 100_000], "/start", "at most 64 printable"),
            (["red\x1b[31m"], "/start", "at most 64 printable"), (["two\nlines"], "/start", "at most 64 printable"),
            (["henry", "x" * 1_000_000], "/show", "unknown image id 'xxx"),
            (["henry", "coffee", "A" * 100_000, token], "/vote", "choice 'AAA"),
            (["henry", "coffee", "A", "t" * 100_000], "/vote", "out of date"),
            (["henry", "coffee", "D", token], "/vote", "choice 'D': pick one of A, B, C"),
            (["henry", "coffee", "a", token], "/vote", "choice 'a': pick one of A, B, C")]:
        with pytest.raises(AppError, match=message) as refused:
            client.predict(*args, api_name=endpoint)
        assert len(str(refused.value)) < 300
    assert max(len(line) for line in study_server.output().splitlines()) < 1000  # the log stays readable


def test_concurrent_windows_voting_on_one_image_each_count_for_their_own_showing(study, study_server):
    Client(study_server.url, verbose=False).predict("ines", api_name="/start")
    expected: list[str] = []
    failures: list[BaseException] = []

    def window(letter: str) -> None:
        try:
            client = Client(study_server.url, verbose=False)
            for _ in range(3):
                shown = answer_of(client.predict("ines", "chelsea", api_name="/show"))
                method = method_of(study, "chelsea", shown.results["ABC".index(letter)])
                client.predict("ines", "chelsea", letter, shown.token, api_name="/vote")
                expected.append(method)
        except BaseException as error:  # noqa: BLE001 - reported below, from the test's thread
            failures.append(error)

    threads = [threading.Thread(target=window, args=(letter,)) for letter in "ABCA"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    with contextlib.closing(sqlite3.connect(study["root"] / "votes.sqlite")) as db:
        logged = [row[0] for row in db.execute("SELECT method FROM vote_log WHERE participant = 'ines' ORDER BY id")]
        changes = sum(before != after for before, after in zip(logged, logged[1:]))  # a repeated choice is no change
        assert db.execute("SELECT method, revisions FROM votes WHERE participant = 'ines'").fetchall() == [
            (logged[-1], changes)]
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(expected) == 12 and Counter(logged) == Counter(expected)


def test_killing_the_server_loses_no_acknowledged_vote(study, tmp_path):
    """SIGKILL right after an acknowledged vote, while another client is mid-stream (showing and
    voting without pause): every acknowledged vote is in the database, at most the one in flight
    besides, and the database is intact."""
    db = tmp_path / "votes.sqlite"
    acknowledged: dict[str, str] = {}
    streamed: list[tuple[str, str]] = []  # erin's acknowledged votes, in order

    def vote_once(server) -> None:
        client = Client(server.url, verbose=False)
        answer = answer_of(client.predict("dana", api_name="/start"))
        assert answer.progress == f"{len(acknowledged)} / 3"  # resumed where the killed server stopped
        shown = [method_of(study, answer.image, r) for r in answer.results]
        client.predict("dana", answer.image, "A", answer.token, api_name="/vote")  # returned: acknowledged
        acknowledged[answer.image] = shown[0]

    def keep_voting(server, voting: threading.Event) -> None:
        with contextlib.suppress(Exception):  # until the server dies under it
            client = Client(server.url, verbose=False)
            client.predict("erin", api_name="/start")
            while True:
                for image in PHOTOS:
                    shown = answer_of(client.predict("erin", image, api_name="/show"))
                    method = method_of(study, image, shown.results[1])
                    client.predict("erin", image, "B", shown.token, api_name="/vote")
                    streamed.append((image, method))
                    voting.set()

    for _ in range(3):
        server = WebServer(serve_command(study, db), tmp_path).start()
        voting = threading.Event()
        stream = threading.Thread(target=keep_voting, args=(server, voting), daemon=True)
        try:
            stream.start()
            assert voting.wait(timeout=60)
            vote_once(server)
        finally:
            server.kill()  # SIGKILL right after the acknowledgement, erin mid-stream: no clean shutdown
        stream.join(timeout=60)
        assert server.process.returncode == -9 and not stream.is_alive()
    assert VoteStore.read(db).voted("dana") == acknowledged
    with contextlib.closing(sqlite3.connect(db)) as opened:
        logged = opened.execute("SELECT image, method FROM vote_log WHERE participant = 'erin' ORDER BY id").fetchall()
        assert opened.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    remaining = iter(logged)
    assert all(vote in remaining for vote in streamed)  # in order, none lost
    assert len(streamed) <= len(logged) <= len(streamed) + 3  # besides: at most the one in flight at each kill
    report = report_json(db, tmp_path / "report")
    assert report["participants"] == 2 and report["votes"] == 3 + len({image for image, _ in logged})


# ---------------------------------------------------------------------------- what serve refuses, and faults


def refused_serve(study, db: Path, folders: dict | None = None) -> subprocess.CompletedProcess:
    """The real `serve` command, expected to refuse before serving (so it exits on its own)."""
    command = python_module("xpsr_jax.study", "serve", "--lr", str({**study["folders"], **(folders or {})}["LR"]),
                            *method_flags(study, folders), "--db", str(db), "--port", str(free_port()))
    return subprocess.run(command, capture_output=True, text=True, env=server_env(db.parent.parent), cwd=REPO,
                          timeout=120)


def swap_folders(study) -> dict:
    return {"BicubicUp": study["folders"]["NearestUp"], "NearestUp": study["folders"]["BicubicUp"]}


@pytest.mark.parametrize("case", ["immutable", "folder", "junk", "swapped"])
def test_serve_refuses_with_one_line_and_leaves_the_database_as_it_was(study, tmp_path, case):
    """A study database serve cannot write (immutable), one in a folder that cannot take SQLite's
    -wal and -shm files, a file of one byte of junk, and a study whose method names now point at
    each other's folders: one line, exit 2, the file unchanged."""
    db = tmp_path / "data" / "votes.sqlite"
    db.parent.mkdir()
    if case == "junk":
        db.write_bytes(b"x")
    else:
        open_study(study, db)  # the study as a first serve records it
    before = db.read_bytes()
    locked = {"immutable": db, "folder": db.parent}.get(case)
    with unwritable(locked) if locked else contextlib.nullcontext():
        done = refused_serve(study, db, swap_folders(study) if case == "swapped" else None)
    expected = {"immutable": re.escape(f"--db {db}: cannot be written (attempt to write a readonly database: the file "
                                       "is read-only") + r".*; give a writable file",
                "folder": re.escape(f"--db {db}: cannot be written (unable to open database file: the folder "
                                    f"{db.parent} is not writable (SQLite keeps votes.sqlite-wal and votes.sqlite-shm "
                                    "beside the database)); give a writable file"),
                "junk": re.escape(f"--db {db}: not an SQLite database (1 byte without SQLite's header)"),
                "swapped": re.escape(f"--method BicubicUp={study['folders']['NearestUp']}: the study's votes for "
                                     f"BicubicUp were cast on the results in {study['folders']['BicubicUp']} (other "
                                     "images now)")}[case]
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.fullmatch(f"error: {expected}.*\\n", done.stderr) and done.stdout == "", done.stderr
    assert db.read_bytes() == before


@pytest.fixture(scope="module")
def moved_server(study, tmp_path_factory):
    """A server of the study whose GroundTruthHR results were copied to another folder since its
    database was made (the same images): (server, database, the new folder)."""
    root = tmp_path_factory.mktemp("moved")
    db = root / "votes.sqlite"
    open_study(study, db)
    moved = shutil.copytree(study["folders"]["GroundTruthHR"], root / "ground-truth-copy")
    command = python_module("xpsr_jax.study", "serve", "--lr", str(study["folders"]["LR"]),
                            *method_flags(study, {"GroundTruthHR": moved}), "--db", str(db))
    with WebServer(command, root) as server:
        yield server, db, moved


def test_serve_takes_a_method_folder_moved_with_the_same_images_and_says_so(study, moved_server):
    server, db, moved = moved_server
    assert (f"note: --method GroundTruthHR={moved}: the same images as in {study['folders']['GroundTruthHR']}, where "
            "the study's votes were cast; the study now records the new folder") in server.output()
    with contextlib.closing(sqlite3.connect(db)) as opened:
        assert opened.execute("SELECT folder FROM sources WHERE name = 'GroundTruthHR'").fetchone() == (str(moved),)


def test_a_database_made_unwritable_while_serving_answers_each_request_with_a_message(study, moved_server):
    server, db, _ = moved_server
    client = Client(server.url, verbose=False)
    shown = answer_of(client.predict("kim", api_name="/start"))
    with unwritable(db):
        for args, endpoint, undone in [(["kim", shown.image, "A", shown.token], "/vote", "the vote was NOT recorded"),
                                       (["kim", shown.image], "/show", "the image cannot be shown"),
                                       (["lee"], "/start", "could not start")]:
            with pytest.raises(AppError, match=re.escape(f"{undone}: the study database votes.sqlite cannot be "
                                                         "written now (attempt to write a readonly database")):
                client.predict(*args, api_name=endpoint)
    assert VoteStore.read(db).voted("kim") == {}
    client.predict("kim", shown.image, "A", shown.token, api_name="/vote")  # writable again: the same page votes
    assert VoteStore.read(db).voted("kim") == {shown.image: method_of(study, shown.image, shown.results[0])}
    assert "Traceback" not in server.output()
    assert "request refused: the vote was NOT recorded: the study database votes.sqlite cannot be written" in (
        server.output())


def test_a_result_that_cannot_be_read_while_serving_is_refused_without_its_path(moved_server):
    """The path would name the method's folder: the participant's message leaves it to the log."""
    server, db, moved = moved_server
    with contextlib.closing(sqlite3.connect(db)) as opened:
        shown = {row[0] for row in opened.execute("SELECT image FROM showings")}
    image = next(photo for photo in PHOTOS if photo not in shown)  # never shown: no page copy made yet
    (moved / f"{image}.png").rename(moved / f"{image}.png.away")
    try:
        with pytest.raises(AppError) as refused:
            Client(server.url, verbose=False).predict("omar", image, api_name="/show")
    finally:
        (moved / f"{image}.png.away").rename(moved / f"{image}.png")
    assert str(refused.value) == (f"image {image} cannot be shown now: one of its files cannot be read, or its copy "
                                  "for the page cannot be written (the server's log says which)")
    assert f"request refused: image {image} cannot be shown now" in server.output()
    assert str(moved / f"{image}.png") in server.output() and "Traceback" not in server.output()


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "1m"):
    """A tmpfs of `size` mounted on `folder` (root only; skips otherwise), to fill up."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s disk."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * chunk)
    return filler


def test_a_full_disk_refuses_votes_with_a_message_and_serve_with_one_line(study, tmp_path):
    with small_disk(tmp_path / "small") as disk:
        db = disk / "votes.sqlite"
        with WebServer(serve_command(study, db), tmp_path) as server:
            client = Client(server.url, verbose=False)
            shown = answer_of(client.predict("max", api_name="/start"))
            filler = fill(disk)
            with pytest.raises(AppError, match=r"the vote was NOT recorded: the study database votes.sqlite cannot "
                                               r"be written now \(.*: the disk is full"):
                client.predict("max", shown.image, "A", shown.token, api_name="/vote")
            with pytest.raises(AppError, match=r"could not start: the study database votes.sqlite cannot be .* now "
                                               r"\(.*: the disk is full"):
                client.predict("nia", api_name="/start")
            filler.unlink()
            client.predict("max", shown.image, "A", shown.token, api_name="/vote")
            assert VoteStore.read(db).voted("max") == {shown.image: method_of(study, shown.image, shown.results[0])}
        assert "Traceback" not in server.output()
        fill(disk)
        done = refused_serve(study, db)
        assert done.returncode == 2
        assert re.fullmatch(re.escape(f"error: --db {db}: cannot be written (") + r".*: the disk is full \(\d+ KiB "
                            r"free\)\); give a writable file \(the study records every vote in it\)\n", done.stderr)
