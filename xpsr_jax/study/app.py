"""The blind study's Gradio page over a `Catalog` and a `VoteStore`.

    serve(catalog, store, host="127.0.0.1", port=7861)

For each image a participant sees the LR and every method's result, unnamed (letters A, B, ...),
in a fresh random order, at one size, and picks one. Images reach the browser as PNG copies named
by a hash of their bytes (`Catalog.display_files`), so no file name or URL says which method made
one. Each showing has an unguessable token (in a hidden field of the page); the vote carries it
back and is resolved against THAT showing's order, so a participant's two windows never mix.

API endpoints (gradio_client, `Client(url).predict(..., api_name=...)`); each returns
(image_id, progress "12 / 50", LR, result A, result B, ..., message, choice, showing):
  /start  (participant)                             start, or resume at the first image without a vote
  /show   (participant, image_id)                   that image, in a fresh order (to change a vote)
  /vote   (participant, image_id, choice, showing)  choice "A", "B", ... of the showing whose token
                                                    is `showing` (the last element of the answer
                                                    that showed the image); the next image without
                                                    a vote comes back
`showing` is "" when no image is shown. An unknown participant, image id, choice or showing, an
input of the wrong type, or a database that cannot be written comes back as a message (AppError),
never a traceback; the server's log has one line per refused request.
"""

from __future__ import annotations

import functools
import os
import string
import sys
import tempfile
import traceback
from pathlib import Path

from xpsr_jax.study.catalog import Catalog
from xpsr_jax.study.store import StudyError, VoteStore, check_participant, short

