"""The blind user study (`python -m xpsr_jax.study serve|report`): the SQLite store, the method
folders, the report's rates and Wilson intervals, and the running server driven by gradio_client
and by a real headless Chromium, killed with SIGKILL between votes."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers.web import REPO, WebServer, headless_chromium, python_module, save_screenshot, server_env
from xpsr_jax.study.catalog import Catalog, parse_method
from xpsr_jax.study.report import summarize, to_markdown, write_report
from xpsr_jax.study.store import StudyError, VoteStore

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


def method_flags(study) -> list[str]:
    return [arg for method in METHODS for arg in ("--method", f"{method}={study['folders'][method]}")]


# ---------------------------------------------------------------------------- store, catalog, report


def test_one_vote_per_participant_and_image_a_second_replaces_the_first(tmp_path):
    store = VoteStore.open(tmp_path / "votes.sqlite", methods=["A", "B", "C"], images=["1", "2"])
    with sqlite3.connect(tmp_path / "votes.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.start("  alice ") == "alice"
    order = store.show("alice", "1")
    assert sorted(order) == ["A", "B", "C"]
    first = store.vote("alice", "1", 2)
    assert (first.method, first.replaced) == (order[2], None)
    order = store.show("alice", "1")
    second = store.vote("alice", "1", order.index("A" if first.method != "A" else "B"))
    assert second.replaced == first.method and second.method != first.method
    assert store.totals() == {"participants": 1, "votes": 1, "replaced": 1, "cast": 2}
    assert store.counts() == {("1", second.method): 1}
    assert store.next_image("alice") == "2" and store.voted("alice") == {"1": second.method}
    for call, message in [(lambda: store.show("alice", "3"), "unknown image id '3'"),
                          (lambda: store.vote("alice", "2", 0), "has not been shown to 'alice'"),
                          (lambda: store.vote("alice", "1", 3), "choice 3: pick one of the 3"),
                          (lambda: store.show("bob", "1"), "participant 'bob' has not started"),
                          (lambda: store.start("   "), "give a name or token"),
                          (lambda: store.start("x" * 65), "at most 64 printable")]:
        with pytest.raises(StudyError, match=message):
            call()


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
    for target, message in [(other, "an SQLite database of something else"), (text, "cannot be used as the study")]:
        with pytest.raises(StudyError, match=message):
            VoteStore.open(target, methods=["A", "B"], images=["1"])
    assert {p: p.read_bytes() for p in (other, text)} == before
    with pytest.raises(StudyError, match="no such file"):
        VoteStore.read(tmp_path / "nothing.sqlite")


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
        store.vote(participant, image, store.show(participant, image).index(method))
    store.vote("p2", "c", store.show("p2", "c").index("SeeSR"))  # p2 changes a vote: XPSR -> SeeSR
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
        response = client.predict(participant, api_name="/start")
        for number, method in enumerate(choices):
            image, progress, lr, *results, message, _ = response
            assert progress == f"{number} / 3" and image in PHOTOS
            assert Image.open(lr).size == (32, 32) and {Image.open(r).size for r in results} == {(128, 128)}
            shown = [method_of(study, image, r) for r in results]
            assert sorted(shown) == sorted(METHODS)
            response = client.predict(participant, image, "ABC"[shown.index(method)], api_name="/vote")
            assert response[-2].startswith(f"Vote for image {image} recorded.")
            responses.append(response)
            voted[(participant, image)] = method
        assert response[0] == "" and response[1] == "3 / 3" and "Thank you" in response[-2]

    # bob changes his vote for one image: counted once, and as a replacement.
    client = Client(study_server.url, verbose=False)
    image, _, _, *results, _, _ = client.predict("bob", "coffee", api_name="/show")
    shown = [method_of(study, image, r) for r in results]
    changed_to = next(method for method in METHODS if method != voted[("bob", "coffee")])
    response = client.predict("bob", "coffee", "ABC"[shown.index(changed_to)], api_name="/vote")
    assert response[-2].startswith("Vote for image coffee changed.")
    voted[("bob", "coffee")] = changed_to
    for call, message in [(lambda: client.predict("bob", "nope", "A", api_name="/vote"), "unknown image id 'nope'"),
                          (lambda: client.predict("bob", "coffee", "Z", api_name="/vote"), "choice 'Z'"),
                          (lambda: client.predict("eve", "coffee", "A", api_name="/vote"), "'eve' has not started"),
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
    with headless_chromium(tmp_path, height=1250) as browser:
        browser.get(study_server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#participant textarea, #participant input")
                   ).send_keys("carol")
        browser.find_element(By.ID, "start").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "[id^=result-] img")) == 3)
        image = browser.find_element(By.CSS_SELECTOR, "#image-id textarea, #image-id input").get_attribute("value")
        source = browser.find_element(By.CSS_SELECTOR, "#result-B img").get_attribute("src")
        with urllib.request.urlopen(source) as response:
            expected = method_of(study, image, response)
        save_screenshot(browser, "study.png", tmp_path)
        browser.find_element(By.XPATH, "//*[@id='choice']//label[.//input[@value='B']]").click()
        browser.find_element(By.ID, "vote").click()
        wait.until(lambda b: f"Vote for image {image} recorded." in b.find_element(By.ID, "message").text)
        progress = browser.find_element(By.CSS_SELECTOR, "#progress textarea, #progress input").get_attribute("value")
        assert progress == "1 / 3"
    assert VoteStore.read(study["root"] / "votes.sqlite").voted("carol") == {image: expected}


def test_killing_the_server_loses_no_acknowledged_vote(study, tmp_path):
    db = tmp_path / "votes.sqlite"
    acknowledged: dict[str, str] = {}

    def vote_once(server) -> None:
        client = Client(server.url, verbose=False)
        image, progress, _, *results, _, _ = client.predict("dana", api_name="/start")
        assert progress == f"{len(acknowledged)} / 3"  # resumed where the killed server stopped
        shown = [method_of(study, image, r) for r in results]
        client.predict("dana", image, "A", api_name="/vote")  # returned: acknowledged
        acknowledged[image] = shown[0]

    for _ in range(3):
        server = WebServer(serve_command(study, db), tmp_path).start()
        try:
            vote_once(server)
        finally:
            server.kill()  # SIGKILL right after the acknowledgement: no clean shutdown
        assert server.process.returncode == -9
    assert VoteStore.read(db).voted("dana") == acknowledged
    report = report_json(db, tmp_path / "report")
    assert report["votes"] == 3 and sum(m["votes"] for m in report["methods"]) == 3
