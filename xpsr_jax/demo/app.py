"""The demo's Gradio page over a `DemoService`.

    serve(service, examples=[...], host="127.0.0.1", port=7860)    # blocks until stopped

API endpoints (gradio_client, `Client(url).predict(..., api_name=...)`):
  /super_resolve  (image, highlevel_prompt, lowlevel_prompt, sampler, steps, guidance, seed,
                   color_fix, tiling, latent_tile_size) -> ([bicubic x4, SR], SR PNG, status)
  /caption        (image) -> (highlevel_prompt, lowlevel_prompt)      with --captioner
Bad input comes back as a message (gradio_client: AppError with that message), never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from xpsr_jax.demo.service import DemoService, Settings, UploadError
from xpsr_jax.inference.config import COLOR_FIXES
from xpsr_jax.inference.memory import DeviceMemoryError
from xpsr_jax.schedulers import SAMPLERS
from xpsr_jax.seeds import MAX_SEED

TITLE = "XPSR super-resolution (x4)"
# System fonts: the default theme would ask Google Fonts, which an offline server cannot reach.
FONTS = dict(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# Uploads are LR images (a 1024 px PNG is about 3 MB); Gradio refuses larger files before they land.
MAX_UPLOAD = "64mb"


def _upload(payload) -> tuple[str | None, str | None]:
    """(path, the name the user gave it) of an image payload (not preprocessed by Gradio, so that a
    file that is not an image reaches `read_upload` and gets its own message)."""
    if payload is None:
        return None, None
    if isinstance(payload, str):
        return payload, Path(payload).name
    get = payload.get if isinstance(payload, dict) else lambda key: getattr(payload, key, None)
    return get("path"), get("orig_name") or (Path(get("path")).name if get("path") else None)


def serve(service: DemoService, *, examples: list[str] = (), host: str = "127.0.0.1", port: int = 7860,
          block: bool = True):
    """Builds the page and serves it on host:port (local only, no share link); `block=False`
    returns after start-up with the page still served."""
    import gradio as gr  # lazy: the optional [demo] extra; the core package never imports it

    demo = _page(gr, service, examples)
    # One request on the device at a time; the others wait in the queue and see their place.
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                theme=gr.themes.Default(**FONTS), footer_links=["api"], prevent_thread_lock=not block, quiet=True,
                max_file_size=MAX_UPLOAD)
    return demo


def _page(gr, service: DemoService, examples):
    defaults = service.default_settings()

    def shown(error: Exception) -> Exception:
        print(f"request refused: {error}", file=sys.stderr, flush=True)
        return gr.Error(str(error), print_exception=False)

    def super_resolve(image, highlevel, lowlevel, sampler, steps, guidance, seed, color_fix, tiling,
                      latent_tile_size, progress=gr.Progress()):
        path, name = _upload(image)
        try:
            lr = service.read_upload(path, name)
            settings = Settings.parse(sampler, steps, guidance, seed, color_fix, tiling, latent_tile_size)
            result = service.super_resolve(lr, highlevel, lowlevel, settings, name=name or "image",
                                           report=lambda fraction, text: progress(fraction, desc=text))
        except (UploadError, DeviceMemoryError) as error:
            raise shown(error) from None
        lr_height, lr_width = lr.shape[:2]
        status = f"{lr_width}x{lr_height} px -> {result.describe()}"
        return (str(result.bicubic_png), str(result.png)), str(result.png), status

    def caption(image):
        path, name = _upload(image)
        try:
            return service.caption(service.read_upload(path, name))
        except UploadError as error:
            raise shown(error) from None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nUpload a low-resolution image (or pick an example), give its two prompts "
                    "(what it shows; how it looks) and compare bicubic x4 with XPSR on the slider."
                    + (" Empty prompts are written by the captioner." if service.captioner else ""))
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="low-resolution input", type="filepath", sources=["upload", "clipboard"],
                                 height=240, elem_id="lr-input")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[image], label="examples")
                highlevel = gr.Textbox(label="high-level prompt (what the image shows)", elem_id="highlevel")
                lowlevel = gr.Textbox(label="low-level prompt (how it looks: blur, noise, ...)", elem_id="lowlevel")
                if service.captioner is not None:
                    caption_button = gr.Button("caption the image", elem_id="caption")
                with gr.Accordion("sampling", open=False):
                    sampler = gr.Dropdown(list(SAMPLERS), value=defaults.sampler, label="sampler")
                    steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="steps")
                    guidance = gr.Slider(0, 15, value=defaults.guidance, step=0.5,
                                         label="guidance (classifier-free; <= 1 turns it off)")
                    seed = gr.Number(value=defaults.seed, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    color_fix = gr.Radio(list(COLOR_FIXES), value=defaults.color_fix, label="colour fix")
                    tiling = gr.Checkbox(value=defaults.tiling, label="tile large images")
                    tile_size = gr.Slider(8, 512, value=defaults.latent_tile_size, step=8,
                                          label="latent tile size (px / 8)")
                run = gr.Button("super-resolve", variant="primary", elem_id="run")
            with gr.Column():
                compare = gr.ImageSlider(label="bicubic x4 | XPSR", format="png", elem_id="compare",
                                         buttons=["download", "fullscreen"])
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="SR image (PNG)", elem_id="download")
        run.click(super_resolve, [image, highlevel, lowlevel, sampler, steps, guidance, seed, color_fix, tiling,
                                  tile_size], [compare, download, status], api_name="super_resolve",
                  preprocess=False)
        if service.captioner is not None:
            caption_button.click(caption, [image], [highlevel, lowlevel], api_name="caption", preprocess=False)
    return demo