TITLE = "Which result is best?"
FONTS = dict(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # offline: no web fonts


def slot_letters(count: int) -> list[str]:
    return list(string.ascii_uppercase[:count])


class StudyPage:
    """The handlers behind the page and the API, without Gradio (they raise StudyError). Each
    answer is (image_id, progress, LR, results..., message, choice, showing token)."""

    def __init__(self, catalog: Catalog, store: VoteStore, display_folder: Path):
        self.catalog, self.store, self.display_folder = catalog, store, display_folder
        self.letters = slot_letters(len(store.methods))

    def _display(self, participant: str, image: str | None, message: str) -> tuple:
        total = len(self.store.images)
        voted = self.store.voted(participant)
        progress = f"{len(voted)} / {total}"
        if image is None:
            done = f"All {total} images have your vote. Thank you! (\"back\" shows an image again to change a vote.)"
            return ("", progress, None, *([None] * len(self.letters)), (message + " " + done).strip(), None, "")
        showing = self.store.show(participant, image)
        lr, results = self.catalog.display_files(image, showing.methods, self.display_folder)
        if image in voted:
            message = (message + " You voted for this image before; a new vote replaces that one.").strip()
        return (image, progress, str(lr), *map(str, results), message, None, showing.token)

    def start(self, participant) -> tuple:
        participant = self.store.start(participant)
        image = self.store.next_image(participant)
        return self._display(participant, image, f"Welcome, {participant}.")

    def show(self, participant, image_id) -> tuple:
        participant = self.store.start(participant)
        return self._display(participant, self.store.check_image(image_id), "")

    def back(self, participant, image_id) -> tuple:
        participant = self.store.start(participant)
        if image_id in ("", None):  # finished: back to the last image of the participant's order
            return self._display(participant, self.store.order(participant)[-1], "")
        previous = self.store.previous_image(participant, image_id)
        if previous is None:
            raise StudyError("this is the first image")
        return self._display(participant, previous, "")

    def vote(self, participant, image_id, choice, showing) -> tuple:
        participant = check_participant(participant)
        if not isinstance(choice, str) or choice not in self.letters:
            raise StudyError(f"choice {short(choice)}: pick one of {', '.join(self.letters)}")
        image = self.store.check_image(image_id)
        vote = self.store.vote(participant, image, self.letters.index(choice), showing=showing)
        recorded = f"Vote for image {image} changed." if vote.replaced else f"Vote for image {image} recorded."
        try:
            return self._display(vote.participant, self.store.next_image(vote.participant, after=image), recorded)
        except StudyError as error:  # the vote is in: say so, whatever keeps the next image away
            raise StudyError(f"{recorded} But the next image cannot be shown: {error}", detail=error.detail) from None


def answered(handler, error_type):
    """`handler` for Gradio: a StudyError becomes `error_type` (the message the client sees) and
    one log line; any other exception too, as an internal error (XPSR_DEBUG=1 logs its traceback),
    so no traceback reaches a client or the log of a study that runs for weeks."""
    @functools.wraps(handler)  # Gradio names the API's parameters after the handler's
    def run(*args):
        try:
            return handler(*args)
        except StudyError as error:
            print(f"request refused: {error}" + (f" ({error.detail})" if error.detail else ""), file=sys.stderr,
                  flush=True)
            raise error_type(str(error), print_exception=False) from None
        except Exception as error:
            print(f"request failed: {type(error).__name__}: {short(str(error))}", file=sys.stderr, flush=True)
            if os.environ.get("XPSR_DEBUG"):
                traceback.print_exception(error)
            raise error_type("the server could not answer this request (an internal error; the server's log "
                             "names it)", print_exception=False) from None
    return run


def serve(catalog: Catalog, store: VoteStore, *, host: str = "127.0.0.1", port: int = 7861, block: bool = True):
    """Serves the study page on host:port; `block=False` returns after start-up."""
    import gradio as gr  # lazy: the optional [demo] extra; the core package never imports it

    display_copies = tempfile.TemporaryDirectory(prefix="xpsr-study-")  # removed when the server stops
    page = StudyPage(catalog, store, Path(display_copies.name))

    def answer(handler):
        return answered(handler, gr.Error)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nEach page shows a low-resolution image and {len(page.letters)} enlarged "
                    "versions of it, in a new order each time. Pick the one you find best (the fullscreen button "
                    "zooms). Enter the same name later to resume.")
        with gr.Row():
            participant = gr.Textbox(label="your name or token", elem_id="participant", scale=3)
            start = gr.Button("start / resume", elem_id="start", scale=1)
        with gr.Row():
            image_id = gr.Textbox(label="image", interactive=False, elem_id="image-id")
            progress = gr.Textbox(label="voted", interactive=False, elem_id="progress")
        message = gr.Markdown(label="message", elem_id="message")
        lr = gr.Image(label="low-resolution input", interactive=False, format="png", height=200,
                      elem_id="lr", buttons=["fullscreen"])
        results = []
        for row_start in range(0, len(page.letters), 3):
            with gr.Row():
                for letter in page.letters[row_start:row_start + 3]:
                    results.append(gr.Image(label=letter, interactive=False, format="png", height=360,
                                            elem_id=f"result-{letter}", buttons=["fullscreen"]))
        with gr.Row():
            choice = gr.Radio(page.letters, label="the best result", elem_id="choice", scale=3)
            vote = gr.Button("vote", variant="primary", elem_id="vote", scale=1)
            back = gr.Button("back", elem_id="back", scale=1)
        # The showing's token: sent with the vote, so it counts for the order this page shows.
        showing = gr.Textbox(label="showing", visible=False, elem_id="showing")
        outputs = [image_id, progress, lr, *results, message, choice, showing]
        # preprocess=False: the handlers get what was sent (a list stays a list), and check its type.
        start.click(answer(page.start), [participant], outputs, api_name="start", preprocess=False)
        participant.submit(answer(page.start), [participant], outputs, api_visibility="private", preprocess=False)
        vote.click(answer(page.vote), [participant, image_id, choice, showing], outputs, api_name="vote",
                   preprocess=False)
        back.click(answer(page.back), [participant, image_id], outputs, api_visibility="private", preprocess=False)
        # /show has no button of its own: an API endpoint for scripts (the page uses "back").
        shown = gr.Button(visible=False)
        shown.click(answer(page.show), [participant, image_id], outputs, api_name="show", preprocess=False)
    demo.display_copies = display_copies  # lives as long as the page
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                theme=gr.themes.Default(**FONTS), footer_links=["api"], prevent_thread_lock=not block, quiet=True)
    return demo
